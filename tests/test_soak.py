"""Soak: simulator traffic, clients joining and leaving at random, an upstream drop every minute.

Marked slow: ``scripts/test --slow`` runs it (``SOAK_SECONDS`` sets its length, 600 by
default). Checks: a ``*`` neighbour loses nothing outside the outage windows the proxy
announced, memory stays flat, and the counters agree with what happened.
"""

from __future__ import annotations

import array
import os
import random
import tracemalloc

import msgspec
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.helpers import ALL_STREAM, CLIENT_KEY, authed_client, start_chain, wait_until

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SYMBOLS = ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "SPY", "QQQ", "AAA", "AAB"]


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
async def test_soak(nursery):
    rnd = random.Random(2026)
    sim, firehose, filtered = await start_chain(nursery, firehose=dict(static_channels=ALL_STREAM),
                                                filtered=dict(unsubscribe_grace_seconds=1.0))
    neighbour = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*")
    # In arrival order: q as a non-negative number, an announced outage as -1. Compact on
    # purpose: the test's own bookkeeping must not be what the memory check measures.
    timeline = array.array("q")
    decode = msgspec.json.Decoder(list[dict]).decode

    async def watch() -> None:
        while True:
            for event in decode(await neighbour.ws.get_message()):
                if "q" in event:
                    timeline.append(event["q"])
                elif event.get("status") == "upstream_disconnected":
                    timeline.append(-1)

    joins = 0

    async def one_client() -> None:
        nonlocal joins
        joins += 1
        channels = ",".join(f"{rnd.choice('TQ')}.{rnd.choice(SYMBOLS)}" for _ in range(rnd.randint(1, 6)))
        async with trio.open_nursery() as own:
            client = await authed_client(own, filtered.port, CLIENT_KEY, subscribe=channels)
            with trio.move_on_after(rnd.uniform(0.5, 8)):
                try:
                    while True:
                        await client.receive()
                except ConnectionClosed:
                    pass
            await client.ws.aclose()
            own.cancel_scope.cancel()

    async def churn() -> None:
        async with trio.open_nursery() as clients:
            while True:
                clients.start_soon(one_client)
                await trio.sleep(rnd.uniform(0.05, 0.5))

    async def drops(interval: float) -> None:
        while True:
            await trio.sleep(interval)
            sim.drop_all(abrupt=rnd.random() < 0.5)

    tracemalloc.start()
    async with trio.open_nursery() as soak:
        soak.start_soon(watch)
        soak.start_soon(churn)
        soak.start_soon(drops, min(60.0, SOAK_SECONDS / 5))
        await trio.sleep(SOAK_SECONDS / 4)
        early = tracemalloc.get_traced_memory()[0] - timeline.buffer_info()[1] * timeline.itemsize
        await trio.sleep(SOAK_SECONDS * 3 / 4)
        late = tracemalloc.get_traced_memory()[0] - timeline.buffer_info()[1] * timeline.itemsize
        soak.cancel_scope.cancel()
    tracemalloc.stop()
    await wait_until(lambda: len(filtered.hub.sessions) == 1, what="the churned clients' sessions to end")

    # no loss outside announced outages: every gap in `q` has an upstream_disconnected before it
    outages = 0
    previous_q = None
    disconnected_since_previous = False
    for value in timeline:
        if value == -1:
            disconnected_since_previous = True
            outages += 1
        else:
            if previous_q is not None and value != previous_q + 1:
                assert disconnected_since_previous, f"events {previous_q + 1}..{value - 1} lost outside an outage"
            previous_q, disconnected_since_previous = value, False
    assert outages >= 4
    assert sum(1 for value in timeline if value >= 0) > SOAK_SECONDS * 1000

    # flat memory: what the second three quarters added is small next to the first quarter
    assert late - early < max(5_000_000, 0.2 * early), (early, late)

    # counters consistent with what happened
    assert filtered.stats.clients_total == joins + 1
    assert len(filtered.hub.sessions) == 1  # the neighbour
    assert filtered.registry.subscribers() == frozenset(filtered.hub.sessions)
    assert firehose.stats.outages >= 4 and filtered.stats.outages == 0
    assert outages == firehose.stats.outages  # each one announced to the clients
    in_flight = 5 * sim.config.events_per_second
    assert abs(filtered.stats.events_in - firehose.stats.events_out) < in_flight
