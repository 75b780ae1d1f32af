"""Resume's stitching, without sockets: replay + live = exactly the matching events from F on,
once each, in order, whatever arrives while the replay is being served (Hypothesis).

The model is the tier's data path in miniature: the router journals each frame
(:class:`~proxy.core.journal.Journal`), routes it with the real
:func:`~proxy.core.routing.route_frame` and gives a client its events live unless its
:class:`~proxy.core.replay.Stitch` says the replay serves that seq; the subscribe is applied to
the registry in steps with frames routed in between (a big subscribe is); the replay reads the
memory ring in chunks, with live frames (and outages) arriving between chunks. What the client
gets is compared with a reference filter written from docs/protocol.md (``tests.helpers.selects``).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from proxy.core.journal import Journal
from proxy.core.protocol import format_channel_list, parse_channel_list, status_frame
from proxy.core.replay import JOURNAL_GAP, REPLAY_COMPLETE, ReplayRequest, Stitch
from proxy.core.routing import FrameError, route_frame
from proxy.core.subscriptions import SubscriptionRegistry
from tests.helpers import selects

SYMBOLS = ["AAPL", "MSFT", "BRK.A"]
CHANNELS = [f"{ev}.{sym}" for ev in ("T", "Q") for sym in SYMBOLS] + ["T.*", "Q.*"]
RELAYED = "upstream_disconnected"


@st.composite
def frames(draw: st.DrawFn) -> str:
    """An upstream frame: 0-4 events of T/Q over a few symbols, now and then a relayed outage
    status among them, or (rarely) a malformed frame the router drops."""
    if draw(st.integers(0, 30)) == 0:
        return '[{"ev":"T"'  # malformed: routed nowhere, replayed nowhere
    items = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 12)) == 0:
            items.append('{"ev":"status","status":"%s","message":"Polygon connection lost"}' % RELAYED)
        else:
            ev, sym = draw(st.sampled_from(["T", "Q"])), draw(st.sampled_from(SYMBOLS))
            items.append('{"ev":"%s","sym":"%s","q":%d}' % (ev, sym, draw(st.integers(0, 10**9))))
    return "[" + ",".join(items) + "]"


#: One step of the feed: a frame, or an outage the tier journals and broadcasts.
steps = st.one_of(frames(), st.just("LOST"))


class Model:
    """The router, the journal and one client, as the tier wires them."""

    def __init__(self, old: tuple[str, ...]) -> None:
        self.journal = Journal(memory_seconds=1e6, memory_bytes=10**12)
        self.registry: SubscriptionRegistry[str] = SubscriptionRegistry(clock=lambda: 0.0)
        self.registry.add_subscriber("client")
        if old:
            self.registry.subscribe("client", parse_channel_list(",".join(old)))
        self.stitch: Stitch | None = None
        self.live: list[dict] = []  # what the client's queue got, in order
        self.time_ns = 1_000

    def feed(self, step: str) -> None:
        self.time_ns += 1_000
        if step == "LOST":
            record = self.journal.upstream_lost("firehose connection lost", self.time_ns)
            self.broadcast(status_frame("upstream_disconnected", "firehose connection lost"), record.seq)
            return
        record = self.journal.frame(step, self.time_ns)
        try:
            routed = route_frame(step, self.registry)
        except FrameError:
            return
        mine: list[dict] = []
        if "client" in self.registry.everything_subscribers and routed.whole is not None:
            mine = json.loads(routed.whole)
        elif "client" in routed.batches:
            mine = json.loads(b"[" + routed.batches["client"][0] + b"]")
        if mine and (self.stitch is None or self.stitch.live(record.seq)):
            self.live.extend(mine)
        for status in routed.statuses:
            if status.get("status") == RELAYED:
                self.broadcast(status_frame(RELAYED, status["message"]), record.seq)

    def broadcast(self, frame: str, seq: int) -> None:
        if self.stitch is None or self.stitch.live(seq):
            self.live.extend(json.loads(frame))


def expected(model: Model, start_seq: int, hold_from: int, requested: str, held: str) -> list[dict]:
    """The reference: from the first record at or after F, each frame's events that the channels
    select (those asked for before the replay began, every channel held from then on), then the
    statuses the tier relayed for it; an outage record's status."""
    out: list[dict] = []
    for record in model.journal.ring.records_from(start_seq):
        if record.kind.name == "UPSTREAM_LOST":
            out.append({"ev": "status", "status": "upstream_disconnected", "message": record.reason})
            continue
        try:
            items = json.loads(record.data)
            if not all(isinstance(item, dict) for item in items):
                continue
        except ValueError:
            continue
        params = requested if record.seq < hold_from else held
        out += [item for item in items if item["ev"] != "status" and selects(params, item)]
        out += [{"ev": "status", "status": RELAYED, "message": item["message"]} for item in items
                if item["ev"] == "status"]
    return out


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(steps, max_size=30),
    old=st.lists(st.sampled_from(CHANNELS + ["*"]), max_size=3, unique=True),
    requested=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=4, unique=True),
    from_index=st.integers(0, 40),
    parts=st.integers(1, 3),
    during_steps=st.lists(st.lists(steps, max_size=4), min_size=3, max_size=3),
    chunk=st.integers(1, 5),
    during_replay=st.lists(st.lists(steps, max_size=3), max_size=12),
    after=st.lists(steps, max_size=5),
)
def test_replay_and_live_are_every_matching_event_from_f_once_in_order(
    before: list[str], old: list[str], requested: list[str], from_index: int, parts: int,
    during_steps: list[list[str]], chunk: int, during_replay: list[list[str]], after: list[str],
) -> None:
    model = Model(tuple(old))
    for step in before:
        model.feed(step)
    from_ns = 1_000 + from_index * 1_000  # anywhere in the feed, before it, or after its end
    channels = parse_channel_list(",".join(requested))
    hold_from = model.journal.next_seq
    model.stitch = stitch = Stitch(ReplayRequest(from_ns, from_ns / 1e6, channels), hold_from)
    model.live.clear()  # what came before the subscribe is not under test
    # The subscribe goes into the registry in `parts` steps, frames routed between them.
    new = [channel for channel in channels if channel not in model.registry.channels_of("client")]
    for index in range(parts):
        model.registry.subscribe("client", new[index::parts])
        for step in during_steps[index]:
            model.feed(step)
    held = set(model.registry.channels_of("client"))
    stitch.close_at(model.journal.next_seq - 1, held)
    start = model.journal.ring.seq_at_time(from_ns) if len(model.journal.ring) else model.journal.next_seq
    stitch.start_at(start)
    replayed: list[dict] = []
    rounds = iter(during_replay)
    while not stitch.done:
        assert stitch.cursor is not None
        for frame in stitch.take(model.journal.ring.records_from(stitch.cursor, chunk)):
            replayed += json.loads(frame)
        for step in next(rounds, []):
            model.feed(step)
    complete = json.loads(stitch.complete_frame())[0]
    for step in after:
        model.feed(step)

    got = replayed + model.live
    want = expected(model, start, hold_from, ",".join(requested), format_channel_list(held))
    assert got == want
    assert complete["status"] == REPLAY_COMPLETE
    data = [item for item in replayed if item["ev"] != "status"]
    assert complete["message"].startswith(f"{len(data)} events replayed")
    assert not any(item.get("status") == JOURNAL_GAP for item in replayed)


def test_a_hole_in_the_records_is_a_journal_gap_status() -> None:
    """Records the journal lacks (damage, a deleted block) are said, not skipped in silence."""
    journal = Journal(memory_seconds=1e6, memory_bytes=10**9)
    for index in range(6):
        journal.frame('[{"ev":"T","sym":"AAPL","q":%d}]' % index, 1_000 + index)
    stitch = Stitch(ReplayRequest(0, 0.0, parse_channel_list("T.AAPL")), hold_from=journal.next_seq)
    stitch.close_at(journal.next_seq - 1, parse_channel_list("T.AAPL"))
    records = journal.ring.records_from(1)
    frames = stitch.take(records[:2]) + stitch.take(records[4:])
    items = [item for frame in frames for item in json.loads(frame)]
    assert [item.get("q") for item in items] == [0, 1, None, 4, 5]
    assert items[2]["status"] == JOURNAL_GAP and "records 3..4" in items[2]["message"]
    assert stitch.done


def test_live_waits_for_the_end_of_the_subscribe() -> None:
    """Until the subscribe is wholly applied, live frames are the replay's; after, the seam is
    the journal's last seq then."""
    stitch = Stitch(ReplayRequest(0, 0.0, parse_channel_list("T.AAPL")), hold_from=10)
    assert stitch.live(None) and not stitch.live(10) and not stitch.live(500)
    stitch.close_at(12, parse_channel_list("T.AAPL"))
    assert not stitch.live(12) and stitch.live(13)
    with pytest.raises(ValueError):
        stitch.close_at(13, ())
