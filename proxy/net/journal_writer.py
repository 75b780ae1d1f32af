"""The journal's disk writer: records in from the router without waiting, blocks out to disk
from a worker thread.

The router never waits for the disk. It hands each read's frames (one
:class:`~proxy.core.journal.FrameRun`) and each outage's record to :meth:`JournalWriter.offer`,
which appends it to a list bounded by records (:data:`WRITE_QUEUE_RECORDS`); what does not fit is
counted as dropped, and that is all the router pays. The writer task
wakes for a record, lets :data:`BLOCK_SECONDS` of them gather (unless :data:`BLOCK_BYTES`
are already queued), takes them all and has a worker thread (``trio.to_thread.run_sync``)
compress and write them as blocks of at most :data:`BLOCK_BYTES`, sync and expire segments,
so that neither zstd nor a slow disk ever holds up the Trio thread. Waking once per block,
not once per record, matters: a task switch costs more than journaling a frame.

Gaps are found where they must be true: a block's records must follow the last seq on
disk. When they do not (the router dropped records, or a write failed), the writer puts
a ``GAP`` record naming the missing seqs in their place, logs a warning and counts it, and
carries on.

Durability: each block is one ``write()`` as soon as it is complete, so a process crash
(``kill -9``, the OOM killer) loses only what was not yet written: the block being
gathered (at most :data:`BLOCK_SECONDS`) and what waits in the queue. The file is
flushed to the disk (``fdatasync``) at most every :data:`FSYNC_SECONDS`, when a segment is
closed, and on a clean stop, so a machine crash or power loss loses at most about a
second more. Syncing every block would tie the writer's pace to the disk's flush latency
(milliseconds to hundreds of them on a busy disk) ten times a second, for a second's worth
of safety against a failure the journal cannot make lossless anyway.

On start the directory is locked (one writer per directory) and recovered
(:func:`~proxy.net.journal_store.recover`); the ``Recovered`` value handed to
``task_status.started`` holds the seq and time the router's
:class:`~proxy.core.journal.Journal` must continue from.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import attrs
import trio

from ..core.errors import ConfigError
from ..core.journal import (
    ZSTD_LEVEL,
    BlockCodec,
    Entry,
    Record,
    RecordKind,
    SegmentInfo,
    entry_records,
    entry_size,
    gap_record,
    retention_victims,
)
from .allocator import hold_freed_memory
from .journal_store import (
    JournalLocked,
    Recovered,
    SegmentAppender,
    SegmentFile,
    delete_segments,
    lock_directory,
    recover,
)

__all__ = [
    "WRITE_QUEUE_RECORDS",
    "BLOCK_BYTES",
    "BLOCK_SECONDS",
    "SEGMENT_BYTES",
    "SEGMENT_SECONDS",
    "FSYNC_SECONDS",
    "RETENTION_CHECK_SECONDS",
    "RETRY_SECONDS",
    "DISK_BEHIND",
    "JournalWriterStats",
    "JournalWriter",
]

log = logging.getLogger("proxy.journal")

#: Records the queue holds for the writer. They are references to records the memory ring
#: holds anyway; at 2,000 frames/s this rides out 8 s of a stalled disk.
WRITE_QUEUE_RECORDS = 16_384
#: Records gather this long after the first of a block arrives before they are written...
BLOCK_SECONDS = 0.1
#: ... as blocks of at most this much, uncompressed. At 20,000 events/s, 100 ms is about this.
BLOCK_BYTES = 256 * 1024
#: A segment is closed and a new one begun past this size on disk...
SEGMENT_BYTES = 64 * 1024 * 1024
#: ... or when its records span this long (retention deletes whole segments).
SEGMENT_SECONDS = 3600.0
FSYNC_SECONDS = 1.0
RETENTION_CHECK_SECONDS = 60.0
#: After a failed write, records are dropped (and become a gap) this long before the next try.
RETRY_SECONDS = 1.0
DISK_BEHIND = "disk could not keep up"


@attrs.define
class JournalWriterStats:
    """The writer's running totals: plain counters for logs and metrics."""

    records_offered: int = 0
    #: Records the router could not queue (the queue was full): they become gaps.
    records_dropped: int = 0
    records_written: int = 0
    #: Gap records written, and the seqs they stand for.
    gaps: int = 0
    seqs_missing: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    raw_bytes_written: int = 0
    fsyncs: int = 0
    segments_created: int = 0
    segments_deleted: int = 0
    write_errors: int = 0
    #: The last seq a write() returned for (0: none yet).
    last_written_seq: int = 0


@attrs.define
class _WriteResult:
    blocks: int = 0  # how many of the blocks asked for were written, in order
    written: int = 0  # bytes
    synced: int = 0
    created: int = 0
    deleted: list[str] = attrs.field(factory=list)
    error: OSError | None = None


class _Disk:
    """The writer's files, used from one worker thread at a time."""

    def __init__(self, writer: JournalWriter, segments: list[SegmentInfo]) -> None:
        self.writer = writer
        self.directory = writer.directory
        self.codec = BlockCodec(writer.level)
        self.closed: list[SegmentInfo] = segments  # older segments, oldest first
        self.current: SegmentAppender | None = None
        self.last_sync = time.monotonic()
        self.last_retention = -math.inf

    def write(self, blocks: list[list[Entry]]) -> _WriteResult:
        """Encode and append each block, stopping at the first I/O error; then sync when it is
        time and expire old segments. Errors are returned, never raised."""
        result = _WriteResult()
        writer = self.writer
        try:
            for records in blocks:
                block = self.codec.encode(records)
                current = self.current
                first = records[0]
                if current is not None and current.blocks and (
                        current.size + len(block) > writer.segment_bytes
                        or first.received_ns - current.start_ns >= writer.segment_seconds * 1e9):
                    self._close_current()
                    current = None
                    result.synced += 1
                if current is None:
                    current = self.current = SegmentAppender.create(self.directory, first.seq, first.received_ns)
                    result.created += 1
                current.append(block)
                result.blocks += 1
                result.written += len(block)
        except OSError as error:
            result.error = error
            self._abandon()
            return result
        now = time.monotonic()
        try:
            if now - self.last_sync >= writer.fsync_seconds and self.sync():
                result.synced += 1
            if result.created or now - self.last_retention >= writer.retention_check_seconds:
                result.deleted = self._expire(now)
        except OSError as error:
            result.error = error
        return result

    def sync(self) -> bool:
        """Sync the segment being written, if anything is unsynced; whether it synced.

        A failed sync abandons the segment (after a failed fsync the kernel may already have
        dropped the pages it could not write, so what follows is begun afresh) and raises.
        """
        self.last_sync = time.monotonic()
        if self.current is None or not self.current.dirty:
            return False
        try:
            self.current.sync()
        except OSError:
            self._abandon()
            raise
        return True

    def _abandon(self) -> None:
        if self.current is not None:
            self.current.abandon()
            # what it holds stays, as a closed segment, for retention and readers
            self.closed.append(self.current.info)
            self.current = None

    def _close_current(self) -> None:
        assert self.current is not None
        self.current.close()
        self.closed.append(self.current.info)
        self.current = None

    def _expire(self, now: float) -> list[str]:
        self.last_retention = now
        writer = self.writer
        known = self.closed + ([self.current.info] if self.current is not None else [])
        victims = retention_victims(known, now_ns=writer.clock_ns(), max_age_ns=writer.retention_ns,
                                    max_bytes=writer.max_bytes)
        if not victims:
            return []
        deleted = delete_segments(self.directory, known[:victims])
        del self.closed[:victims]
        return deleted

    def close(self) -> None:
        if self.current is not None:
            self._close_current()


class JournalWriter:
    """Writes the journal's records to segments in ``directory``, off the router.

    ``retention_seconds`` and ``max_bytes`` bound what is kept (None: no bound);
    the other parameters default to this module's constants and are there for
    tests and benchmarks. ``clock_ns`` is the wall clock retention measures ages
    with. Use: ``recovered = await nursery.start(writer.run)``, then give
    ``writer.offer`` to the router's :class:`~proxy.core.journal.Journal` as its sink.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        retention_seconds: float | None = 24 * 3600.0,
        max_bytes: int | None = 10_000_000_000,
        queue_records: int = WRITE_QUEUE_RECORDS,
        block_bytes: int = BLOCK_BYTES,
        block_seconds: float = BLOCK_SECONDS,
        segment_bytes: int = SEGMENT_BYTES,
        segment_seconds: float = SEGMENT_SECONDS,
        fsync_seconds: float = FSYNC_SECONDS,
        retention_check_seconds: float = RETENTION_CHECK_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        close_seconds: float = 5.0,
        level: int = ZSTD_LEVEL,
        clock_ns: Callable[[], int] = time.time_ns,
        setting: str = "JOURNAL_DIR",
    ) -> None:
        self.directory = Path(directory)
        self.retention_ns = None if retention_seconds is None else int(retention_seconds * 1e9)
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        self.block_seconds = block_seconds
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.fsync_seconds = fsync_seconds
        self.retention_check_seconds = retention_check_seconds
        self.retry_seconds = retry_seconds
        self.close_seconds = close_seconds
        self.level = level
        self.clock_ns = clock_ns
        self.setting = setting
        self.stats = JournalWriterStats()
        # The entries between the router and the writer task: a list the router appends to and
        # the writer takes whole. A Trio memory channel did the same at 0.8 us a record
        # (send_nowait) plus 0.1 (receive_nowait): a third of the journal's cost per one-event
        # frame in a hot loop; the list costs 0.4-0.6 in all.
        self._queue: list[Entry] = []
        self._queued_records = 0  # what the queue's entries stand for, in records
        self._queue_records = queue_records
        # an Event while the writer waits for a first record: the next offer sets and clears it
        self._queued: trio.Event | None = None
        self._dropping = False
        self._last_offered = 0  # the highest seq offered, queued or not
        self._last_written_ns = 0
        #: first missing seq -> (receive time of the first record missing, why)
        self._gap_causes: dict[int, tuple[int, str]] = {}
        self._expected: int | None = None  # the seq the next record on disk must have
        self._failed_until = -math.inf
        self._disk: _Disk | None = None
        self._pending: list[Entry] = []  # the block being gathered

    # --- the router's side -------------------------------------------------------------------

    def offer(self, entry: Entry) -> bool:
        """Queue ``entry`` (a record, or a run of frames) for the disk without ever waiting;
        False when the queue had no room for it (its records are counted as dropped, and a gap
        record will stand in their place). An entry larger than the whole queue is taken when
        the queue is empty."""
        stats = self.stats
        count = entry_records(entry)
        stats.records_offered += count
        self._last_offered = entry.end_seq
        queue = self._queue
        if queue and self._queued_records + count > self._queue_records:
            stats.records_dropped += count
            if not self._dropping:
                self._dropping = True
                self._gap_causes.setdefault(entry.seq, (entry.received_ns, DISK_BEHIND))
            return False
        queue.append(entry)
        self._queued_records += count
        if self._queued is not None:
            self._queued.set()
            self._queued = None
        self._dropping = False
        return True

    # --- the writer task ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Recovered] = trio.TASK_STATUS_IGNORED) -> None:
        """Lock and recover the directory, report where the journal continues
        (``task_status.started(Recovered)``), then write until cancelled; on cancellation,
        write what is queued, sync and close (within ``close_seconds``).

        Raises :class:`~proxy.core.errors.ConfigError` (naming ``setting``) when the
        directory cannot be created, written, locked or recovered. Disk errors after the
        start are logged and counted, and become gaps: they never stop the tier.
        """
        try:
            lock = await trio.to_thread.run_sync(lock_directory, self.directory)
        except JournalLocked as error:
            raise ConfigError(self.setting, str(error)) from None
        except OSError as error:
            raise ConfigError(self.setting, f"cannot write a journal in {self.directory}: "
                                            f"{error.strerror or error}") from None
        try:
            try:
                recovered = await trio.to_thread.run_sync(recover, self.directory)
            except OSError as error:
                raise ConfigError(self.setting, f"cannot recover the journal in {self.directory}: "
                                                f"{error.strerror or error}") from None
            self._report_recovery(recovered)
            hold_freed_memory()
            self._expected = recovered.next_seq
            self._last_written_ns = recovered.last_ns
            self._disk = _Disk(self, [segment.info for segment in recovered.segments])
            task_status.started(recovered)
            try:
                await self._write_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(self.close_seconds) as scope:
                    await self._flush_and_close()
                if scope.cancelled_caught:
                    log.error("journal: the disk did not finish within %.1fs of the stop; the "
                              "last records may be missing (the next start recovers the file)",
                              self.close_seconds)
        finally:
            os.close(lock)

    def _report_recovery(self, recovered: Recovered) -> None:
        for name, offset, size in recovered.truncated:
            log.warning("journal: %s ended with an incomplete block (%d bytes from byte %d), as a "
                        "crash while writing leaves; cut off", name, size, offset)
        for name in recovered.removed:
            log.warning("journal: %s held no complete block; removed", name)
        for name, damage in recovered.damaged:
            log.error("journal: %s is damaged at byte %d (%s); left as it is: run "
                      "`python -m proxy.journal verify %s`", name, damage.offset, damage.message,
                      self.directory)
        log.info("journal: writing to %s, continuing at seq %d", self.directory, recovered.next_seq)

    async def _write_forever(self) -> None:
        while True:
            if not await self._records_queued():
                continue
            # The batch lives on the writer, so that a stop in the middle of gathering it
            # still writes it (_flush_and_close).
            if self._drain() < self.block_bytes:
                # One wake-up per block, not one per entry: a task switch costs more than
                # journaling a read does, and the router hands over an entry per read.
                await trio.sleep(self.block_seconds)
                self._drain()
            batch, self._pending = self._pending, []
            await self._write(batch)

    def _drain(self) -> int:
        """Move every queued entry to the pending batch; returns the batch's size in bytes."""
        pending, queued = self._pending, self._queue
        if queued:
            self._queue = []
            self._queued_records = 0
            if pending:
                pending.extend(queued)
            else:
                self._pending = pending = queued
        return sum(map(entry_size, pending))

    async def _wait_for_records(self) -> None:
        while not self._queue:
            self._queued = queued = trio.Event()
            await queued.wait()

    async def _records_queued(self) -> bool:
        """Wait for a record; False when the feed paused for ``fsync_seconds`` and there was
        something to finish first: records dropped after the last one queued (their gap has no
        record after it to reveal it), or a file to sync."""
        disk = self._disk
        assert disk is not None
        if not ((disk.current is not None and disk.current.dirty) or self._trailing_drop()):
            await self._wait_for_records()
            return True
        with trio.move_on_at(trio.current_time() + self.fsync_seconds):
            await self._wait_for_records()
            return True
        if self._trailing_drop():
            await self._write_records([self._trailing_gap()])
        try:
            if await trio.to_thread.run_sync(disk.sync):
                self.stats.fsyncs += 1
        except OSError as error:
            self.stats.write_errors += 1
            log.error("journal: syncing %s failed (%s); a new segment is begun", self.directory,
                      error.strerror or error)
        return False

    def _trailing_drop(self) -> bool:
        return (self._expected is not None and self._last_offered >= self._expected and not self._pending
                and trio.current_time() >= self._failed_until)

    def _trailing_gap(self) -> Record:
        first, last = self._expected_seq(), self._last_offered
        received_ns, reason = self._gap_causes.get(first, (self._last_written_ns, DISK_BEHIND))
        received_ns = max(received_ns, self._last_written_ns)
        return gap_record(first, last, received_ns, f"{reason}: seqs {first}..{last} not on disk")

    async def _write(self, batch: list[Entry]) -> None:
        if trio.current_time() < self._failed_until:
            # still backing off after a failed write: these records become part of the gap
            self._note_gap(self._expected_seq(), batch[0].received_ns, "disk writes were failing")
            return
        await self._write_records(self._with_gaps(batch))

    async def _write_records(self, records: list[Entry]) -> None:
        """Write ``records`` (already checked to follow what is on disk) as blocks of about
        ``block_bytes`` each (a block ends once it holds that much: a run of frames is never
        split), in one trip to a worker thread."""
        blocks: list[list[Entry]] = []
        size = self.block_bytes
        for record in records:
            if size >= self.block_bytes:
                blocks.append([])
                size = 0
            blocks[-1].append(record)
            size += entry_size(record)
        disk = self._disk
        assert disk is not None
        # A thread cannot be cancelled: a stop arriving now would only lose the result, and
        # the next block would take records already on disk for a gap. So wait it out.
        with trio.CancelScope(shield=True):
            result = await trio.to_thread.run_sync(disk.write, blocks)
            self._account(blocks, result)

    def _expected_seq(self) -> int:
        assert self._expected is not None
        return self._expected

    def _with_gaps(self, batch: list[Entry]) -> list[Entry]:
        """``batch`` with a gap record wherever its seqs do not follow what is on disk."""
        records: list[Entry] = []
        expected = self._expected_seq()
        causes = self._gap_causes
        for record in batch:
            if record.seq > expected:
                received_ns, reason = causes.get(expected, (record.received_ns, DISK_BEHIND))
                reason = f"{reason}: seqs {expected}..{record.seq - 1} not on disk"
                records.append(gap_record(expected, record.seq - 1, min(received_ns, record.received_ns), reason))
            elif record.seq < expected:
                log.error("journal: seq %d came after %d; not written (a bug: seqs must grow)",
                          record.seq, expected - 1)
                continue
            records.append(record)
            expected = record.end_seq + 1
        return records

    def _account(self, blocks: list[list[Entry]], result: _WriteResult) -> None:
        stats = self.stats
        for records in blocks[:result.blocks]:
            for record in records:
                if record.kind is RecordKind.GAP:
                    missing = record.end_seq - record.seq + 1
                    stats.gaps += 1
                    stats.seqs_missing += missing
                    self._gap_causes.pop(record.seq, None)
                    log.warning("journal: %s (%d records)", record.reason, missing)  # type: ignore[union-attr]
            stats.raw_bytes_written += sum(map(entry_size, records))
            stats.records_written += sum(map(entry_records, records))
            self._expected = records[-1].end_seq + 1
            self._last_written_ns = records[-1].received_ns
            stats.last_written_seq = records[-1].end_seq
        stats.blocks_written += result.blocks
        stats.bytes_written += result.written
        stats.fsyncs += result.synced
        stats.segments_created += result.created
        stats.segments_deleted += len(result.deleted)
        if result.deleted:
            log.info("journal: retention deleted %s", ", ".join(result.deleted))
        error = result.error
        if error is None:
            return
        stats.write_errors += 1
        lost = blocks[result.blocks:]
        if not lost:  # the blocks went in; syncing or expiring failed
            log.error("journal: syncing or expiring in %s failed (%s); a new segment is begun",
                      self.directory, error.strerror or error)
            return
        self._failed_until = trio.current_time() + self.retry_seconds
        self._note_gap(self._expected_seq(), lost[0][0].received_ns, f"a write failed ({error.strerror or error})")
        log.error("journal: writing to %s failed (%s); %d records lost, retrying in %.1fs while the "
                  "tier carries on", self.directory, error.strerror or error,
                  sum(entry_records(record) for records in lost for record in records), self.retry_seconds)

    def _note_gap(self, first_seq: int, received_ns: int, reason: str) -> None:
        known = self._gap_causes.get(first_seq)
        if known is None:
            self._gap_causes[first_seq] = (received_ns, reason)
        elif reason not in known[1]:
            self._gap_causes[first_seq] = (known[0], f"{known[1]}, then {reason}")

    async def _flush_and_close(self) -> None:
        """Write everything gathered and queued, then sync and close the segment."""
        disk = self._disk
        if disk is None:
            return
        # Until nothing more comes: the router may journal a batch it was already handed while
        # this writes (it stops at its next checkpoint), and a record still in the queue is not
        # a dropped one (it used to be written as a gap).
        while True:
            self._drain()
            batch, self._pending = self._pending, []
            if not batch:
                break
            await self._write(batch)
        if self._trailing_drop():
            await self._write_records([self._trailing_gap()])
        try:
            await trio.to_thread.run_sync(disk.close)
            self.stats.fsyncs += 1
        except OSError as error:
            log.error("journal: closing the segment failed (%s)", error.strerror or error)
