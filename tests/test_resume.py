"""Resume ("from"): a subscribe's checks without sockets, then real tiers on 127.0.0.1 serving
replays to plain clients while frames keep coming (docs/protocol.md, "Resume")."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
import trio
from websockets.sync.client import connect as sync_connect

from proxy.core.journal import RecordKind
from proxy.core.outbox import SlowClientPolicy
from proxy.core.protocol import format_channel_list
from proxy.core.session import REPLAY_CONTROL_COST, Outcome, Phase, SessionState
from tests.helpers import (
    ALL_STREAM, CLIENT_KEY, FIREHOSE_KEY, LIVENESS_SECONDS, Neighbour, SlowReader, authed_client, connect,
    handshake, masked, read_statuses, selects, send_all, start_chain, start_firehose, wait_until,
)

NOW_NS = 1_800_000_000_000 * 1_000_000
ALL = format_channel_list(ALL_STREAM)
_split = msgspec.json.Decoder(list[msgspec.Raw]).decode


# --- the subscribe's checks, without sockets ---------------------------------------------------


def session(**overrides: object) -> SessionState:
    state = SessionState(accepted_keys=frozenset({"k"}), **{"replay_max_seconds": 600.0, **overrides})  # type: ignore[arg-type]
    state.receive('{"action":"auth","params":"k"}')
    assert state.phase is Phase.AUTHENTICATED
    return state


def subscribe(state: SessionState, params: str, from_: object, now: float = 0.0):
    message = json.dumps({"action": "subscribe", "params": params, "from": from_})
    return state.receive(message, now, wall_ns=NOW_NS)


def test_from_is_resolved_against_the_wall_clock() -> None:
    state = session()
    reaction = subscribe(state, "T.AAPL,Q.*", -5000)
    assert reaction.replay is not None and reaction.replay.from_ns == NOW_NS - 5_000_000_000
    assert [c.text for c in reaction.replay.channels] == ["T.AAPL", "Q.*"]
    assert [c.text for c in reaction.subscribe] == ["T.AAPL", "Q.*"]
    other = session()
    exact = subscribe(other, "T.AAPL", NOW_NS // 1_000_000 - 1234)
    assert exact.replay is not None and exact.replay.from_ns == NOW_NS - 1_234_000_000


@pytest.mark.parametrize("from_, says", [
    ("yesterday", '"from" must be a number'),
    (None, '"from" must be a number'),
    (True, '"from" must be a number'),
    ([1], '"from" must be a number'),
    (NOW_NS // 1_000_000 + 60_000, "is in the future"),
    (-601_000, "this proxy replays at most the last 600 s"),
    (0, "this proxy replays at most"),
])
def test_bad_from_values_are_refused_and_nothing_is_applied(from_: object, says: str) -> None:
    state = session()
    reaction = subscribe(state, "T.AAPL", from_)
    assert reaction.outcome is Outcome.REPLAY_REFUSED and reaction.replay is None
    assert not reaction.subscribe and state.channels == set()
    (status,) = json.loads(reaction.replies[0])
    assert status["status"] == "error" and says in status["message"], status
    assert "nothing of this subscribe was applied" in status["message"]


def test_from_with_star_without_a_journal_or_during_a_replay_is_refused() -> None:
    assert "cannot replay the * channel" in subscribe(session(), "T.AAPL,*", -1000).replies[0]
    assert "keeps no journal" in subscribe(session(replay_max_seconds=0.0), "T.AAPL", -1000).replies[0]
    busy = session()
    busy.replaying = True
    assert "a replay is already running" in subscribe(busy, "T.AAPL", -1000).replies[0]
    for state in (busy,):
        assert state.channels == set()
    unsubscribe = session().receive(json.dumps({"action": "unsubscribe", "params": "T.AAPL", "from": -5}))
    assert unsubscribe.outcome is Outcome.REPLAY_REFUSED and "is only for subscribe" in unsubscribe.replies[0]


def test_a_replay_counts_against_the_control_message_budget() -> None:
    state = session(control_rate=50.0, control_burst=100.0)
    begun = [subscribe(state, f"T.S{index}", -1000).replay is not None for index in range(12)]
    # a burst of 100 control messages, less the auth, holds 99 // REPLAY_CONTROL_COST replays
    assert begun.count(True) == 99 // REPLAY_CONTROL_COST
    refused = subscribe(state, "T.LATE", -1000)
    assert refused.outcome is Outcome.REPLAY_REFUSED and "counts as 10 control messages" in refused.replies[0]
    assert all(channel.symbol != "LATE" for channel in state.channels)


# --- real tiers ------------------------------------------------------------------------------------


def raw_events(frames: list[str]) -> tuple[list[bytes], list[dict]]:
    """The data events of ``frames`` as their bytes, and the statuses, in order."""
    data, statuses = [], []
    for frame in frames:
        for raw in _split(frame):
            item = json.loads(bytes(raw))
            if item.get("ev") == "status":
                statuses.append(item)
            else:
                data.append(bytes(raw))
    return data, statuses


def journaled_from(tier, from_ns: int, params: str) -> list[bytes]:
    """The original bytes of every journaled event ``params`` selects, received at or after ``from_ns``."""
    wanted = []
    for record in tier.journal.ring.records_from(tier.journal.ring.first_seq):
        if record.kind is RecordKind.FRAME and record.received_ns >= from_ns:
            wanted += [bytes(raw) for raw in _split(record.data)
                       if selects(params, json.loads(bytes(raw))) and json.loads(bytes(raw))["ev"] != "status"]
    return wanted


def resume_with_websockets(url: str, key: str, params: str, from_ms: float, after: int) -> list[str]:
    """A plain `websockets` client: connect, auth, subscribe with "from"; every frame up to and
    including replay_complete, then ``after`` frames more."""
    frames: list[str] = []
    with sync_connect(url, open_timeout=LIVENESS_SECONDS, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=LIVENESS_SECONDS))[0]["status"] == "connected"
        ws.send(json.dumps({"action": "auth", "params": key}))
        assert json.loads(ws.recv(timeout=LIVENESS_SECONDS))[0]["status"] == "auth_success"
        ws.send(json.dumps({"action": "subscribe", "params": params, "from": from_ms}))
        while not frames or '"replay_complete"' not in frames[-1]:
            frames.append(ws.recv(timeout=LIVENESS_SECONDS))
        for _ in range(after):
            frames.append(ws.recv(timeout=LIVENESS_SECONDS))
    return frames


async def test_a_plain_websockets_client_resumes_byte_for_byte_while_frames_keep_coming(nursery) -> None:
    """The answer, then the journaled events of those channels from F on (their original bytes, in
    upstream order), then replay_complete, then live: the q sequence (gapless upstream for these
    types) runs on across the seam without a gap or a duplicate."""
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM)
    await wait_until(lambda: firehose.stats.frames_in > 150, what="1.5 s of frames")
    from_ms = time.time() * 1000 - 1000
    url = f"ws://127.0.0.1:{firehose.port}/stocks"
    frames = await trio.to_thread.run_sync(resume_with_websockets, url, FIREHOSE_KEY, ALL, from_ms, 30)
    answer = json.loads(frames[0])
    assert [status["message"] for status in answer] == [f"subscribed to: {c}" for c in ALL.split(",")]
    end = next(index for index, frame in enumerate(frames) if '"replay_complete"' in frame)
    replayed, statuses = raw_events(frames[1:end])
    assert statuses == []
    # every replayed event is the journal's, byte for byte, and in its order
    assert replayed == journaled_from(firehose, round(from_ms * 1000) * 1000, ALL)[:len(replayed)]
    assert len(replayed) > 500
    live, _ = raw_events(frames[end + 1:])
    sequence = [item["q"] for item in map(json.loads, replayed + live) if "q" in item]  # FMV carries none
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence))), "a gap or a duplicate at the seam"
    (complete,) = json.loads(frames[end])
    assert complete["message"].startswith(f"{len(replayed)} events replayed")
    assert firehose.stats.replays == 1 and firehose.stats.replay_events == len(replayed)


async def test_the_filtered_proxy_replays_its_own_journal_and_keeps_other_channels_live(nursery) -> None:
    """A client already holding channels asks to replay others: it gets the replay of those, and
    its own channels go on live after it, with no gap."""
    chain = await start_chain(nursery, firehose=dict(static_channels=ALL_STREAM))
    client = await authed_client(nursery, chain.filtered.port, CLIENT_KEY, subscribe="Q.*,LULD.*,FMV.*")
    await client.more_events(200)
    await trio.sleep(1.0)
    await client.ws.send_message(json.dumps({"action": "subscribe", "params": "T.*", "from": -800}))
    status = await client.wait_status("replay_complete")
    assert status["message"].split()[0].isdigit()
    await client.more_events(300)
    # Q/LULD/FMV live before, the replay's T events interleaved with them from F, then all live:
    # after the seam, q runs on without a gap, and no q came twice
    seen = [event["q"] for event in client.events if "q" in event]
    assert len(seen) == len(set(seen))
    seam = client.events.index(next(e for e in client.events if e["ev"] == "T"))
    tail = [event["q"] for event in client.events[-300:] if "q" in event]
    assert tail == list(range(tail[0], tail[0] + len(tail)))
    assert seam > 0


async def test_bad_from_values_over_the_wire_get_an_error_and_nothing(nursery) -> None:
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    future = int(time.time() * 1000) + 3_600_000
    for params, from_ in [("T.AAPL", "1h"), ("T.AAPL", future), ("T.AAPL", -4_000_000), ("*", -1000)]:
        await client.ws.send_message(json.dumps({"action": "subscribe", "params": params, "from": from_}))
        (status,) = await client.next_status()
        assert status["status"] == "error" and "nothing of this subscribe was applied" in status["message"]
    assert firehose.registry.channels_of(next(iter(firehose.hub.sessions))) == set()
    assert firehose.stats.replays_refused == 4 and firehose.stats.replays == 0
    with trio.move_on_after(0.5):
        await client.receive()
        raise AssertionError("a refused subscribe brought events")


async def test_outages_inside_the_window_are_the_statuses_clients_saw_live(nursery) -> None:
    _sim, firehose = await start_firehose(nursery, simulator=dict(drop_after_frames=60),
                                          static_channels=ALL_STREAM)
    watcher = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    from_ms = time.time() * 1000
    lost = await watcher.wait_status("upstream_disconnected")
    back = await watcher.wait_status("upstream_connected")
    await wait_until(lambda: firehose.stats.frames_in > 20, what="frames after the outage")
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    await client.ws.send_message(json.dumps({"action": "subscribe", "params": "T.AAPL", "from": from_ms}))
    await client.wait_status("replay_complete")
    replayed = [s for s in client.statuses if s["status"].startswith("upstream_")]
    assert replayed[:2] == [lost, back]


async def test_a_client_too_slow_for_its_replay_is_a_slow_consumer(nursery) -> None:
    """A client that reads nothing asks for more than the kernel's buffers hold (a few MB with a
    4 KiB receive buffer): its replay stops at its socket, the live events held for it meanwhile pass its queue's
    bound, and it is closed as any slow client is (slow_consumer, 1008) before the replay ends;
    the neighbour sees no gap."""
    started_ms = time.time() * 1000
    _sim, firehose = await start_firehose(nursery, simulator=dict(events_per_second=5000),
                                          static_channels=ALL_STREAM, client_queue_events=2000)
    neighbour = Neighbour(await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe=ALL))
    nursery.start_soon(neighbour.run)
    await wait_until(lambda: firehose.stats.bytes_in > 5_000_000, timeout=60, what="5 MB of frames")
    sock, ws = await handshake(firehose.port, rcvbuf=4096)
    await send_all(sock, masked(json.dumps({"action": "auth", "params": FIREHOSE_KEY}))
                   + masked(json.dumps({"action": "subscribe", "params": ALL, "from": started_ms})))
    await wait_until(lambda: firehose.stats.slow_consumer_disconnects == 1, what="the slow-consumer close")
    assert firehose.stats.replays == 1
    reader = SlowReader(sock, ws)
    reader.fast = True
    with trio.fail_after(60):  # megabytes in the kernel's buffers to parse, on a busy machine
        await reader.run()
    assert reader.close_code == 1008 and "slow_consumer" in reader.statuses
    assert "replay_complete" not in reader.statuses
    await neighbour.wait_for_more()
    neighbour.assert_no_gap()


async def test_a_resume_from_disk_then_memory(nursery, tmp_path) -> None:
    """Memory holds half a second; the rest of the window comes from JOURNAL_DIR, then the ring,
    then live, with no gap; the journal reaches back far enough, so no replay_partial."""
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM, journal_dir=str(tmp_path),
                                          journal_memory_seconds=0.5)
    await wait_until(lambda: firehose.stats.frames_in > 250, what="2.5 s of frames")
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    await client.ws.send_message(json.dumps({"action": "subscribe", "params": ALL, "from": -2000}))
    await client.wait_status("replay_complete")
    await client.more_events(500)
    sequence = [event["q"] for event in client.events if "q" in event]  # FMV events carry none
    assert len(sequence) > 2000
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence)))
    assert not any(s["status"] in ("replay_partial", "journal_gap") for s in client.statuses)
    assert firehose.journal.ring.evicted > 0  # memory alone would not have reached back


async def test_a_resume_from_disk_alone(nursery, tmp_path) -> None:
    """No memory ring (JOURNAL_MEMORY_SECONDS=0) but a directory: the replay comes from disk,
    waiting for the writer to write the last records, and meets live without a gap."""
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM, journal_dir=str(tmp_path),
                                          journal_memory_seconds=0)
    await wait_until(lambda: firehose.stats.frames_in > 100, what="1 s of frames")
    assert firehose.journal is not None and not firehose.journal.ring.enabled
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    await client.ws.send_message(json.dumps({"action": "subscribe", "params": ALL, "from": -800}))
    await client.wait_status("replay_complete")
    await client.more_events(300)
    sequence = [event["q"] for event in client.events if "q" in event]
    assert len(sequence) > 800
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence)))
    assert not any(s["status"] in ("replay_partial", "journal_gap") for s in client.statuses)


async def test_a_journal_that_does_not_reach_back_says_from_when_it_does(nursery) -> None:
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM)
    await wait_until(lambda: firehose.stats.frames_in > 20, what="frames")
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    await client.ws.send_message(json.dumps({"action": "subscribe", "params": "T.*", "from": -200_000}))
    partial = await client.wait_status("replay_partial")
    assert "the journal reaches back to" in partial["message"]
    await client.wait_status("replay_complete")
    statuses = [s["status"] for s in client.statuses]
    assert statuses.index("replay_partial") < statuses.index("replay_complete")


async def test_without_a_journal_there_is_none_and_from_is_refused(nursery) -> None:
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM, journal_memory_seconds=0)
    assert firehose.journal is None and firehose.hub.journal_source is None
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    (status,) = await client.request("subscribe", "T.AAPL")  # without "from": as ever
    assert status["message"] == "subscribed to: T.AAPL"
    await client.ws.send_message(json.dumps({"action": "subscribe", "params": "Q.AAPL", "from": -1000}))
    (status,) = await client.next_status()
    assert status["status"] == "error" and "keeps no journal" in status["message"]
