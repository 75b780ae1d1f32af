"""The benchmark's clients, in a process of their own: ``python -m proxy.bench.client_process``.

Each client connects, authenticates and subscribes its plan's channels plus
``BENCH.MARK``, then counts the data events it receives between the two marks.
Counting is a substring count done in C, so the clients cost little of the
machine the tiers are measured on; latency is read from the ``t`` of the first
event of each frame (the oldest in it), against this machine's clock. After the
window, a few fresh clients measure how long a new subscriber waits for its
first event. One JSON line of results goes to standard output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

MARK = '"ev":"BENCH"'
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


async def run_client(url: str, key: str, client: BenchClient, ready: trio.Semaphore) -> None:
    async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"action": "auth", "params": key}))
        await ws.get_message()
        channels = client.channels if client.channels == "*" else client.channels + ",BENCH.MARK"
        await ws.send_message(json.dumps({"action": "subscribe", "params": channels}))
        ready.release()
        while client.marks < 2:  # read from the start: a client waiting for the others would lag
            frame = await ws.get_message()
            client.take(frame, time.time() * 1000)


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


async def main(args: argparse.Namespace) -> None:
    plan: list[str] = json.loads(open(args.plan).read())
    clients = [BenchClient(channels) for channels in plan]
    ready = trio.Semaphore(0)
    failures: list[str] = []

    async def guarded(client: BenchClient) -> None:
        try:
            await run_client(args.url, args.key, client, ready)
        except (OSError, ConnectionClosed, trio.TooSlowError) as error:
            failures.append(f"{client.channels[:40]}: {error!r}")
            ready.release()

    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(guarded, client)
            for _ in clients:
                await ready.acquire()
            print(json.dumps({"ready": len(clients) - len(failures)}), flush=True)
        joins = [await first_event_delay(args.url, args.key, args.join_channels) for _ in range(5)]
    latencies = [value for client in clients for value in client.latencies_ms]
    print(json.dumps({
        "received": [client.received for client in clients],
        "channels": plan,
        "saw_both_marks": sum(1 for client in clients if client.marks >= 2),
        "latency_ms": {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
                       "max": max(latencies, default=None), "samples": len(latencies)},
        "join_seconds": joins,
        "failures": failures,
    }), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--join-channels", default="T.*,Q.*")
    parser.add_argument("--timeout", type=float, default=600)
    try:
        trio.run(main, parser.parse_args())
    except KeyboardInterrupt:
        sys.exit(1)
