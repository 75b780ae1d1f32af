"""The journal's disk side: the Trio writer and the files it keeps.

Records offered by a router that never waits reach the disk in order; a slow or failing disk
costs a counted, logged gap with a gap record in its place, never a wait; a restart recovers
a torn tail and continues the seqs; retention deletes the oldest segments; one writer per
directory; reading from a time or a seq skips what comes before."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest
import trio

from proxy.core.errors import ConfigError
from proxy.core.journal import (
    BlockCodec,
    Journal,
    Record,
    RecordKind,
    encode_segment_header,
    frame_record,
    segment_name,
)
from proxy.net import journal_store
from proxy.net.journal_store import SegmentAppender, list_segments, read_blocks, recover, scan_file
from proxy.net.journal_writer import DISK_BEHIND, JournalWriter

T0 = 1_764_000_000_000_000_000


def frame_bytes(seq: int) -> bytes:
    """A frame whose bytes say which seq it was journaled under."""
    return b'[{"ev":"T","sym":"S%d","p":%d,"pad":"%s"}]' % (seq % 7, seq, b"x" * (seq % 50))


def on_disk(directory: Path) -> list[Record]:
    return [record for block in read_blocks(directory) for record in block]


def assert_clean(directory: Path) -> None:
    for segment in list_segments(directory):
        scan = scan_file(segment.path, decode=True)
        assert scan.clean and scan.torn is None, (segment.name, scan.damage, scan.torn)


async def start(nursery: trio.Nursery, directory: Path, **options) -> tuple[JournalWriter, Journal]:
    # no retention by default: the records here are timed in 2025, older than any default
    writer = JournalWriter(directory, **{"block_seconds": 0.01, "retention_seconds": None, **options})
    recovered = await nursery.start(writer.run)
    journal = Journal(next_seq=recovered.next_seq, not_before_ns=recovered.last_ns, sink=writer.offer)
    return writer, journal


def hold_appends(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """Make every block's append wait (in the worker thread, as a stalled disk would) until the
    returned event is set."""
    release = trio.Event()
    original_append = SegmentAppender.append

    def held_append(self, block: bytes) -> None:
        while not release.is_set():
            time.sleep(0.01)
        original_append(self, block)

    monkeypatch.setattr(SegmentAppender, "append", held_append)
    return release


async def test_what_the_router_offers_reaches_the_disk_in_order(tmp_path):
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path)
        journal.upstream_restored("Polygon connected", T0)
        for seq in range(2, 1002):
            journal.frame(frame_bytes(seq).decode() if seq % 2 else frame_bytes(seq), T0 + seq * 1000)
            if seq % 50 == 0:
                await trio.sleep(0.002)
        journal.upstream_lost("connection closed (1006)", T0 + 10**9)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    records = on_disk(tmp_path)
    assert [r.seq for r in records] == list(range(1, 1003))
    assert records[0].kind is RecordKind.UPSTREAM_RESTORED and records[0].reason == "Polygon connected"
    assert records[-1].kind is RecordKind.UPSTREAM_LOST and records[-1].reason == "connection closed (1006)"
    assert all(r.data == frame_bytes(r.seq) and r.received_ns == T0 + r.seq * 1000 for r in records[1:-1])
    assert writer.stats.records_dropped == 0 and writer.stats.gaps == 0
    assert writer.stats.last_written_seq == 1002 and writer.stats.fsyncs >= 1
    assert_clean(tmp_path)


async def test_a_read_of_frames_reaches_the_disk_as_its_records(tmp_path):
    """What the tiers hand the writer: one run of frames a read (text, binary, mixed), outages between."""
    reads = []
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path)
        for index in range(300):
            seq = journal.next_seq
            frames = [frame_bytes(seq + i) if (index + i) % 3 else frame_bytes(seq + i).decode()
                      for i in range(index % 17 + 1)]
            reads.append((journal.frames(frames, T0 + index * 1000), frames))
            if index % 50 == 49:
                journal.upstream_lost(f"outage {index}", T0 + index * 1000)
                await trio.sleep(0.002)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    records = on_disk(tmp_path)
    assert [r.seq for r in records] == list(range(1, journal.next_seq))
    by_seq = {r.seq: r for r in records}
    for index, (first, frames) in enumerate(reads):
        assert [(by_seq[first + i].kind, by_seq[first + i].data, by_seq[first + i].received_ns) for i in
                range(len(frames))] == [(RecordKind.FRAME, frame_bytes(first + i), T0 + index * 1000)
                                        for i in range(len(frames))]
    outages = [r for r in records if r.kind is RecordKind.UPSTREAM_LOST]
    assert [r.reason for r in outages] == [f"outage {index}" for index in range(49, 300, 50)]
    stats = writer.stats
    assert stats.records_offered == stats.records_written == len(records) and stats.records_dropped == 0
    assert stats.last_written_seq == journal.next_seq - 1
    assert_clean(tmp_path)


async def test_a_read_without_room_in_the_queue_is_dropped_whole_and_becomes_a_gap(tmp_path, monkeypatch):
    """The queue is bounded in records, whatever the reads hold: a read that does not fit is
    dropped as a whole (a gap record stands for exactly its seqs); a read larger than the whole
    queue still goes in when the queue is empty."""
    release = hold_appends(monkeypatch)
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path, queue_records=10)
        try:
            journal.frames([frame_bytes(1)], T0)
            await trio.sleep(0.05)  # the writer took seq 1 and is held writing it: the queue is empty
            journal.frames([frame_bytes(seq) for seq in range(2, 16)], T0 + 1)  # 14 > 10, into an empty queue
            journal.frames([frame_bytes(16)], T0 + 2)  # no room: dropped
            journal.frames([frame_bytes(17), frame_bytes(18)], T0 + 3)  # dropped
            dropped_while_held = writer.stats.records_dropped
        finally:
            release.set()  # (a failed assertion must not leave the worker thread held)
        await trio.sleep(0.05)  # the held write ends, seqs 2..15 are written; the queue is empty again
        journal.frames([frame_bytes(seq) for seq in range(19, 29)], T0 + 4)  # 10: fits exactly
        await trio.sleep(0.05)
        journal.frames([frame_bytes(29)], T0 + 5)  # the queue counts from 0 again: both fit
        journal.frames([frame_bytes(30)], T0 + 5)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert dropped_while_held == 3
    records = on_disk(tmp_path)
    assert [(r.kind, r.seq, r.end_seq) for r in records if r.kind is not RecordKind.FRAME] == [(RecordKind.GAP, 16, 18)]
    assert [r.seq for r in records if r.kind is RecordKind.FRAME] == [*range(1, 16), *range(19, 31)]
    assert writer.stats.records_offered == 30 and writer.stats.records_dropped == 3
    assert writer.stats.gaps == 1 and writer.stats.seqs_missing == 3
    assert_clean(tmp_path)


async def test_a_stop_writes_the_block_being_gathered(tmp_path):
    async with trio.open_nursery() as nursery:
        _, journal = await start(nursery, tmp_path, block_seconds=30)
        for seq in range(1, 11):
            journal.frame(frame_bytes(seq), T0 + seq)
        await trio.sleep(0.05)  # the writer holds them, waiting for more
        nursery.cancel_scope.cancel()
    assert [r.seq for r in on_disk(tmp_path)] == list(range(1, 11))


async def test_a_restart_continues_the_seqs_in_a_new_segment(tmp_path):
    for run in range(3):
        async with trio.open_nursery() as nursery:
            _, journal = await start(nursery, tmp_path)
            assert journal.next_seq == run * 100 + 1
            for _ in range(100):
                journal.frame(frame_bytes(journal.next_seq), T0 + run * 10**9)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    segments = list_segments(tmp_path)
    assert [s.first_seq for s in segments] == [1, 101, 201]
    assert [r.seq for r in on_disk(tmp_path)] == list(range(1, 301))
    assert_clean(tmp_path)


def write_segment(directory: Path, first_seq: int, count: int, per_block: int = 10) -> Path:
    codec = BlockCodec()
    path = directory / segment_name(first_seq, T0 + first_seq)
    data = bytearray(encode_segment_header(first_seq, T0 + first_seq))
    records = [frame_record(seq, T0 + seq, frame_bytes(seq)) for seq in range(first_seq, first_seq + count)]
    for start in range(0, count, per_block):
        data += codec.encode(records[start:start + per_block])
    path.write_bytes(bytes(data))
    return path


def test_recovery_cuts_a_torn_tail_and_continues_after_the_last_intact_record(tmp_path):
    write_segment(tmp_path, 1, 50)
    last = write_segment(tmp_path, 51, 50)
    whole = last.read_bytes()
    torn_block = BlockCodec().encode([frame_record(101, T0 + 101, frame_bytes(101))])
    last.write_bytes(whole + torn_block[:len(torn_block) // 2])
    recovered = recover(tmp_path)
    assert recovered.next_seq == 101 and recovered.last_ns == T0 + 100
    assert recovered.truncated == ((last.name, len(whole), len(torn_block) // 2),)
    assert last.read_bytes() == whole
    assert_clean(tmp_path)


def test_recovery_removes_a_last_segment_without_a_block(tmp_path):
    write_segment(tmp_path, 1, 30)
    empty = tmp_path / segment_name(31, T0 + 31)
    empty.write_bytes(encode_segment_header(31, T0 + 31)[:20])
    (tmp_path / "notes.txt").write_text("not a segment")
    recovered = recover(tmp_path)
    assert recovered.next_seq == 31 and recovered.removed == (empty.name,)
    assert not empty.exists() and (tmp_path / "notes.txt").exists()


def test_recovery_leaves_damage_in_place(tmp_path):
    path = write_segment(tmp_path, 1, 30)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    recovered = recover(tmp_path)
    assert recovered.next_seq == 31 and len(recovered.damaged) == 1
    assert path.read_bytes() == bytes(data)


async def test_a_slow_disk_costs_a_gap_never_a_wait(tmp_path, monkeypatch, caplog):
    slow = trio.Event()
    original_append = SegmentAppender.append

    def slow_append(self, block: bytes) -> None:
        if not slow.is_set():
            time.sleep(0.3)  # in the worker thread, as a stalled disk would
        original_append(self, block)

    monkeypatch.setattr(SegmentAppender, "append", slow_append)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.005)
            ticks += 1

    offered: list[bool] = []
    slowest_offer = 0.0
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path, queue_records=16)
        journal.sink = None  # offer by hand, to time it

        nursery.start_soon(ticker)
        started = trio.current_time()
        for _ in range(300):
            record = journal.frame(frame_bytes(journal.next_seq), time.time_ns())
            before = time.perf_counter()
            offered.append(writer.offer(record))
            slowest_offer = max(slowest_offer, time.perf_counter() - before)
            await trio.sleep(0.002)
        elapsed = trio.current_time() - started
        slow.set()
        await trio.sleep(0.7)  # the write under way ends, the queue drains
        for _ in range(10):  # the disk is fast again: these get through
            offered.append(writer.offer(journal.frame(frame_bytes(journal.next_seq), time.time_ns())))
            await trio.sleep(0.002)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    # the router's loop kept its pace while the disk stalled: nothing on the Trio thread waited
    assert elapsed < 300 * 0.002 * 3 and ticks > elapsed / 0.005 / 3
    assert slowest_offer < 0.005
    assert offered.count(False) == writer.stats.records_dropped > 0 and all(offered[-10:])
    records = on_disk(tmp_path)
    dropped = {seq for seq, ok in enumerate(offered, start=1) if not ok}
    gaps = [r for r in records if r.kind is RecordKind.GAP]
    assert gaps and writer.stats.gaps == len(gaps)
    assert {seq for gap in gaps for seq in range(gap.seq, gap.end_seq + 1)} == dropped
    assert all(gap.reason.startswith(f"{DISK_BEHIND}: seqs {gap.seq}..{gap.end_seq} not on disk") for gap in gaps)
    frames = [r.seq for r in records if r.kind is RecordKind.FRAME]
    assert sorted(set(frames) | dropped) == list(range(1, len(offered) + 1))
    assert_clean(tmp_path)  # seqs contiguous: every hole is covered by a gap record
    assert any(DISK_BEHIND in message for message in caplog.messages)


@pytest.mark.parametrize("how", ["stop", "pause"])
async def test_records_dropped_after_the_last_queued_still_get_their_gap(tmp_path, monkeypatch, how):
    """No record follows them to reveal the hole: the writer writes their gap when the feed
    pauses (a second without records) or at the stop."""
    release = hold_appends(monkeypatch)
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path, queue_records=4, fsync_seconds=0.2)
        for _ in range(20):  # the first batch is held in the write, 4 wait, the rest are dropped
            journal.frame(frame_bytes(journal.next_seq), time.time_ns())
            await trio.sleep(0.001)
        release.set()
        if how == "pause":
            await trio.sleep(0.6)
            records = on_disk(tmp_path)
            assert records[-1].kind is RecordKind.GAP and records[-1].end_seq == 20
        nursery.cancel_scope.cancel()
    records = on_disk(tmp_path)
    assert writer.stats.records_dropped > 0
    gap = records[-1]
    assert gap.kind is RecordKind.GAP and gap.end_seq == 20
    assert gap.reason == f"{DISK_BEHIND}: seqs {gap.seq}..20 not on disk"
    assert records[-2].kind is RecordKind.FRAME  # what came before it was written
    covered = [seq for r in records for seq in range(r.seq, r.end_seq + 1)]
    assert covered == list(range(1, 21))
    assert_clean(tmp_path)


async def test_a_failing_disk_is_a_gap_and_the_writer_carries_on(tmp_path, monkeypatch, caplog):
    failures = [3]
    original_append = SegmentAppender.append

    def failing_append(self, block: bytes) -> None:
        if failures[0] > 0 and self.blocks >= 1:
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        original_append(self, block)

    monkeypatch.setattr(SegmentAppender, "append", failing_append)
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path, retry_seconds=0.05)
        for _ in range(60):
            journal.frame(frame_bytes(journal.next_seq), time.time_ns())
            await trio.sleep(0.01)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert writer.stats.write_errors >= 1
    records = on_disk(tmp_path)
    gaps = [r for r in records if r.kind is RecordKind.GAP]
    assert gaps and all("a write failed (No space left on device)" in gap.reason for gap in gaps)
    assert records[-1].end_seq == 60
    assert_clean(tmp_path)
    assert any("No space left on device" in message for message in caplog.messages)


async def test_retention_deletes_the_oldest_segments_by_size(tmp_path):
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path, segment_bytes=4_000, max_bytes=20_000,
                                      retention_check_seconds=0, level=-5, block_bytes=2_000)
        payload = os.urandom(600).hex()  # incompressible, so sizes are predictable
        for _ in range(400):
            journal.frame(f'[{{"ev":"T","sym":"A","x":"{payload}"}}]', time.time_ns())
            await trio.sleep(0)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    segments = list_segments(tmp_path)
    assert writer.stats.segments_deleted > 0
    assert writer.stats.segments_created == writer.stats.segments_deleted + len(segments)
    # the bound holds, give or take the segment being written
    assert sum(s.size for s in segments[:-1]) <= 20_000
    seqs = [r.seq for r in on_disk(tmp_path)]
    assert seqs == list(range(seqs[0], 401)) and seqs[0] > 1  # the newest kept, without holes


async def test_retention_deletes_segments_older_than_the_retention(tmp_path):
    now = [T0]
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path, segment_seconds=60, retention_seconds=3600,
                                      retention_check_seconds=0, clock_ns=lambda: now[0])
        for minute in range(10):  # one segment a minute of receive time
            journal.frame(frame_bytes(journal.next_seq), T0 + minute * 60 * 10**9)
            await trio.sleep(0.03)
        assert len(list_segments(tmp_path)) == 10
        # now - 1 h is 1 ns before minute 5: the segments that start at minutes 0..3 ended by the
        # next one's start, before it; the one of minute 4 may hold records up to minute 5: kept
        now[0] = T0 + 3600 * 10**9 + 5 * 60 * 10**9 - 1
        journal.frame(frame_bytes(journal.next_seq), T0 + 10 * 60 * 10**9)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert [s.first_seq for s in list_segments(tmp_path)] == [5, 6, 7, 8, 9, 10, 11]
    assert writer.stats.segments_deleted == 4


async def test_one_writer_per_directory(tmp_path):
    async with trio.open_nursery() as nursery:
        await start(nursery, tmp_path)
        with pytest.raises(ConfigError) as raised:
            await start(nursery, tmp_path)
        assert raised.value.variable == "JOURNAL_DIR" and "another process" in str(raised.value)
        nursery.cancel_scope.cancel()


async def test_a_directory_that_cannot_be_made_is_a_configuration_error(tmp_path):
    (tmp_path / "file").write_text("")
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConfigError) as raised:
            await start(nursery, tmp_path / "file" / "journal")
        assert raised.value.variable == "JOURNAL_DIR"


def test_reading_from_a_time_or_a_seq_skips_what_comes_before(tmp_path):
    for first in (1, 101, 201):
        write_segment(tmp_path, first, 100)
    read: list[int] = []
    records = [r for block in read_blocks(tmp_path, from_ns=T0 + 150, progress=read.append) for r in block]
    assert [r.seq for r in records] == list(range(150, 301))
    assert sum(read) == sum(s.size for s in list_segments(tmp_path))
    records = [r for block in read_blocks(tmp_path, from_seq=255) for r in block]
    assert [r.seq for r in records] == list(range(255, 301))
    assert list(read_blocks(tmp_path, from_ns=T0 + 10**12)) == []


def test_reading_reports_damage_and_carries_on(tmp_path):
    write_segment(tmp_path, 1, 100)
    path = list_segments(tmp_path)[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = []
    seqs = [r.seq for block in read_blocks(tmp_path, on_problem=lambda name, p: problems.append(p)) for r in block]
    assert len(problems) == 1 and len(seqs) == 90
    lost = set(range(1, 101)) - set(seqs)
    first, last = problems[0].lost
    assert lost == set(range(first, last + 1))


async def test_a_failing_sync_is_logged_and_counted_not_raised(tmp_path, monkeypatch, caplog):
    def failing_sync(self) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(SegmentAppender, "sync", failing_sync)
    async with trio.open_nursery() as nursery:
        writer, journal = await start(nursery, tmp_path, fsync_seconds=0.05)
        journal.frame(frame_bytes(1), T0)
        await trio.sleep(0.4)  # the block is written, the feed pauses: the writer syncs
        journal.frame(frame_bytes(2), T0 + 1)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert writer.stats.write_errors >= 1 and writer.stats.last_written_seq == 2
    assert any("Input/output error" in message for message in caplog.messages)
    # the segment whose sync failed was left; the next record began a new one
    assert [s.first_seq for s in list_segments(tmp_path)] == [1, 2]
    assert [r.seq for r in on_disk(tmp_path)] == [1, 2]
