"""The journal in a tier's data path: every frame from upstream journaled before it is routed,
outages as the statuses clients saw, the disk writer in the tier's nursery (recovered at start,
continued after a restart), no journal at all when it is off, and its metrics."""

from __future__ import annotations

import time

import trio
from prometheus_client import generate_latest

from proxy.core.journal import RecordKind
from proxy.net.journal_store import read_blocks
from tests.helpers import ALL_STREAM, FIREHOSE_KEY, authed_client, firehose_config, start_firehose, start_simulator, \
    start_tier, wait_connected, wait_until


async def test_every_frame_from_upstream_is_journaled_before_it_is_routed(nursery) -> None:
    before_ns = time.time_ns()
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*")
    await client.more_events(100)
    journal = firehose.journal
    assert journal is not None
    records = journal.ring.records_from(journal.ring.first_seq)
    # the first connection is the status clients waiting for it heard; then the frames, as received
    assert records[0].kind is RecordKind.UPSTREAM_RESTORED and records[0].reason == "Polygon connected"
    frames = [record for record in records if record.kind is RecordKind.FRAME]
    stats = firehose.stats
    assert len(frames) >= stats.frames_in + stats.bad_frames - 5  # a few may be on their way
    assert [r.seq for r in records] == list(range(records[0].seq, records[0].seq + len(records)))
    times = [r.received_ns for r in records]
    assert times == sorted(times) and before_ns <= times[0] and times[-1] <= time.time_ns()
    # each event the client got is in a journaled frame, as its bytes
    text = b"".join(r.data if isinstance(r.data, bytes) else r.data.encode() for r in frames)
    assert all(f'"i":"{event["i"]}"'.encode() in text for event in client.events[:20])


async def test_outages_are_journaled_with_the_status_clients_saw(nursery) -> None:
    _sim, firehose = await start_firehose(nursery, simulator=dict(drop_after_frames=40), static_channels=ALL_STREAM)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    lost = await client.wait_status("upstream_disconnected")
    back = await client.wait_status("upstream_connected")
    journal = firehose.journal
    assert journal is not None
    records = journal.ring.records_from(journal.ring.first_seq)
    outages = [(r.kind, r.reason) for r in records if r.kind is not RecordKind.FRAME]
    assert (RecordKind.UPSTREAM_LOST, lost["message"]) in outages
    assert (RecordKind.UPSTREAM_RESTORED, back["message"]) in outages
    assert outages.index((RecordKind.UPSTREAM_LOST, lost["message"])) < outages.index(
        (RecordKind.UPSTREAM_RESTORED, back["message"]))


async def test_no_journal_when_memory_is_zero_and_no_directory(nursery) -> None:
    _sim, firehose = await start_firehose(nursery, static_channels=ALL_STREAM, journal_memory_seconds=0)
    await wait_until(lambda: firehose.stats.frames_in > 10, what="frames")
    assert firehose.journal is None and firehose.hub.journal_source is None
    assert "proxy_journal_records" not in generate_latest(firehose.metrics).decode()


async def test_the_disk_journal_is_written_and_continued_after_a_restart(nursery, tmp_path) -> None:
    sim = await start_simulator(nursery)
    config = firehose_config(sim, static_channels=ALL_STREAM, journal_dir=str(tmp_path))
    with trio.CancelScope() as first_run:
        async with trio.open_nursery() as inner:
            firehose = await start_tier(inner, config)
            await wait_connected(firehose)
            await wait_until(lambda: firehose.stats.frames_in > 30, what="frames")
            first_run.cancel()
    journal = firehose.journal
    assert journal is not None
    last_seq = journal.next_seq - 1
    on_disk = [record for block in read_blocks(tmp_path) for record in block]
    # the stop wrote everything: the disk holds what the ring held, record for record
    assert [(r.seq, r.kind, r.received_ns) for r in on_disk] == [
        (r.seq, r.kind, r.received_ns) for r in journal.ring.records_from(1)]
    assert on_disk[-1].seq == last_seq
    # again on the same directory: the journal goes on from there, saying the tier was away
    second = await start_tier(nursery, config)
    await wait_connected(second)
    assert second.journal is not None
    first_again = second.journal.ring.records_from(second.journal.ring.first_seq)[0]
    assert first_again.seq == last_seq + 1 and first_again.kind is RecordKind.UPSTREAM_LOST
    assert "was not running" in first_again.reason
    await wait_until(lambda: second.journal_source.figures().disk_records_written > 5, what="records on disk")
    metrics = generate_latest(second.metrics).decode()
    for name in ("proxy_journal_records_total", "proxy_journal_memory_bytes", "proxy_journal_disk_bytes_total",
                 "proxy_journal_disk_gaps_total", "proxy_replays_total", "proxy_replay_events_total",
                 "proxy_replays_refused_total"):
        assert name in metrics, name
