"""A tier's timed tasks, without sockets and under a MockClock: the grace expiry, the summary
line, the rate history. (The whole tier over real sockets is in test_firehose, test_filtered.)"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import AsyncIterator

import pytest
import trio

from proxy.app import tier as tier_module
from proxy.core.protocol import parse_channel_list
from proxy.core.stats import RateSample, TierHistory, TierStats
from proxy.core.subscriptions import SubscriptionRegistry
from proxy.net.server import Hub
from proxy.net.beacon import Beacon
from proxy.net.upstream import LinkState, UpstreamLink
from tests.helpers import FakeConnection, filtered_config

GRACE = 5.0


def fake_tier(**config: object) -> types.SimpleNamespace:
    """What the timed tasks read of a :class:`~proxy.app.tier.Tier`: registry, hub, stats, link (not
    running), history."""
    settings = filtered_config(1, unsubscribe_grace_seconds=GRACE, **config)
    registry = SubscriptionRegistry(clock=trio.current_time, grace_seconds=GRACE)
    stats = TierStats()
    return types.SimpleNamespace(
        config=settings, registry=registry, stats=stats, history=TierHistory(),
        hub=Hub(config=settings, registry=registry, stats=stats),
        link=UpstreamLink("firehose proxy", settings.upstream_url, settings.upstream_api_key, desired=frozenset,
                          demand_changed=Beacon(), frames=trio.open_memory_channel(0)[0], state=LinkState.CONNECTED),
    )


def change(tier: types.SimpleNamespace, action: str, who: str, channels: str) -> None:
    """Change the registry as the Hub does: ``subscribe`` or ``unsubscribe``, then a pulse."""
    getattr(tier.registry, action)(who, set(parse_channel_list(channels)))
    tier.hub.demand_changed.pulse()


def upstream(tier: types.SimpleNamespace) -> set[str]:
    return {channel.text for channel in tier.registry.upstream}


@contextlib.asynccontextmanager
async def expiring(tier: types.SimpleNamespace) -> AsyncIterator[list[tuple[float, set[str]]]]:
    """Run the grace task; yields the (time, upstream set) the link would see at each pulse."""
    changes: list[tuple[float, set[str]]] = []

    async def watch() -> None:
        while True:
            await tier.hub.demand_changed.wait()
            changes.append((trio.current_time(), upstream(tier)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier_module._expire_grace, tier)
        nursery.start_soon(watch)
        yield changes
        nursery.cancel_scope.cancel()


# --- grace expiry --------------------------------------------------------------------------------


async def test_an_unsubscribe_reaches_upstream_when_the_grace_ends_not_before(autojump_clock):
    tier = fake_tier()
    async with expiring(tier) as changes:
        await trio.sleep(1)
        change(tier, "subscribe", "a", "T.AAPL,Q.MSFT")
        start = trio.current_time()
        change(tier, "unsubscribe", "a", "T.AAPL")
        await trio.sleep(GRACE - 0.01)
        assert upstream(tier) == {"T.AAPL", "Q.MSFT"}  # still held
        await trio.sleep(0.02)
        assert upstream(tier) == {"Q.MSFT"}
    expired = [when for when, held in changes if held == {"Q.MSFT"}]
    assert expired and expired[0] == pytest.approx(start + GRACE)  # at the deadline, and the link was told


async def test_a_resubscribe_inside_the_grace_keeps_the_channel_and_sends_nothing(autojump_clock):
    tier = fake_tier()
    async with expiring(tier) as changes:
        change(tier, "subscribe", "a", "T.AAPL")
        change(tier, "unsubscribe", "a", "T.AAPL")
        await trio.sleep(GRACE / 2)
        change(tier, "subscribe", "b", "T.AAPL")
        await trio.sleep(10 * GRACE)
        assert upstream(tier) == {"T.AAPL"}
    assert changes and all(held == {"T.AAPL"} for _, held in changes)  # never dropped upstream meanwhile


async def test_a_grace_that_starts_while_the_task_sleeps_with_no_deadline_is_kept(autojump_clock):
    """The task waits without a deadline when nothing is in grace; the pulse of a change that
    only starts a grace period (an empty delta) must wake it, or the channel stays forever."""
    tier = fake_tier()
    async with expiring(tier):
        change(tier, "subscribe", "a", "T.AAPL,T.MSFT")
        await trio.sleep(100)  # nothing in grace: the task has nothing to wait for but a pulse
        start = trio.current_time()
        change(tier, "unsubscribe", "a", "T.AAPL")
        await trio.sleep(1)
        change(tier, "unsubscribe", "a", "T.MSFT")  # a later deadline while the task waits for the first
        await trio.sleep(GRACE - 1 + 0.01)
        assert upstream(tier) == {"T.MSFT"}
        await trio.sleep(1)
        assert upstream(tier) == set()
        assert trio.current_time() == pytest.approx(start + GRACE + 1.01)


# --- the summary line ------------------------------------------------------------------------------


async def test_the_summary_line_reports_the_rates_of_its_interval(autojump_clock, caplog):
    tier = fake_tier()
    tier.link.reconnects = 2
    tier.hub.open_session("10.0.0.1:1", FakeConnection())  # type: ignore[arg-type]

    async def traffic() -> None:
        while True:
            await trio.sleep(0.5)
            tier.stats.events_in += 1000
            tier.stats.events_out += 250
            tier.stats.dropped_slow_consumer += 1

    with caplog.at_level(logging.INFO, logger="proxy.app.tier"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            await trio.sleep(0.25)  # halfway between traffic steps: each interval holds whole steps
            nursery.start_soon(tier_module._log_summary, tier, 10.0)
            await trio.sleep(10.1)
            tier.link.state = LinkState.DISCONNECTED
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:")]
    assert lines == [
        "summary: 1 clients, 2000 events/s in, 500 events/s out, 20 events dropped in all, "
        "0 slow-consumer disconnects, upstream connected, 2 reconnects",
        "summary: 1 clients, 2000 events/s in, 500 events/s out, 40 events dropped in all, "
        "0 slow-consumer disconnects, upstream disconnected, 2 reconnects",
    ]


# --- the rate history --------------------------------------------------------------------------------


def test_history_rates_are_the_change_per_second_between_samples():
    history = TierHistory()
    history.sample(1_000_000, 100, 10)
    assert not history.rates  # one sample: no rate yet
    history.sample(1_002_000, 2100, 410)  # two seconds later
    history.sample(1_002_500, 2600, 410)  # half a second later
    assert list(history.rates) == [RateSample(1_002_000, 1000, 200), RateSample(1_002_500, 1000, 0)]


def test_history_keeps_a_bounded_window_of_rates_and_outages():
    history = TierHistory()
    for second in range(TierHistory.RATE_SECONDS + 10):
        history.sample(second * 1000, second * 5, 0)
    assert len(history.rates) == TierHistory.RATE_SECONDS and history.rates[0].t_ms == 10_000  # the newest 600
    for n in range(TierHistory.OUTAGES_KEPT + 3):
        history.outage_began(n, f"drop {n}")
    history.outage_ended(1.5)
    history.outage_ended(9.0)  # no outage going on: nothing to end
    assert len(history.outages) == TierHistory.OUTAGES_KEPT and history.outages[0].reason == "drop 3"
    assert history.outages[-1].seconds == 1.5 and history.outages[-2].seconds is None


async def test_the_sampler_takes_one_sample_a_second(autojump_clock, monkeypatch):
    tier = fake_tier()
    wall = types.SimpleNamespace(time=lambda: 1_700_000_000 + trio.current_time())
    monkeypatch.setattr(tier_module, "time", wall)  # the sampler stamps samples with the wall clock

    async def traffic() -> None:
        await trio.sleep(0.05)  # between samples, never at the same instant
        while True:
            tier.stats.events_in += 300
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(traffic)
        nursery.start_soon(tier_module._sample_rates, tier)
        await trio.sleep(5.05)
        nursery.cancel_scope.cancel()
    assert [sample.events_in for sample in tier.history.rates] == [3000] * 5
    stamps = [sample.t_ms for sample in tier.history.rates]
    assert [later - earlier for earlier, later in zip(stamps, stamps[1:])] == [1000] * 4
