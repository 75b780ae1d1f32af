"""SubscriptionRegistry: unit cases and a Hypothesis state machine over its whole lifecycle."""

from __future__ import annotations

import gc
import tracemalloc

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from proxy.core.protocol import EVERYTHING_CHANNEL, Channel, parse_channel_list
from proxy.core.routing import FrameError, route_frame
from proxy.core.subscriptions import SubscriptionRegistry, UpstreamDelta

GRACE = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def channels(text: str) -> set[Channel]:
    return set(parse_channel_list(text))


def make_registry(static: str = "") -> tuple[SubscriptionRegistry, FakeClock]:
    clock = FakeClock()
    return SubscriptionRegistry(clock=clock, grace_seconds=GRACE, static=channels(static) if static else ()), clock


def test_overlapping_subscribers_cause_one_upstream_subscription():
    registry, _ = make_registry()
    first = registry.subscribe("a", channels("T.AAPL"))
    second = registry.subscribe("b", channels("T.AAPL,T.GOOGL"))
    assert first == UpstreamDelta(subscribe=tuple(channels("T.AAPL")))
    assert second == UpstreamDelta(subscribe=tuple(channels("T.GOOGL")))
    assert registry.upstream == channels("T.AAPL,T.GOOGL")


def test_unsubscribe_waits_for_the_grace_and_a_resubscribe_cancels_it():
    registry, clock = make_registry()
    registry.subscribe("a", channels("T.AAPL"))
    assert not registry.unsubscribe("a", channels("T.AAPL"))
    assert registry.next_deadline() == clock.now + GRACE
    clock.now += GRACE - 0.01
    assert not registry.expire()
    assert not registry.subscribe("b", channels("T.AAPL"))  # back inside the grace: nothing to send
    clock.now += 100
    assert not registry.expire()
    assert registry.upstream == channels("T.AAPL")
    registry.remove_subscriber("b")
    clock.now += GRACE
    assert registry.expire() == UpstreamDelta(unsubscribe=tuple(channels("T.AAPL")))
    assert registry.upstream == frozenset()


def test_type_wildcard_collapses_and_its_symbols_come_back_when_it_goes():
    registry, clock = make_registry()
    registry.subscribe("a", channels("T.AAPL"))
    delta = registry.subscribe("b", channels("T.*"))
    assert delta == UpstreamDelta(subscribe=(Channel("T", "*"),), unsubscribe=(Channel("T", "AAPL"),))
    assert registry.upstream == channels("T.*")
    assert not registry.remove_subscriber("b")  # T.* stays for its grace, covering T.AAPL
    clock.now += GRACE
    assert registry.expire() == UpstreamDelta(
        subscribe=(Channel("T", "AAPL"),), unsubscribe=(Channel("T", "*"),)
    )


def test_star_is_a_delivery_rule_not_an_upstream_channel():
    registry, _ = make_registry()
    assert not registry.subscribe("a", {EVERYTHING_CHANNEL})
    assert registry.upstream == frozenset()
    assert registry.everything_subscribers == {"a"}
    assert registry.channel_targets("T", "AAPL") == ()


def test_static_channels_are_always_held():
    registry, clock = make_registry("T.*,AM.*")
    assert registry.upstream == channels("T.*,AM.*")
    registry.subscribe("a", channels("T.AAPL,Q.MSFT"))
    assert registry.upstream == channels("T.*,AM.*,Q.MSFT")
    registry.remove_subscriber("a")
    clock.now += GRACE
    registry.expire()
    assert registry.upstream == channels("T.*,AM.*")


def test_each_subscriber_selected_once_despite_overlaps():
    registry, _ = make_registry()
    registry.subscribe("a", channels("T.AAPL,T.*"))
    registry.subscribe("b", channels("*,T.AAPL"))
    frame = '[{"ev":"T","sym":"AAPL","p":1},{"ev":"Q","sym":"AAPL","p":2}]'
    routed = route_frame(frame, registry)
    assert routed.whole == frame  # b holds *: the frame verbatim, and nothing else
    assert routed.batches == {"a": (b'{"ev":"T","sym":"AAPL","p":1}', 1)}


@pytest.mark.parametrize("holders", [{"a": "*"}, {"a": "*", "b": "T.AAPL"}, {}], ids=["only *", "mixed", "nobody"])
@pytest.mark.parametrize("frame", [
    '[{"ev":"T","sym":"AAPL"},{"ev":"status","status":"success","message":"subscribed to: T.AAPL"}]',
    '[{"ev":"T","sym":"AAPL"},{"ev":"\\u0073tatus","st\\u0061tus":"success"}]',  # no "status" in its text
], ids=["plain", "escaped"])
def test_statuses_are_taken_out_on_every_routing_path(holders, frame):
    registry, _ = make_registry()
    for who, held in holders.items():
        registry.subscribe(who, channels(held))
    routed = route_frame(frame, registry)
    assert routed.whole == b'[{"ev":"T","sym":"AAPL"}]' and routed.event_count == 1
    assert [status["status"] for status in routed.statuses] == ["success"]


@pytest.mark.parametrize("holders", [{"a": "*"}, {"a": "*", "b": "T.AAPL"}], ids=["only *", "mixed"])
@pytest.mark.parametrize("frame", ['{"ev":"T"}', '[{"ev":"T"},1]', '[{"ev":"T"}', "[[]]"])
def test_malformed_frames_are_refused_on_every_routing_path(holders, frame):
    registry, _ = make_registry()
    for who, held in holders.items():
        registry.subscribe(who, channels(held))
    with pytest.raises(FrameError):
        route_frame(frame, registry)


def test_routes_by_channel_follows_changes():
    registry, _ = make_registry()
    assert not registry.routes_by_channel
    registry.subscribe("a", channels("*,T.AAPL"))  # a `*` holder's other channels route nothing
    assert not registry.routes_by_channel
    registry.subscribe("b", channels("Q.*"))
    assert registry.routes_by_channel
    registry.remove_subscriber("b")
    assert not registry.routes_by_channel


def test_refused_channels_leave_every_holder_and_upstream():
    registry, clock = make_registry("AM.*")
    registry.subscribe("a", channels("T.AAPL,Q.*,FMV.X"))
    registry.subscribe("b", channels("T.AAPL,Q.MSFT"))
    registry.take_upstream_changes()
    losers, delta = registry.refuse(channels("T.AAPL,Q.*,AM.*,*"))
    assert {who: set(lost) for who, lost in losers.items()} == {"a": channels("T.AAPL,Q.*"), "b": channels("T.AAPL")}
    assert registry.channels_of("a") == channels("FMV.X") and registry.channels_of("b") == channels("Q.MSFT")
    # Q.* refused: Q.MSFT, covered by it until now, is asked for on its own
    assert delta == UpstreamDelta(subscribe=(Channel("Q", "MSFT"),))
    assert registry.upstream == channels("FMV.X,Q.MSFT") and not registry.in_grace()
    assert set(registry.take_upstream_changes()) == channels("T.AAPL,Q.*,AM.*,Q.MSFT")
    clock.now += 100
    assert not registry.expire()  # nothing refused comes back, the static AM.* included


def test_upstream_changes_are_reported_once_and_grace_expires_in_parts():
    registry, clock = make_registry()
    registry.subscribe("a", [Channel("T", f"S{i}") for i in range(1200)])
    assert len(registry.take_upstream_changes()) == 1200 and registry.take_upstream_changes() == []
    registry.remove_subscriber("a")
    assert registry.take_upstream_changes() == []  # in grace: still held upstream
    clock.now += GRACE
    parts = [registry.expire(limit=500) for _ in range(4)]
    assert [len(part.unsubscribe) for part in parts] == [500, 500, 200, 0]
    assert len(registry.take_upstream_changes()) == 1200 and registry.upstream == frozenset()
    assert registry.next_deadline() is None


def test_memory_comes_back_when_a_crowd_of_heavy_clients_leaves():
    """Dicts and sets keep their grown tables when emptied; the registry rebuilds them."""
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        registry, clock = make_registry()
        for client in range(10):
            registry.subscribe(client, [Channel("T", f"C{client}X{i}") for i in range(10_000)])
        held = tracemalloc.get_traced_memory()[0] - baseline
        for client in range(10):
            registry.remove_subscriber(client)
        clock.now += GRACE
        while registry.expire(limit=5000):
            pass
        registry.take_upstream_changes()
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert held > 20_000_000  # 100,000 channels held (their parsed objects included)
    assert left < 3_000_000, f"{left / 1e6:.1f} MB still held after every client left"


# --- the state machine ----------------------------------------------------------------------

SUBSCRIBERS = ("s1", "s2", "s3", "s4")
UNIVERSE = [
    Channel("T", "AAPL"), Channel("T", "MSFT"), Channel("T", "BRK.A"), Channel("T", "*"),
    Channel("Q", "AAPL"), Channel("Q", "*"), Channel("AM", "AAPL"), EVERYTHING_CHANNEL,
]
EVENTS = [("T", "AAPL"), ("T", "MSFT"), ("T", "BRK.A"), ("Q", "AAPL"), ("Q", "MSFT"),
          ("AM", "AAPL"), ("LULD", "AAPL")]
channel_sets = st.sets(st.sampled_from(UNIVERSE), min_size=1, max_size=4)


def collapse(held: set[Channel] | frozenset[Channel]) -> set[Channel]:
    """The reference wildcard collapse, written apart from the module under test."""
    upstream = {channel for channel in held if channel.ev_type != "*"}
    return {
        channel for channel in upstream
        if channel.symbol == "*" or Channel(channel.ev_type, "*") not in upstream
    }


def reference_selects(held: set[Channel], ev_type: str, symbol: str) -> bool:
    return any(
        channel.is_everything
        or (channel.ev_type == ev_type and channel.symbol in ("*", symbol))
        for channel in held
    )


def covered(channel: Channel, held: frozenset[Channel] | set[Channel]) -> bool:
    return any(other.covers(channel) for other in held)


class RegistryMachine(RuleBasedStateMachine):
    @initialize(static=st.sets(st.sampled_from(UNIVERSE[:-1]), max_size=2))
    def start(self, static):
        self.clock = FakeClock()
        self.static = static
        self.registry = SubscriptionRegistry(clock=self.clock, grace_seconds=GRACE, static=static)
        self.model: dict[str, set[Channel]] = {}
        self.replayed = set(collapse(static))
        self.unneeded_since: dict[Channel, float] = {}

    # --- steps ---------------------------------------------------------------------

    @rule(who=st.sampled_from(SUBSCRIBERS), wanted=channel_sets)
    def subscribe(self, who, wanted):
        self.model.setdefault(who, set()).update(wanted)
        self.apply(self.registry.subscribe(who, wanted))

    @rule(who=st.sampled_from(SUBSCRIBERS), unwanted=channel_sets)
    def unsubscribe(self, who, unwanted):
        if who in self.model:
            self.model[who] -= unwanted
        self.apply(self.registry.unsubscribe(who, unwanted))

    @rule(who=st.sampled_from(SUBSCRIBERS))
    def disconnect(self, who):
        self.model.pop(who, None)
        self.apply(self.registry.remove_subscriber(who))

    @rule(seconds=st.sampled_from([0.5, 1.0, GRACE - 0.001, GRACE, GRACE + 1, 30.0]))
    def advance_time(self, seconds):
        self.clock.now += seconds
        self.apply(self.registry.expire())

    @precondition(lambda self: self.model)
    @rule()
    def everyone_leaves_and_the_grace_passes(self):
        for who in list(self.model):
            self.disconnect(who)
        self.advance_time(GRACE)
        # (e) only the static channels remain
        assert self.registry.upstream == collapse(self.static)

    # --- the delta checks (b, c) -------------------------------------------------------

    def apply(self, delta: UpstreamDelta) -> None:
        before = set(self.replayed)
        for channel in delta.subscribe:
            assert channel not in before, f"re-subscribed {channel} already held"
            assert not channel.is_everything
            self.replayed.add(channel)
        for channel in delta.unsubscribe:
            assert channel in before, f"unsubscribed {channel} that was not held"
            self.replayed.discard(channel)
        wanted = self.wanted()
        for channel in delta.unsubscribe:
            if covered(channel, self.replayed):
                continue  # a wildcard now brings its events: dropping it loses nothing
            assert channel not in collapse(wanted), f"unsubscribed {channel} someone still needs"
            since = self.unneeded_since.get(channel)
            assert since is not None and self.clock.now - since >= GRACE, (
                f"unsubscribed {channel} before its grace had passed"
            )
        for channel in wanted:
            assert covered(channel, self.replayed), f"{channel} is wanted but not covered upstream"
        needed = collapse(wanted)
        for channel in self.replayed:
            if channel in needed:
                self.unneeded_since.pop(channel, None)
            else:
                self.unneeded_since.setdefault(channel, self.clock.now)
        for channel in list(self.unneeded_since):
            if channel not in self.replayed:
                del self.unneeded_since[channel]

    def wanted(self) -> set[Channel]:
        union = set(self.static)
        for held in self.model.values():
            union |= {channel for channel in held if not channel.is_everything}
        return union

    # --- invariants (a, b, d) ---------------------------------------------------------------

    @invariant()
    def upstream_is_the_collapsed_union_of_wanted_and_grace(self):
        grace = self.registry.in_grace()
        for channel, deadline in grace.items():
            assert self.clock.now < deadline <= self.clock.now + GRACE
            assert channel not in collapse(self.wanted())
        assert self.registry.upstream == collapse(self.wanted() | set(grace))

    @invariant()
    def replaying_every_delta_gives_the_upstream_set(self):
        assert self.registry.upstream == self.replayed

    @invariant()
    def routing_equals_a_brute_force_filter(self):
        for who, held in self.model.items():
            assert self.registry.channels_of(who) == held
        frame = "[" + ",".join(
            msgspec.json.encode({"ev": ev, "sym" if ev != "LULD" else "T": sym, "n": n}).decode()
            for n, (ev, sym) in enumerate(EVENTS)
        ) + ",{\"ev\":\"T\"}]"
        routed = route_frame(frame, self.registry)
        # `*` holders get the frame verbatim, whichever path routing took (all-`*` takes the fast one)
        assert (routed.whole, routed.event_count, routed.statuses) == (frame, len(EVENTS) + 1, [])
        star = {who for who, held in self.model.items() if EVERYTHING_CHANNEL in held}
        assert set(self.registry.everything_subscribers) == star
        for who, held in self.model.items():
            if who in star:
                assert who not in routed.batches
                continue
            expected = [n for n, (ev, sym) in enumerate(EVENTS) if reference_selects(held, ev, sym)]
            joined, count = routed.batches.get(who, (b"", 0))
            got = [event["n"] for event in msgspec.json.decode(b"[" + joined + b"]")] if count else []
            assert got == expected


RegistryMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestRegistryStateMachine = RegistryMachine.TestCase
