"""CPU per WebSocket message sent: trio-websocket, websockets' Trio implementation, and the floor.

``python -m bench.send_cost [--messages N] [--size BYTES]``: for each
implementation, a server on 127.0.0.1 sends N text messages of SIZE bytes to a
raw TCP reader that discards them; the process CPU time (user + system) per
message is printed. The reader's cost is the same for every implementation, so
the difference is the send path's. Needs the ``websockets`` package (test extra).
"""

from __future__ import annotations

import argparse
import functools
import resource
import time
from typing import Awaitable, Callable

import trio


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drain(port: int, path: str = "/") -> None:
    """A raw client: handshake, then read and discard until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    await stream.send_all(request.encode())
    while await stream.receive_some(1 << 20):
        pass


async def measure(serve: Callable[..., Awaitable[None]], messages: int, payload: bytes) -> float:
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, messages, payload, done)
        start_cpu, start = cpu_now(), time.perf_counter()
        nursery.start_soon(drain, port)
        await done.wait()
        used = cpu_now() - start_cpu
        nursery.cancel_scope.cancel()
    return used / messages


async def serve_trio_websocket(messages: int, payload: bytes, done: trio.Event,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
    from trio_websocket import serve_websocket

    async def handler(request):
        ws = await request.accept()
        for _ in range(messages):
            await ws.send_message(payload.decode())  # as the proxy does today: bytes → str
        done.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve_websocket, handler, "127.0.0.1", 0, None))
        task_status.started(server.port)


async def serve_websockets_trio(messages: int, payload: bytes, done: trio.Event,
                                task_status=trio.TASK_STATUS_IGNORED) -> None:
    from websockets.trio.server import serve

    async def handler(connection):
        for _ in range(messages):
            await connection.send(payload, text=True)  # bytes sent as a text frame, no decode
        done.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, handler, 0, host="127.0.0.1",
                                                       compression=None))
        task_status.started(server.listeners[0].socket.getsockname()[1])


async def serve_raw_wsproto(messages: int, payload: bytes, done: trio.Event,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The floor under both libraries: wsproto framing and Trio's send_all, nothing else."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    text = payload.decode()

    async def handler(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some(65536))
            if any(isinstance(event, Request) for event in ws.events()):
                break
        await stream.send_all(ws.send(AcceptConnection()))
        for _ in range(messages):
            await stream.send_all(ws.send(TextMessage(data=text)))
        done.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        task_status.started(listeners[0].socket.getsockname()[1])


async def main(args: argparse.Namespace) -> None:
    event = b'{"ev":"T","sym":"MSFT","i":"50578","x":4,"p":215.9721,"s":100,"c":[37],"t":1611082428813,"q":3490,"z":3}'
    payload = b"[" + b",".join([event] * max(1, args.size // (len(event) + 1))) + b"]"
    print(f"{args.messages} messages of {len(payload)} bytes, CPU µs per message sent:")
    for name, serve in (("trio-websocket", serve_trio_websocket), ("websockets.trio", serve_websockets_trio),
                        ("wsproto + Trio (floor)", serve_raw_wsproto)):
        results = [await measure(serve, args.messages, payload) for _ in range(args.repeat)]
        print(f"  {name:<23} best {min(results) * 1e6:6.1f}   runs: "
              + " ".join(f"{r * 1e6:.1f}" for r in results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    trio.run(main, parser.parse_args())
