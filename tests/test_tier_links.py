"""Tier links under hostile and heavy clients (issue 13): simulator → firehose → filtered → clients.

The healthy client counts its events exactly: the simulator sends a ``BENCH.MARK`` event
in band before and after a window and counts what it sent per channel in between; the
client counts what it received between the two marks.
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter

import attrs
import pytest
import trio
import trio_websocket

from proxy.app import tier as tier_module
from proxy.core.backoff import Backoff
from proxy.core.protocol import parse_channel_list
from tests.conftest import (
    CLIENT_KEY,
    FIREHOSE_KEY,
    POLYGON_KEY,
    Client,
    authed_client,
    filtered_config,
    firehose_config,
    start_simulator,
    start_tier,
    wait_until,
)

HEALTHY = "T.*,Q.*,BENCH.MARK"


@attrs.define
class Counting:
    """A client that reads everything and counts its data events between the simulator's marks."""

    client: Client
    marks: list[int] = attrs.field(factory=list)
    window: Counter = attrs.field(factory=Counter)  # (ev, sym) → events between mark 1 and mark 2
    q_values: list[int] = attrs.field(factory=list)
    last_data_at: float | None = None
    longest_silence: float = 0.0

    async def run(self) -> None:
        while True:
            frame = await self.client.receive()
            now = trio.current_time()
            for event in frame:
                ev = event.get("ev")
                if ev == "status":
                    continue
                if ev == "BENCH":
                    self.marks.append(event["n"])
                    continue
                if self.last_data_at is not None:
                    self.longest_silence = max(self.longest_silence, now - self.last_data_at)
                self.last_data_at = now
                if len(self.marks) == 1:
                    self.window[(ev, event["sym"])] += 1
                    self.q_values.append(event["q"])

    def lost(self, sent: Counter) -> int:
        """Events the simulator sent in the window for T and Q that this client did not get."""
        expected = sum(count for channel, count in sent.items() if channel.split(".")[0] in ("T", "Q"))
        return expected - sum(self.window.values())


# Here the simulator, both tiers and every client share one thread, which heavy clients keep
# busy: a pong can wait behind seconds of other work on a loaded machine (5 s was exceeded at a
# load of 10 on 2 cores), which a tier in its own process would not see. These tests are not
# about noticing a stall (the one that is sets its own keepalive), so the links allow 30 s.
PATIENT = {"keepalive_interval_seconds": 1.0, "keepalive_timeout_seconds": 30.0}


async def start_chain(nursery, *, firehose=None, filtered=None, **simulator):
    sim = await start_simulator(nursery, **{"events_per_second": 1000, **simulator})
    fire = await start_tier(nursery, firehose_config(sim, **{**PATIENT, **(firehose or {})}))
    filt = await start_tier(nursery, filtered_config(fire, **{**PATIENT, **(filtered or {})}))
    await wait_until(lambda: filt.link.state.value == "connected", what="the tier link")
    return sim, fire, filt


async def counting_client(nursery, sim, filtered) -> Counting:
    healthy = Counting(await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe=HEALTHY))
    await wait_until(lambda: {"T.*", "Q.*", "BENCH.MARK"} <= sim.subscribed_channels(), what="healthy demand")
    nursery.start_soon(healthy.run)
    return healthy


def link_session(tier):
    """The session of the tier below, on ``tier`` (it said it was a proxy when it authenticated)."""
    return next(session for session in tier.hub.sessions if session.state.downstream_proxy)


def links_agree(firehose, filtered) -> bool:
    """Whether the firehose holds for the link exactly what the filtered tier holds upstream."""
    return {c.text for c in filtered.registry.upstream} | {"*"} == {c.text for c in link_session(firehose).state.channels}


async def churn(client: Client, cycles: int, per_cycle: int, pause: float) -> None:
    """Subscribe ``per_cycle`` new channels, unsubscribe the previous cycle's, again and again,
    two messages per ``pause`` (under the end-client rate limit); something else reads the answers."""
    previous: str | None = None
    for cycle in range(cycles):
        channels = ",".join(f"FMV.K{cycle}X{index}" for index in range(per_cycle))
        await client.send("subscribe", channels)
        if previous is not None:
            await client.send("unsubscribe", previous)
        previous = channels
        await trio.sleep(pause)


@pytest.mark.slow  # a load test (60,000 channels churned); the proxy-link fuzz covers the limits by default
async def test_a_churning_client_never_gets_the_tier_link_closed_or_throttled(nursery):
    # End clients of the firehose may send 10 control messages a second and hold 10,000
    # channels; the tier link carries every client's demand and must not be held to that.
    sim, firehose, filtered = await start_chain(
        nursery, firehose={"control_messages_per_second": 10, "max_channels_per_client": 10_000})
    healthy = await counting_client(nursery, sim, filtered)
    attacker = await authed_client(nursery, filtered.port, CLIENT_KEY)
    nursery.start_soon(attacker.collect, 120)
    await trio.sleep(0.3)
    sim.mark()
    await churn(attacker, cycles=12, per_cycle=5000, pause=0.5)
    await trio.sleep(0.5)
    sim.mark()
    await wait_until(lambda: len(healthy.marks) == 2, timeout=60, what="the closing mark")
    lost = healthy.lost(sim.window_counts)
    print(f"healthy client: {sum(healthy.window.values())} events, {lost} lost, longest silence "
          f"{healthy.longest_silence:.2f}s; link reconnects {filtered.link.reconnects}; firehose refused "
          f"{firehose.stats.control_rate_limited} for rate, {firehose.stats.control_errors} with an error")
    assert sum(healthy.window.values()) > 1000
    assert lost == 0
    assert healthy.q_values == sorted(healthy.q_values)  # in order, no duplicates
    assert len(set(healthy.q_values)) == len(healthy.q_values)
    assert filtered.link.reconnects == 0, filtered.link.last_error  # the link was never closed
    assert firehose.stats.control_rate_limited == 0 and firehose.stats.control_errors == 0
    assert not [s for s in attacker.statuses if s["status"] == "error"]
    # What the attacker was told it holds, the firehose holds for the link: nothing on a lie.
    await wait_until(lambda: links_agree(firehose, filtered), what="the link and the firehose agree")


async def _heavy_client(port: int, params: str, subscribed: trio.Event | None = None) -> None:
    """Subscribe ``params`` and read (without parsing: a 720 kB answer each) until cancelled."""
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/stocks") as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"action": "auth", "params": CLIENT_KEY}))
        await ws.get_message()
        await ws.send_message(json.dumps({"action": "subscribe", "params": params}))
        while '"subscribed to' not in await ws.get_message():
            pass
        if subscribed is not None:
            subscribed.set()
        while True:
            await ws.get_message()


class LongestSteps(trio.abc.Instrument):
    """The CPU time (not wall time: this machine is shared) of each task step of the tiers' own
    tasks. The router's steps are left out: it is what the others must not hold up."""

    def __init__(self) -> None:
        self.longest: dict[str, float] = {}
        self._started: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        spent, self._started = time.thread_time() - self._started, None
        name = task.name
        if name.startswith("proxy.") and not name.startswith(("proxy.sim.", "proxy.simulator", "proxy.app.tier._route_frames")):
            self.longest[name] = max(self.longest.get(name, 0.0), spent)

    def worst(self) -> tuple[str, float]:
        return max(self.longest.items(), key=lambda item: item[1])


@pytest.mark.slow  # a load test (50,000 channels at once)
async def test_big_subscribes_hold_nobody_up(nursery, monkeypatch):
    trims = []
    monkeypatch.setattr(tier_module, "_trim_allocator", lambda: trims.append(trio.current_time()))
    monkeypatch.setattr(tier_module, "TRIM_AFTER_CHANNELS", 40_000)
    sim, firehose, filtered = await start_chain(nursery, events_per_second=2000)
    healthy = await counting_client(nursery, sim, filtered)
    await trio.sleep(0.3)
    steps = LongestSteps()
    gc.disable()  # a collection can land in any step; the test measures the tiers' own work
    trio.lowlevel.add_instrument(steps)
    try:
        sim.mark()
        clients, per_client = 5, 10_000
        done = [trio.Event() for _ in range(clients)]
        async with trio.open_nursery() as heavy:
            for number in range(clients):
                params = ",".join(f"FMV.H{number}X{index}" for index in range(per_client))
                heavy.start_soon(_heavy_client, filtered.port, params, done[number])
            with trio.fail_after(60):
                for event in done:
                    await event.wait()
            await wait_until(lambda: firehose.registry.upstream_count >= clients * per_client, timeout=60,
                             what="every channel at the firehose")
            heavy.cancel_scope.cancel()  # they all leave
        await wait_until(lambda: len(filtered.hub.sessions) == 1, timeout=60, what="the heavy clients to leave")
        await wait_until(lambda: firehose.registry.upstream_count < 10, timeout=60, what="the firehose to let go")
        sim.mark()
        await wait_until(lambda: len(healthy.marks) == 2, timeout=90, what="the closing mark")
    finally:
        trio.lowlevel.remove_instrument(steps)
        gc.enable()
    lost = healthy.lost(sim.window_counts)
    name, longest = steps.worst()
    print(f"healthy client: {sum(healthy.window.values())} events, {lost} lost, longest silence "
          f"{healthy.longest_silence:.2f}s; longest step {longest * 1000:.1f} ms of CPU in {name}; "
          f"link reconnects {filtered.link.reconnects}")
    assert sum(healthy.window.values()) > 1000
    assert lost == 0 and (firehose.link.reconnects, filtered.link.reconnects) == (0, 0)
    assert trims  # 50,000 channels let go: the freed memory was handed back to the system
    # Handled in one step, a 10,000-channel subscribe took 130 ms of CPU here and the grace expiry
    # of 100,000 channels 1.7 s; in steps of 500 channels a step takes a few milliseconds (20 at
    # worst, when a table of many thousand entries grows), whatever the message.
    assert longest < 0.08, (name, longest)


async def test_a_subscribe_upstream_refuses_is_taken_back_from_the_clients_holding_it(nursery):
    # The firehose lets the tier link hold 3,000 channels: the link (`*` and 3 healthy channels)
    # then a client's 5,000 in chunks of 500: five chunks fit, five are refused.
    sim, firehose, filtered = await start_chain(nursery, firehose={"downstream_proxy_max_channels": 3000})
    healthy = await counting_client(nursery, sim, filtered)
    greedy = await authed_client(nursery, filtered.port, CLIENT_KEY)
    sim.mark()
    answer = await greedy.request("subscribe", ",".join(f"FMV.G{index}" for index in range(5000)))
    assert len(answer) == 5000 and answer[0]["message"] == "subscribed to: FMV.G0"  # acknowledged at once
    nursery.start_soon(greedy.collect, 60)
    greedy_session = next(s for s in filtered.hub.sessions if len(s.state.channels) > 1000)

    def refused() -> list[str]:
        return [s["message"] for s in greedy.statuses if s["message"].startswith("upstream refused ")]

    await wait_until(lambda: len(refused()) == 5, timeout=15, what="five refused chunks relayed")
    taken_back = {channel for message in refused() for channel in message.split(" ")[2].split(",")}
    assert taken_back == {f"FMV.G{index}" for index in range(2500, 5000)}
    assert all("channel limit" in message for message in refused())
    held_below = {c.text for c in filtered.registry.channels_of(greedy_session)}
    assert held_below == {c.text for c in greedy_session.state.channels} == {f"FMV.G{i}" for i in range(2500)}
    # Everything a client holds below, the firehose holds for the link: no channel is held on a lie.
    await wait_until(lambda: links_agree(firehose, filtered), what="the link and the firehose agree")
    sim.mark()
    await wait_until(lambda: len(healthy.marks) == 2, timeout=60, what="the closing mark")
    assert healthy.lost(sim.window_counts) == 0 and filtered.link.reconnects == 0


async def test_a_channel_polygon_refuses_is_taken_back_through_both_tiers(nursery):
    sim, firehose, filtered = await start_chain(nursery)
    sim.faults.refused_channels = frozenset({"FMV.BAD"})
    client = await authed_client(nursery, filtered.port, CLIENT_KEY)
    answer = await client.request("subscribe", "T.AAPL,FMV.BAD")
    assert [s["message"] for s in answer] == ["subscribed to: T.AAPL", "subscribed to: FMV.BAD"]
    with trio.fail_after(10):
        while not any(s["message"].startswith("upstream refused FMV.BAD ") for s in client.statuses):
            await client.receive()
    refusal = next(s for s in client.statuses if s["message"].startswith("upstream refused "))
    assert refusal["status"] == "error" and "unknown channel: FMV.BAD" in refusal["message"]  # Polygon's words
    session = next(iter(filtered.hub.sessions))
    assert {c.text for c in filtered.registry.channels_of(session)} == {"T.AAPL"}
    assert "FMV.BAD" not in {c.text for c in link_session(firehose).state.channels}
    count = len(client.events)
    await client.wait_events(count + 5)  # T.AAPL still flows
    assert {(e["ev"], e["sym"]) for e in client.events} == {("T", "AAPL")}
    assert "T.AAPL" in sim.subscribed_channels() and "FMV.BAD" not in sim.subscribed_channels()


async def test_the_reported_outage_covers_the_silence(nursery):
    # The firehose's keepalive notices a silent Polygon after 0.5-1.5 s; the outage began earlier,
    # with the last frame read, and that is what clients must be told.
    sim, firehose, filtered = await start_chain(
        nursery, firehose={"keepalive_interval_seconds": 0.5, "keepalive_timeout_seconds": 1.0})
    healthy = await counting_client(nursery, sim, filtered)
    await trio.sleep(0.5)
    sim.faults.stall(4.0)
    with trio.fail_after(20):
        while not any(s["status"] == "upstream_connected" for s in healthy.client.statuses):
            await trio.sleep(0.05)
    await trio.sleep(1.0)  # data again, so the client's silence is measured to its end
    message = next(s["message"] for s in healthy.client.statuses if s["status"] == "upstream_connected")
    reported = float(message.split("restored after ")[1].split("s;")[0])
    print(f"reported {reported:.1f}s; the client saw {healthy.longest_silence:.2f}s without data")
    assert reported >= 3.7, message  # the stall lasted 4 s; the keepalive noticed it 1-1.5 s in
    assert reported <= healthy.longest_silence + 0.3, (message, healthy.longest_silence)


async def _rival(port: int, until: float) -> int:
    """Another process with the same Polygon key that reconnects the moment it is evicted (a
    naive client): it evicts the firehose whenever it connects. Returns how often it connected."""
    connections = 0
    while trio.current_time() < until:
        try:
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/stocks") as ws:
                await ws.get_message()
                await ws.send_message(json.dumps({"action": "auth", "params": POLYGON_KEY}))
                if "auth_success" in await ws.get_message():
                    connections += 1
                    with trio.move_on_at(until):
                        while True:
                            await ws.get_message()
        except trio_websocket.ConnectionClosed:
            pass
    return connections


async def test_an_evicting_rival_gets_the_long_backoff_not_a_fight(nursery):
    # Polygon lets a new connection evict the key's oldest one (max_connections, close 1008).
    # A link that came straight back would evict the rival, which comes straight back: a loop
    # that costs both sides their data. Evicted, the link waits refused_seconds (1 s here).
    sim = await start_simulator(nursery, events_per_second=500)
    sim.faults.evict_oldest = True
    backoff = Backoff(initial_seconds=0.05, max_seconds=0.2, healthy_after_seconds=5, refused_seconds=1.0)
    firehose = await start_tier(nursery, firehose_config(sim, backoff=backoff, static_channels=parse_channel_list("T.*")))
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*")
    await client.wait_events(5)
    reconnects = firehose.link.reconnects
    rival = await _rival(sim.port, until=trio.current_time() + 2.5)
    ours = firehose.link.reconnects - reconnects
    print(f"in 2.5 s the rival connected {rival} times, the firehose retried {ours} times")
    assert rival >= 2  # it did evict the firehose, more than once
    assert ours <= 2.5 / backoff.refused_seconds + 1  # each eviction was followed by the long wait
    with trio.fail_after(10):
        while not any(s["status"] == "upstream_connected" for s in client.statuses):
            await client.receive()
    told = [s["status"] for s in client.statuses if s["status"].startswith("upstream_")]
    assert told[0] == "upstream_disconnected"  # the client was told when the link was evicted
    count = len(client.events)
    await client.wait_events(count + 5)


async def test_refused_at_auth_again_and_again_the_link_waits_and_clients_are_told_once(nursery):
    # Polygon answering max_connections to every attempt for 2 s, then auth_failed twice: the
    # firehose tries once per refused_seconds (0.5 s here), and the filtered proxy's clients hear
    # of the outage once and of the recovery once (relayed from the firehose).
    backoff = Backoff(initial_seconds=0.05, max_seconds=0.2, healthy_after_seconds=5, refused_seconds=0.5)
    sim, firehose, filtered = await start_chain(nursery, firehose={"backoff": backoff})
    healthy = await counting_client(nursery, sim, filtered)
    await trio.sleep(0.3)
    attempts = sim.auth_attempts
    sim.faults.force_max_connections = True
    sim.drop_all()
    await trio.sleep(2.0)
    during = sim.auth_attempts - attempts
    sim.faults.force_max_connections = False
    sim.faults.refuse_auth = 2
    await wait_until(lambda: firehose.link.state.value == "connected", timeout=10, what="recovery")
    print(f"{during} attempts in 2 s of max_connections, {sim.auth_attempts - attempts} in all")
    assert 2 <= during <= 2.0 / backoff.refused_seconds + 1
    assert sim.auth_attempts - attempts <= during + 3  # then two auth_failed, then success
    await wait_until(lambda: any(s["status"] == "upstream_connected" for s in healthy.client.statuses),
                     what="the recovery relayed")
    told = [s["status"] for s in healthy.client.statuses if s["status"].startswith("upstream_")]
    assert told == ["upstream_disconnected", "upstream_connected"]
    assert filtered.link.reconnects == 0  # the tier link itself never dropped
