"""The tier link resumes by the firehose's journal seq (issue 17, item 3): the parts without
sockets (the request's parsing and checks, the link's side, where a resume starts), then real
tiers on 127.0.0.1 whose link is cut, or whose firehose restarts, while events flow."""

from __future__ import annotations

import json
import socket

import pytest
import trio
from hypothesis import given, strategies as st

from proxy.app.tier import run_tier
from proxy.core.protocol import (
    EVERYTHING_CHANNEL, SeqResume, format_channel_list, parse_client_message, subscription_message,
)
from proxy.core.errors import ClientMessageError
from proxy.core.replay import JOURNAL_SEQ, RESUME_STATUSES, ReplayRequest, Stitch, journal_seq_frame, resume_start
from proxy.core.resume import LinkResume
from proxy.core.session import Outcome, Phase, ProxyLimits, SessionState
from proxy.net.journal_store import JOURNAL_ID_NAME, journal_lineage, read_blocks
from proxy.core.journal import Journal, JournalRing, RecordKind
from proxy.net.replay import JournalSource
from tests.helpers import (
    ALL_STREAM, CLIENT_KEY, FIREHOSE_KEY, authed_client, filtered_config, firehose_config, start_chain,
    start_simulator, start_tier, wait_until,
)

ALL = format_channel_list(ALL_STREAM)
JOURNAL = "0123456789abcdef0123456789abcdef"


# --- the request, without sockets ----------------------------------------------------------------


def session(*, proxy: bool, replay_max_seconds: float = 600.0) -> SessionState:
    state = SessionState(accepted_keys=frozenset({"k"}), proxy_limits=ProxyLimits(),
                         replay_max_seconds=replay_max_seconds)
    role = ',"role":"proxy"' if proxy else ""
    state.receive('{"action":"auth","params":"k"%s}' % role)
    assert state.phase is Phase.AUTHENTICATED and state.downstream_proxy is proxy
    return state


def resume_message(params: str = "*,T.AAPL", **fields: object) -> str:
    return json.dumps({"action": "subscribe", "params": params, **fields})


def test_the_link_builds_the_request_the_tier_parses() -> None:
    message = subscription_message("subscribe", parse_client_message('{"action":"subscribe","params":"*,T.A"}')
                                   .channels, SeqResume(42, JOURNAL))  # type: ignore[union-attr]
    parsed = parse_client_message(message)
    assert parsed.resume == SeqResume(42, JOURNAL)  # type: ignore[union-attr]
    assert [c.text for c in parsed.channels] == ["*", "T.A"]  # type: ignore[union-attr]


@pytest.mark.parametrize("fields, says", [
    (dict(from_seq="5", journal=JOURNAL), '"from_seq" must be a journal seq'),
    (dict(from_seq=0, journal=JOURNAL), '"from_seq" must be a journal seq'),
    (dict(from_seq=True, journal=JOURNAL), '"from_seq" must be a journal seq'),
    (dict(from_seq=1.5, journal=JOURNAL), '"from_seq" must be a journal seq'),
    (dict(from_seq=5), '"journal" must name the journal'),
    (dict(from_seq=5, journal=""), '"journal" must name the journal'),
    (dict(from_seq=5, journal="x" * 65), '"journal" must name the journal'),
    (dict(journal=JOURNAL), '"from_seq" must be a journal seq'),
    (dict(from_seq=5, journal=JOURNAL, **{"from": -1000}), "cannot come together"),
])
def test_malformed_resume_requests_are_errors(fields: dict, says: str) -> None:
    with pytest.raises(ClientMessageError) as raised:
        parse_client_message(resume_message(**fields))
    assert raised.value.kind == "bad_from" and says in raised.value.message
    reaction = session(proxy=True).receive(resume_message(**fields))
    assert reaction.outcome is Outcome.REPLAY_REFUSED and not reaction.subscribe


def test_an_ordinary_client_sending_from_seq_gets_an_error_and_nothing_applied() -> None:
    state = session(proxy=False)
    reaction = state.receive(resume_message(from_seq=5, journal=JOURNAL))
    assert reaction.outcome is Outcome.REPLAY_REFUSED and reaction.replay is None and not reaction.subscribe
    assert state.channels == set()
    (status,) = json.loads(reaction.replies[0])
    assert status["status"] == "error" and "resumes a downstream proxy's link" in status["message"]
    assert "nothing of this subscribe was applied" in status["message"]


def test_a_proxy_link_resumes_the_star_channel() -> None:
    state = session(proxy=True)
    refused = state.receive(resume_message("T.AAPL", from_seq=5, journal=JOURNAL))
    assert refused.outcome is Outcome.REPLAY_REFUSED and "must hold *" in refused.replies[0]
    reaction = state.receive(resume_message(from_seq=5, journal=JOURNAL))
    assert reaction.replay is not None and (reaction.replay.from_seq, reaction.replay.journal) == (5, JOURNAL)
    assert {c.text for c in reaction.subscribe} == {"*", "T.AAPL"}


def test_a_tier_without_a_journal_applies_the_links_subscribe_and_says_it_cannot_resume() -> None:
    state = session(proxy=True, replay_max_seconds=0.0)
    reaction = state.receive(resume_message(from_seq=5, journal=JOURNAL))
    assert reaction.replay is None and {c.text for c in reaction.subscribe} == {"*", "T.AAPL"}
    statuses = [json.loads(reply)[0]["status"] for reply in reaction.replies]
    assert statuses[-2:] == ["replay_partial", "replay_complete"]


@given(same=st.booleans(), wanted=st.integers(1, 300), hold_from=st.integers(1, 300), reach=st.integers(1, 300))
def test_where_a_resume_starts(same: bool, wanted: int, hold_from: int, reach: int) -> None:
    reach = min(reach, hold_from)
    request = ReplayRequest(0, 0.0, (), from_seq=wanted, journal=JOURNAL if same else "another")
    start, partial = resume_start(request, JOURNAL, hold_from, reach)
    assert reach <= start <= hold_from  # never before what is held, never past live's seam
    if same and reach <= wanted <= hold_from:
        assert (start, partial) == (wanted, None)  # exactly where the link left off
    else:
        assert partial is not None and json.loads(partial)[0]["status"] == "replay_partial"
        assert start == (reach if same and wanted < reach else hold_from)


# --- the link's side, without sockets ------------------------------------------------------------


def mark(seq: int, journal: str = JOURNAL) -> list[dict]:
    return json.loads(journal_seq_frame(seq, journal))


def status(kind: str, message: str = "m") -> list[dict]:
    return [{"ev": "status", "status": kind, "message": message}]


def test_marks_are_the_links_and_a_resume_asks_for_the_record_after_the_last() -> None:
    link = LinkResume()
    link.begin_connection()
    assert link.request() is None  # the first connection: nothing to resume
    assert link.read(mark(7)) == (True, None) and link.read(mark(9)) == (True, None)
    # anything else stays in the stream: data, other statuses, resume statuses nobody asked for
    for frame in ([{"ev": "T", "sym": "A"}], status("upstream_connected"), status("replay_complete"),
                  mark(10) + [{"ev": "T", "sym": "A"}]):
        assert link.read(frame) == (False, None)
    assert link.position == (JOURNAL, 9)
    link.begin_connection()
    assert link.request() == SeqResume(10, JOURNAL) and link.resuming
    assert link.read(mark(12)) == (True, None)
    done, outcome = link.read(status("replay_complete"))
    assert done and outcome is not None and outcome.complete and outcome.asked == SeqResume(10, JOURNAL)
    assert not link.resuming and link.position == (JOURNAL, 12)


def test_a_resume_that_lost_records_says_why() -> None:
    link = LinkResume(position=("old", 3))
    link.begin_connection()
    assert link.request() == SeqResume(4, "old")
    assert link.read(status("replay_partial", "cannot resume: another journal")) == (True, None)
    assert link.read(mark(50, "new")) == (True, None)
    assert link.read(status("journal_gap", "records 60..70 are missing")) == (True, None)
    _, outcome = link.read(status("replay_complete"))
    assert outcome is not None and not outcome.complete
    assert outcome.lost == ("cannot resume: another journal", "records 60..70 are missing")
    assert link.position == ("new", 50)


def test_the_journal_id_lasts_as_long_as_the_journal_on_disk(tmp_path) -> None:
    first = journal_lineage(tmp_path, continuing=False)
    assert (tmp_path / JOURNAL_ID_NAME).read_text().strip() == first
    assert journal_lineage(tmp_path, continuing=True) == first
    assert journal_lineage(tmp_path, continuing=False) != first  # seqs begin again: a new lineage
    (tmp_path / JOURNAL_ID_NAME).write_text("damaged")
    assert len(journal_lineage(tmp_path, continuing=True)) == 32


# --- real tiers ----------------------------------------------------------------------------------


def link_session(tier):
    return next(session for session in tier.hub.sessions if session.state.downstream_proxy)


def q_values(client) -> list[int]:
    return [event["q"] for event in client.events if "q" in event]


def assert_no_resume_chatter(client) -> None:
    assert not [s for s in client.statuses if s["status"] in RESUME_STATUSES], client.statuses


async def test_a_link_cut_while_events_flow_loses_nothing_and_repeats_nothing(nursery) -> None:
    """Simulator → firehose (memory journal) → filtered → a client holding every stream with a gapless
    `q`: the firehose closes the link, gracefully and abruptly, while 2,000 events/s flow; each time
    the link resumes at the record after its last mark, and the client's `q` runs on without a gap
    or a duplicate; it hears of each outage, and that nothing was lost, and no resume chatter."""
    chain = await start_chain(nursery, firehose=dict(static_channels=ALL_STREAM))
    client = await authed_client(nursery, chain.filtered.port, CLIENT_KEY, subscribe=ALL)
    await client.more_events(200)
    for cut in range(3):
        link = link_session(chain.firehose)
        if cut == 1:  # abrupt: the TCP connection ends under both ends' feet
            link.connection.transport.sock.shutdown(socket.SHUT_RDWR)
        else:
            link.close_request = (1001, "test: cut the link")
            link.notify()
        lost_before = sum(s["status"] == "upstream_connected" for s in client.statuses)
        await client.wait_status("upstream_disconnected")
        with trio.fail_after(30):
            while sum(s["status"] == "upstream_connected" for s in client.statuses) == lost_before:
                await client.receive()
        await client.more_events(300)
    sequence = q_values(client)
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence))), "a gap or a duplicate"
    restored = [s["message"] for s in client.statuses if s["status"] == "upstream_connected"]
    assert len(restored) == 3 and all("no events were lost" in message for message in restored), restored
    assert chain.firehose.stats.replays == 3
    assert_no_resume_chatter(client)


def stoppable_tier(scopes: list[trio.CancelScope]):
    """A tier runner for ``nursery.start`` whose every run gets a cancel scope of its own, appended
    to ``scopes``: ``scopes[-1].cancel()`` stops the last one started (a firehose to restart)."""

    async def run(config, task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await run_tier(config, task_status=task_status)

    return run


async def test_a_full_filtered_link_outage_with_a_disk_journal_loses_nothing(nursery, tmp_path) -> None:
    """The firehose (JOURNAL_DIR, memory journal of 0.3 s) stops and starts again on the same port and
    directory while the filtered tier waits: its client gets every event the firehose journaled
    before it stopped and after it started again, each once, in order; what the simulator sent while
    the firehose was down is a gap, reported where it falls (the firehose's own journal says it was
    not running)."""
    sim = await start_simulator(nursery, events_per_second=2000)
    scopes: list[trio.CancelScope] = []
    run_firehose = stoppable_tier(scopes)

    overrides = dict(static_channels=ALL_STREAM, journal_dir=str(tmp_path), journal_memory_seconds=0.3)
    firehose = await nursery.start(run_firehose, firehose_config(sim, **overrides))
    filtered = await start_tier(nursery, filtered_config(firehose))
    await wait_until(lambda: filtered.link.state.value == "connected", what="the tier link")
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe=ALL)
    await client.more_events(300)

    scopes[-1].cancel()  # the firehose stops (its writer writes what it holds)
    await client.wait_status("upstream_disconnected")
    await trio.sleep(0.5)  # down a while: the filtered proxy's reconnects find nobody
    await nursery.start(run_firehose, firehose_config(sim, port=firehose.port, **overrides))
    with trio.fail_after(30):
        while not any("no events were lost" in s["message"] for s in client.statuses
                      if s["status"] == "upstream_connected"):
            await client.receive()
    await client.more_events(300)
    assert_no_resume_chatter(client)
    assert any("was not running" in s["message"] for s in client.statuses if s["status"] == "upstream_disconnected")

    await trio.sleep(0.5)  # the writer's blocks gather for 100 ms
    records = await trio.to_thread.run_sync(lambda: [r for block in read_blocks(str(tmp_path)) for r in block])
    journaled = [event["q"] for record in records if record.kind is RecordKind.FRAME
                 for event in json.loads(record.data) if "q" in event]
    received = q_values(client)
    start = journaled.index(received[0])
    length = min(len(received), len(journaled) - start)
    assert received[:length] == journaled[start:start + length], "not the journal's events, once each, in order"
    restart = next(index for index, record in enumerate(records) if record.kind is RecordKind.UPSTREAM_LOST)
    after = [event["q"] for record in records[restart:] if record.kind is RecordKind.FRAME
             for event in json.loads(record.data) if "q" in event]
    assert after and after[0] in received[:length], "the comparison reaches past the restart"
    assert len(received) == len(set(received))
    before = journaled[:journaled.index(after[0])]
    assert after[0] > before[-1] + 1, "the simulator's events while the firehose was down are a gap"


async def test_a_firehose_restarted_without_a_journal_dir_is_a_reported_loss(nursery) -> None:
    """A memory-only firehose restarts: its journal is another lineage, so the link cannot resume;
    the firehose says so, and the filtered proxy's clients hear that events were lost (and no
    resume chatter), then live events again."""
    sim = await start_simulator(nursery, events_per_second=2000)
    scopes: list[trio.CancelScope] = []
    run_firehose = stoppable_tier(scopes)

    firehose = await nursery.start(run_firehose, firehose_config(sim, static_channels=ALL_STREAM))
    filtered = await start_tier(nursery, filtered_config(firehose))
    await wait_until(lambda: filtered.link.state.value == "connected", what="the tier link")
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe=ALL)
    await client.more_events(100)
    old_position = filtered.link.resume.position
    assert old_position is not None and old_position[0] == firehose.journal_source.journal_id
    scopes[-1].cancel()
    await client.wait_status("upstream_disconnected")
    await nursery.start(run_firehose, firehose_config(sim, port=firehose.port, static_channels=ALL_STREAM))
    restored = await client.wait_status("upstream_connected", timeout=30)
    assert "events of that window are lost" in restored["message"]
    assert f"journal {old_position[0]} is not this proxy's journal" in restored["message"]
    await client.more_events(100)
    assert_no_resume_chatter(client)
    assert filtered.link.resume.position[0] != old_position[0]  # it follows the new journal now


async def test_an_ordinary_client_sending_from_seq_over_the_wire(nursery) -> None:
    chain = await start_chain(nursery, firehose=dict(static_channels=ALL_STREAM))
    client = await authed_client(nursery, chain.firehose.port, FIREHOSE_KEY)
    await client.ws.send_message(resume_message("*", from_seq=1, journal=JOURNAL))
    (answer,) = await client.next_status()
    assert answer["status"] == "error" and "resumes a downstream proxy's link" in answer["message"]
    assert chain.firehose.registry.channels_of(next(s for s in chain.firehose.hub.sessions
                                                    if not s.state.downstream_proxy)) == set()
    with trio.move_on_after(0.5):
        await client.receive()
        raise AssertionError("a refused subscribe brought events")
    # and marks never reach an ordinary client, even one holding *
    await client.request("subscribe", "*")
    await client.more_events(50)
    assert not [s for s in client.statuses if s["status"] == JOURNAL_SEQ]


# --- serving a resume by seq, without sockets (Hypothesis) ---------------------------------------


def feed_frame(index: int, events: int) -> str:
    return "[" + ",".join('{"ev":"T","sym":"S%d","q":%d}' % (n % 3, index * 10 + n) for n in range(events)) + "]"


@given(before=st.lists(st.integers(0, 3), max_size=30), during=st.lists(st.integers(0, 3), max_size=5),
       wanted=st.integers(1, 40), ring_records=st.integers(1, 40), same=st.booleans())
def test_a_resume_by_seq_serves_every_record_from_there_once(before: list[int], during: list[int], wanted: int,
                                                              ring_records: int, same: bool) -> None:
    """Records journaled before the resume, more while its subscribe is applied; the ring keeps only
    the last ``ring_records``: the resume serves, from where it starts, every record to its end
    once, in order, with a mark after each write that never goes back and ends at the end; a
    start it cannot make is said first, never silently."""
    journal = Journal(memory_seconds=1e6, memory_bytes=10**12)
    frames = {}
    for index, events in enumerate(before):
        frames[journal.frame(feed_frame(index, events), index).seq] = feed_frame(index, events)
    hold_from = journal.next_seq
    for index, events in enumerate(during, start=len(before)):
        frames[journal.frame(feed_frame(index, events), index).seq] = feed_frame(index, events)
    # a ring that evicted all but its last `ring_records` records
    ring = JournalRing(max_seconds=1e6, max_bytes=10**12)
    for record in journal.ring.records_from(journal.ring.first_seq or 1)[-ring_records:] if len(journal.ring) else []:
        ring.append(record)
    ring.evicted = len(journal.ring) - len(ring)
    journal.ring = ring
    request = ReplayRequest(0, 0.0, (EVERYTHING_CHANNEL,), from_seq=wanted, journal=JOURNAL if same else "x")
    source = JournalSource(journal, None, started_ns=0, replay_max_seconds=600.0, journal_id=JOURNAL)
    stitch = Stitch(request, hold_from)
    stitch.close_at(journal.next_seq - 1, (EVERYTHING_CHANNEL,))
    sent: list[str | bytes] = []
    marks: list[int] = []

    async def send(out) -> bool:
        sent.extend(out)
        if out and stitch.cursor is not None:
            marks.append(stitch.cursor - 1)
        return True

    trio.run(source.replay, stitch, send)
    reach = ring.first_seq if ring.first_seq is not None else journal.next_seq
    valid = same and wanted <= hold_from
    chosen = max(wanted, reach) if valid else hold_from
    through = journal.next_seq - 1
    # a start the ring evicted already (only this model's tiny ring does that to hold_from) is a journal_gap
    expected = [event for seq in range(max(chosen, reach), through + 1) for event in json.loads(frames[seq])]
    got = [event for frame in sent for event in json.loads(frame) if event.get("ev") != "status"]
    assert got == expected
    statuses = [event["status"] for frame in sent for event in json.loads(frame) if event.get("ev") == "status"]
    assert statuses[-1] == "replay_complete"
    assert ("replay_partial" in statuses) == (not valid or wanted < reach)
    assert ("journal_gap" in statuses) == (chosen < reach and chosen <= through)
    assert marks == sorted(marks) and marks[-1] == through
