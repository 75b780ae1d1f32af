"""The benchmark's clients, in a process of their own: ``python -m bench.client_process``.

Each client connects, authenticates and subscribes its plan's channels plus
``BENCH.MARK``, then counts the data events it receives between the two marks.
Counting is a substring count done in C on the frame's bytes, and frames are cut
from the stream by :class:`FrameReader` rather than wsproto (1.5 µs a message
against about 30), so the clients cost little of the machine the tiers are
measured on, even when the tiers send tens of thousands of small messages a
second; latency is read from the ``t`` of the first
event of each frame (the oldest in it), against this machine's clock. After the
window, while the load runs, a few fresh clients measure how long a new subscriber
waits for its first event. SIGUSR1 stops the clients where they are (the runner's
answer to tiers too far behind to deliver the closing mark in time); the results
then say so. One JSON line of results goes to standard output, with
the latencies also as a histogram of 0.1 ms buckets, so that the runner can merge
the percentiles of several client processes exactly (to 0.1 ms).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import signal
import struct
from urllib.parse import urlsplit
import sys
import time

import msgspec
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

MARK = b'"ev":"BENCH"'
STATUS = b'"ev":"status"'
RECEIVE_BYTES = 1 << 20
_decode = msgspec.json.Decoder(list[dict]).decode
#: WebSocket opcodes (RFC 6455 §5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_length16 = struct.Struct("!H").unpack_from
_length64 = struct.Struct("!Q").unpack_from


class FrameReader:
    """Whole messages out of the bytes a WebSocket server sends, without wsproto.

    A server's frames are never masked (RFC 6455 §5.1), so a frame is a 2-, 4- or
    10-byte header and its payload: cutting them out costs about 1.5 µs a message
    in Python, where wsproto's general machinery (events, UTF-8 decoding, state)
    costs about 30. The benchmark's clients read tens of thousands of messages a
    second at small framings; through wsproto they cost as much CPU as the tier they
    measure, on the same two cores. Payloads stay bytes (not decoded or checked).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._parts: list[bytes] = []  # fragments of a message still open
        self._opcode = TEXT

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """``(opcode, payload)`` for each whole message and control frame ``data`` completes."""
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        position, end = 0, len(buffer)
        while end - position >= 2:
            first, size = buffer[position], buffer[position + 1] & 0x7F
            header = 2
            if size == 126:
                if end - position < 4:
                    break
                size, header = _length16(buffer, position + 2)[0], 4
            elif size == 127:
                if end - position < 10:
                    break
                size, header = _length64(buffer, position + 2)[0], 10
            if end - position < header + size:
                break
            payload = bytes(buffer[position + header:position + header + size])
            position += header + size
            opcode, final = first & 0x0F, first & 0x80
            if opcode >= CLOSE:  # control frames may come between a message's fragments
                out.append((opcode, payload))
            elif final and not self._parts:
                out.append((opcode, payload))
            else:
                if opcode != CONTINUATION:
                    self._opcode = opcode
                self._parts.append(payload)
                if final:
                    out.append((self._opcode, b"".join(self._parts)))
                    self._parts.clear()
        del buffer[:position]
        return out


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One frame from a client: final, masked with a random key, as RFC 6455 §5.3 requires."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    key = os.urandom(4)
    mask = (key * (size // 4 + 1))[:size]
    return header + key + (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(size, "big")


class BenchClient:
    def __init__(self, channels: str) -> None:
        self.channels = channels
        self.marks = 0
        self.received = 0
        self.latencies_ms: list[float] = []

    def take(self, frame: bytes, now_ms: float) -> None:
        if MARK in frame or STATUS in frame:
            self._take_slowly(frame, now_ms)
            return
        if self.marks == 1:
            self.received += frame.count(b'{"ev":')
            self._latency(frame, now_ms)

    def _take_slowly(self, frame: bytes, now_ms: float) -> None:
        for event in _decode(frame):
            ev = event.get("ev")
            if ev == "BENCH":
                self.marks += 1
            elif ev != "status" and self.marks == 1:
                self.received += 1
        if self.marks == 1:
            self._latency(frame, now_ms)

    def _latency(self, frame: bytes, now_ms: float) -> None:
        at = frame.find(b'"t":')
        if at > 0:
            digits = frame[at + 4:at + 17]  # milliseconds; µs and ns stamps start with the same digits
            if digits.isdigit():
                self.latencies_ms.append(now_ms - int(digits))


async def run_client(host: str, port: int, path: str, key: str, client: BenchClient,
                     ready: trio.Semaphore) -> None:
    """One benchmark client over a raw Trio stream: large reads, :class:`FrameReader`, no per-message tasks."""
    stream = await trio.open_tcp_stream(host, port)
    nonce = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise ConnectionClosed(None)
        head += data
    response, _, rest = head.partition(b"\r\n\r\n")
    if response.split(b" ", 2)[1:2] != [b"101"]:
        raise OSError(f"handshake refused: {response.splitlines()[0]!r}")
    reader = FrameReader()

    async def messages():
        data = rest
        while True:
            now_ms = time.time() * 1000
            for opcode, payload in reader.feed(data):
                if opcode == TEXT:
                    yield payload, now_ms
                elif opcode == PING:
                    await stream.send_all(client_frame(PONG, payload))
                elif opcode == CLOSE:
                    raise ConnectionClosed(None)
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ConnectionClosed(None)

    async def send(message: dict) -> None:
        await stream.send_all(client_frame(TEXT, json.dumps(message).encode()))

    incoming = messages()
    async with stream:
        await incoming.__anext__()  # connected
        await send({"action": "auth", "params": key})
        await incoming.__anext__()  # auth_success
        channels = client.channels if client.channels == "*" else client.channels + ",BENCH.MARK"
        await send({"action": "subscribe", "params": channels})
        ready.release()
        async for frame, now_ms in incoming:  # read from the start: a lagging client would skew others
            client.take(frame, now_ms)
            if client.marks >= 2:
                break
        await incoming.aclose()


async def first_event_delay(url: str, key: str, channels: str) -> float:
    """Seconds from opening a connection to its first data event."""
    start = time.perf_counter()
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"action": "auth", "params": key}))
        await ws.get_message()
        await ws.send_message(json.dumps({"action": "subscribe", "params": channels}))
        while True:
            frame = await ws.get_message()
            if '"ev":"status"' not in frame:
                return time.perf_counter() - start


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def histogram(values: list[float]) -> dict[str, int]:
    """Latencies counted in 0.1 ms buckets, keyed by the bucket's floor in tenths of a ms."""
    counts: dict[int, int] = {}
    for value in values:
        bucket = math.floor(value * 10)
        counts[bucket] = counts.get(bucket, 0) + 1
    return {str(bucket): count for bucket, count in sorted(counts.items())}


async def main(args: argparse.Namespace) -> None:
    plan: list[str] = json.loads(open(args.plan).read())
    clients = [BenchClient(channels) for channels in plan]
    ready = trio.Semaphore(0)
    failures: list[str] = []

    target = urlsplit(args.url)

    async def guarded(client: BenchClient) -> None:
        try:
            await run_client(target.hostname, target.port, target.path or "/", args.key, client, ready)
        except (OSError, ConnectionClosed, trio.TooSlowError) as error:
            failures.append(f"{client.channels[:40]}: {error!r}")
            ready.release()

    joins: list[float] = []

    async def probe_joins() -> None:
        """While the load runs, new clients join one by one; how long until their first event?"""
        await trio.sleep(args.join_delay)
        for _ in range(args.join_probes):
            joins.append(await first_event_delay(args.url, args.key, args.join_channels))
            await trio.sleep(0.5)

    stopped = False

    async def stop_when_told(scope: trio.CancelScope) -> None:
        """SIGUSR1: the runner gave up waiting for the closing mark; stop and report what we have."""
        nonlocal stopped
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                stopped = True
                scope.cancel()
                return

    with trio.move_on_after(args.timeout) as timed:
        async with trio.open_nursery() as outer:
            outer.start_soon(stop_when_told, outer.cancel_scope)
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(guarded, client)
                for _ in clients:
                    await ready.acquire()
                print(json.dumps({"ready": len(clients) - len(failures)}), flush=True)
                nursery.start_soon(probe_joins)
            outer.cancel_scope.cancel()  # every client saw both marks: stop watching for the signal
    latencies = [value for client in clients for value in client.latencies_ms]
    print(json.dumps({
        "received": [client.received for client in clients],
        "channels": plan,
        "saw_both_marks": sum(1 for client in clients if client.marks >= 2),
        "latency_ms": {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
                       "max": max(latencies, default=None), "samples": len(latencies)},
        "latency_histogram": histogram(latencies),
        "join_seconds": joins,
        "failures": failures,
        # stopped before every client saw the closing mark: their counts are what arrived in time
        "stopped": stopped or timed.cancelled_caught,
    }), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--join-channels", default="T.AAPL,Q.AAPL")
    parser.add_argument("--join-delay", type=float, default=4.0,
                        help="seconds after all clients are ready before the join probes start")
    parser.add_argument("--join-probes", type=int, default=5,
                        help="how many new clients join one by one while the load runs (0: none)")
    parser.add_argument("--timeout", type=float, default=600)
    try:
        trio.run(main, parser.parse_args())
    except KeyboardInterrupt:
        sys.exit(1)
