"""A client as users write them with plain asyncio `websockets` (README's example): URL only changed.

Usage: python plain_websockets_client.py URL KEY CHANNELS COUNT
Prints each received frame on its own line, stops after COUNT data events.
"""

import asyncio
import json
import sys

import websockets


async def main(url: str, key: str, channels: str, count: int) -> None:
    ws = await websockets.connect(url)
    print(await ws.recv(), flush=True)
    await ws.send(json.dumps({"action": "auth", "params": key}))
    print(await ws.recv(), flush=True)
    await ws.send(json.dumps({"action": "subscribe", "params": channels}))
    seen = 0
    while seen < count:
        message = await ws.recv()
        print(message, flush=True)
        seen += sum(1 for event in json.loads(message) if event["ev"] != "status")
    await ws.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
