"""The journal's cost on a tier's router, on and off, back to back in one process.

``python -m bench.router_journal_cost [--frames 20000] [--rounds 3]``

The tier's own router code (:func:`proxy.app.tier._route_batch` and ``Hub.flush``) runs over a
pre-built feed (the simulator's market model over 3,000 symbols) for two scenarios: *filtered*
(100 clients holding 5-50 symbols' T and Q, Zipf-weighted, 5 % holding ``T.*``, as
``scripts/bench``'s plan) and *firehose-star* (4 clients holding ``*``), each with frames of
200 events (``tick`` framing at 20,000/s) and of 1 event (Polygon's usual framing). Clients are
sessions of a real :class:`~proxy.net.server.Hub` whose connections take every write at once
and do nothing with it: no socket, so the router's share of the tier's CPU is larger here than
in a real tier, and the journal's share with it (a bound from above).

Journal modes: ``off`` (no journal), ``memory`` (the ring, 300 s / 256 MB) and ``disk`` (the ring
and a real :class:`~proxy.net.journal_writer.JournalWriter` in a temporary directory; its
worker thread's compression and writes are counted: CPU is the whole process's, every
thread). The modes are interleaved round after round, and each figure is the median of the
rounds: CPU µs per event, user + system.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import random
import shutil
import resource
import statistics
import tempfile
import time
import types

import trio

from proxy.app import tier as tier_module
from proxy.core.journal import Journal
from proxy.core.protocol import parse_channel_list
from proxy.core.stats import TierStats
from proxy.core.subscriptions import SubscriptionRegistry
from proxy.net.journal_writer import JournalWriter
from proxy.net.server import Hub
from proxy.sim.market import MarketModel, frame_of, prebuild, synthetic_symbols

SYMBOLS = 3000
#: Frames a read brings, by frame size: what the tiers' reads held in scripts/bench at its rates
#: (14 one-event frames on average at 10,000/s; frames of 200 events come 100 a second, one a read).
READ_FRAMES = {200: 1, 1: 8}


class NullConnection:
    """What the Hub writes to: takes every write at once, keeps nothing."""

    backlogged = False
    open = True

    def __init__(self) -> None:
        self.notify = lambda: None

    def send_texts(self, texts: list) -> int:
        return sum(len(text) for text in texts)


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plans(scenario: str, rng: random.Random, symbols: list[str]) -> list[str]:
    """Each client's channels, as scripts/bench's plans draw them."""
    if scenario == "firehose-star":
        return ["*"] * 4
    weights = [1 / (rank + 1) for rank in range(len(symbols))]
    out = []
    for _ in range(100):
        if rng.random() < 0.05:
            out.append("T.*")
            continue
        chosen = set(rng.choices(symbols, weights, k=rng.randint(5, 50)))
        out.append(",".join(f"{ev}.{symbol}" for symbol in sorted(chosen) for ev in ("T", "Q")))
    return out


async def route(feed: list[bytes], scenario: str, mode: str, events: int, read: int) -> float:
    """Route ``feed``, ``read`` frames a read, through a fresh tier's router with the journal in
    ``mode``; CPU µs per event."""
    from tests.helpers import filtered_config  # the test configuration: defaults, no ports opened
    config = filtered_config(1)
    registry: SubscriptionRegistry = SubscriptionRegistry(clock=trio.current_time)
    stats = TierStats()
    hub = Hub(config=config, registry=registry, stats=stats)
    for index, channels in enumerate(plans(scenario, random.Random(3), synthetic_symbols(SYMBOLS))):
        session = hub.open_session(f"127.0.0.1:{index}", NullConnection())  # type: ignore[arg-type]
        registry.subscribe(session, parse_channel_list(channels))
    tier = types.SimpleNamespace(stats=stats, registry=registry, hub=hub, journal=None, batches_routed=0,
                                 notices=collections.deque())
    async with trio.open_nursery() as nursery:
        writer = None
        if mode == "disk":
            directory = tempfile.mkdtemp(prefix="router-journal-cost-")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            writer = JournalWriter(directory, retention_seconds=None)
            await nursery.start(writer.run)
        if mode != "off":
            tier.journal = Journal(sink=None if writer is None else writer.offer)
        route_batch, flush = tier_module._route_batch, hub.flush
        cpu = cpu_now()
        offset_ns = time.time_ns() - int(trio.current_time() * 1e9)
        for start in range(0, len(feed), read):
            route_batch(tier, feed[start:start + read], trio.current_time(), offset_ns)  # type: ignore[arg-type]
            flush()
            await trio.sleep(0)  # the router's await for the next read: the writer may run
        flush()
        if writer is not None:
            while writer.stats.last_written_seq < tier.journal.next_seq - 1:  # type: ignore[union-attr]
                await trio.sleep(0.005)
        spent = cpu_now() - cpu
        nursery.cancel_scope.cancel()
    return spent / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000, help="frames per run (default 20,000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = MarketModel(synthetic_symbols(SYMBOLS), seed=17)
    print(f"CPU µs per event (user + system, every thread), median of {args.rounds} rounds; modes interleaved")
    for frame_events in (200, 1):
        frames = [frame_of(events) for events in prebuild(model, args.frames * frame_events, frame_events)]
        events = sum(frame.count(b'"ev"') for frame in frames)
        for scenario in ("filtered", "firehose-star"):
            results: dict[str, list[float]] = {"off": [], "memory": [], "disk": []}
            for _ in range(args.rounds):
                for mode in results:
                    results[mode].append(trio.run(route, frames, scenario, mode, events, READ_FRAMES[frame_events]))
            off = statistics.median(results["off"])
            line = f"{scenario:14} frames of {frame_events:3} events: off {off:.3f}"
            for mode in ("memory", "disk"):
                value = statistics.median(results[mode])
                line += f", {mode} {value:.3f} ({(value - off) / off * 100:+.1f} %)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
