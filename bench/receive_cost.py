"""CPU per WebSocket message received by a benchmark client: ``python -m bench.receive_cost``.

``python -m bench.receive_cost [--rate N] [--connections C] [--seconds S]``: a
child process writes N small text frames a second, one ``send`` each, round-robin
over C loopback connections, as a tier writes one message per client per upstream
frame; this process reads them as the benchmark's clients do (one Trio task per
connection, :class:`~bench.client_process.FrameReader`), then with a bare
``selectors`` loop instead, and prints the reader's CPU (user + system, so the
kernel's receive path and the ACKs it sends on loopback count) per message.

It answers what the clients of ``scripts/bench`` must cost at small framings, where
the filtered tier sends one message per client per upstream frame: if this figure
is close to the tier's own cost per message, the load generator needs as much CPU
as the tier, and on a shared two-core machine it cannot be kept out of the way.

Each reader runs in a process of its own, forked fresh: on loopback the kernel's
TCP processing of a message (about 30 µs on the project's VM) is charged to the
reader or to the writer depending on where the scheduler ran them, and in one
process the same reading loop measured 45 µs a message at first and 16 µs after
another reader had run (one recv per message and nine recvs per wake-up both
times). Compare figures from fresh processes only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import time
from typing import Callable

import trio

from bench.client_process import FrameReader
from proxy.net.frames import text_frame

FRAME = text_frame(b'[{"ev":"T","sym":"MSFT","i":"50578","x":4,"p":215.9721,"s":100,'
                   b'"c":[37],"t":1611082428813,"q":3490,"z":3}]')


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def connected_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` (server side, client side) loopback TCP connections, Nagle off on the writing side."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(count)
        pairs = []
        for _ in range(count):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pairs.append((server, client))
    return pairs


def start_writer(sockets: list[socket.socket], rate: int, seconds: float) -> int:
    """A child process writing ``rate`` frames a second, paced by deadline, one send per frame."""
    pid = os.fork()
    if pid:
        return pid
    try:
        start, sent = time.monotonic(), 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                sockets[sent % len(sockets)].send(FRAME)
                sent += 1
            time.sleep(0.001)
    finally:
        os._exit(0)


def read_with_selectors(sockets: list[socket.socket], seconds: float) -> int:
    selector = selectors.DefaultSelector()
    readers = {}
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        readers[sock] = FrameReader()
    messages, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in selector.select(0.1):
            messages += len(readers[key.fileobj].feed(key.fileobj.recv(1 << 20)))
    selector.close()
    return messages


def read_with_trio(sockets: list[socket.socket], seconds: float) -> int:
    count = [0]

    async def one(sock: socket.socket) -> None:
        stream, reader = trio.SocketStream(trio.socket.from_stdlib_socket(sock)), FrameReader()
        while data := await stream.receive_some(1 << 20):
            count[0] += len(reader.feed(data))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for sock in sockets:
                nursery.start_soon(one, sock)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return count[0]


def measure(read: Callable[[list[socket.socket], float], int], args: argparse.Namespace) -> tuple[float, float]:
    pairs = connected_pairs(args.connections)
    pid = start_writer([server for server, _ in pairs], args.rate, args.seconds + 0.5)
    before = cpu_now()
    messages = read([client for _, client in pairs], args.seconds)
    used = cpu_now() - before
    os.waitpid(pid, 0)
    for server, client in pairs:
        server.close()
        client.close()
    return messages / args.seconds, used / max(messages, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=8000, help="messages a second, all connections (default 8000)")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args()
    print(f"{args.rate} messages/s of {len(FRAME)} bytes over {args.connections} connections; "
          f"reader CPU per message received:")
    for name, read in (("Trio, a task per connection", read_with_trio), ("selectors, one loop", read_with_selectors)):
        rate, cost = in_fresh_process(read, args)
        print(f"  {name:<28} {cost * 1e6:6.1f} µs   ({rate:,.0f} messages/s read, "
              f"{100 * cost * rate:.0f}% of a core)")


def in_fresh_process(read: Callable[[list[socket.socket], float], int],
                     args: argparse.Namespace) -> tuple[float, float]:
    """:func:`measure` in a forked child, so that no reader inherits what an earlier one left."""
    receive, send = os.pipe()
    pid = os.fork()
    if not pid:
        try:
            os.write(send, json.dumps(measure(read, args)).encode())
        finally:
            os._exit(0)
    os.close(send)
    with os.fdopen(receive) as answer:
        rate, cost = json.loads(answer.read())
    os.waitpid(pid, 0)
    return rate, cost


if __name__ == "__main__":
    main()
