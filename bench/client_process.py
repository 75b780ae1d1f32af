"""The benchmark's clients, in a process of their own: ``python -m bench.client_process``.

Each client connects, authenticates and subscribes its plan's channels plus
``BENCH.MARK``, then counts the data events it receives between the two marks.
Counting is a substring count done in C, so the clients cost little of the
machine the tiers are measured on; latency is read from the ``t`` of the first
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
import json
import math
import signal
from urllib.parse import urlsplit
import sys
import time

import msgspec
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Ping, Request, TextMessage

MARK = '"ev":"BENCH"'
RECEIVE_BYTES = 1 << 20
_decode = msgspec.json.Decoder(list[dict]).decode


class BenchClient:
    def __init__(self, channels: str) -> None:
        self.channels = channels
        self.marks = 0
        self.received = 0
        self.latencies_ms: list[float] = []

    def take(self, frame: str, now_ms: float) -> None:
        if MARK in frame or '"ev":"status"' in frame:
            self._take_slowly(frame, now_ms)
            return
        if self.marks == 1:
            self.received += frame.count('{"ev":')
            self._latency(frame, now_ms)

    def _take_slowly(self, frame: str, now_ms: float) -> None:
        for event in _decode(frame):
            ev = event.get("ev")
            if ev == "BENCH":
                self.marks += 1
            elif ev != "status" and self.marks == 1:
                self.received += 1
        if self.marks == 1:
            self._latency(frame, now_ms)

    def _latency(self, frame: str, now_ms: float) -> None:
        at = frame.find('"t":')
        if at > 0:
            digits = frame[at + 4:at + 17]  # milliseconds; µs and ns stamps start with the same digits
            if digits.isdigit():
                self.latencies_ms.append(now_ms - int(digits))


async def run_client(host: str, port: int, path: str, key: str, client: BenchClient,
                     ready: trio.Semaphore) -> None:
    """One benchmark client on wsproto over a raw Trio stream: large reads, no per-message tasks."""
    stream = await trio.open_tcp_stream(host, port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=path)))
    parts: list[str] = []

    async def messages():
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ConnectionClosed(None)
            ws.receive_data(data)
            now_ms = time.time() * 1000
            for event in ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        text = parts[0] if len(parts) == 1 else "".join(parts)
                        parts.clear()
                        yield text, now_ms
                elif isinstance(event, Ping):
                    await stream.send_all(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise ConnectionClosed(None)

    incoming = messages()
    async with stream:
        await incoming.__anext__()  # connected
        await stream.send_all(ws.send(TextMessage(data=json.dumps({"action": "auth", "params": key}))))
        await incoming.__anext__()  # auth_success
        channels = client.channels if client.channels == "*" else client.channels + ",BENCH.MARK"
        await stream.send_all(ws.send(TextMessage(data=json.dumps({"action": "subscribe", "params": channels}))))
        ready.release()
        async for text, now_ms in incoming:  # read from the start: a lagging client would skew others
            client.take(text, now_ms)
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
