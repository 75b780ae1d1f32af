"""The official `massive` client, unchanged but for where it connects.

Usage: python massive_client.py HOST:PORT KEY CHANNELS COUNT [MARKET]
Prints one JSON line per parsed event: [type, symbol, model class], stops after COUNT. MARKET is
the official client's market (stocks when not given); the symbol is the model's symbol, pair or
ticker, whichever it has.
"""

import asyncio
import json
import sys

from massive import WebSocketClient


async def main(feed: str, key: str, channels: str, count: int, market: str = "stocks") -> None:
    client = WebSocketClient(api_key=key, feed=feed, market=market, secure=False,
                             subscriptions=channels.split(","), max_reconnects=0)
    seen = 0

    async def handle(messages):
        nonlocal seen
        for message in messages:
            symbol = next(getattr(message, name) for name in ("symbol", "pair", "ticker") if hasattr(message, name))
            print(json.dumps([str(message.event_type), symbol, type(message).__name__]), flush=True)
            seen += 1
        if seen >= count:
            await client.close()

    await client.connect(handle)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6]))
