"""Serving a resuming client's replay from the journal: memory first, disk when memory does not
reach back, in the client's own task.

:class:`JournalSource` is what a tier hands its hub: the router's
:class:`~proxy.core.journal.Journal` (its memory ring) and, with ``JOURNAL_DIR``, the disk
writer, whose directory is read with :func:`~proxy.net.journal_store.read_blocks` (advanced a
block at a time in a worker thread, so a disk read never holds the Trio thread). What the
client gets, and where live takes over, is the sans-I/O :class:`~proxy.core.replay.Stitch`'s
business; this module only fetches records and hands the stitch's frames to ``send``, which
the client's writer implements by writing to the socket and waiting for the kernel to take
them: a replay goes at the pace of the client's socket, and the router never waits for it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Awaitable, Callable, Iterator, Sequence

import trio

from ..core.errors import SeqEvicted
from ..core.journal import Journal, Record
from ..core.replay import Stitch, resume_start
from ..core.stats import JournalFigures
from .journal_store import SegmentFile, list_segments, read_blocks
from .journal_writer import JournalWriter

__all__ = ["RING_CHUNK_RECORDS", "WRITER_WAIT_SECONDS", "JournalSource", "Send"]

log = logging.getLogger(__name__)

#: Records taken from the memory ring per step of a replay: selecting them is a few ms at most
#: (frames of 200 events), after which the router may run.
RING_CHUNK_RECORDS = 16
#: How long a replay waits for the disk writer to write records the memory ring does not hold
#: (JOURNAL_MEMORY_SECONDS=0 with a JOURNAL_DIR) before it reports them missing.
WRITER_WAIT_SECONDS = 5.0

#: Writes a replay's frames to the client; False when the replay must stop (the client is gone,
#: or overflowed its queue and is being closed as a slow consumer).
Send = Callable[[Sequence[str | bytes]], Awaitable[bool]]


class JournalSource:
    """A tier's journal as replays read it: the memory ring, and the disk when there is one.

    ``started_ns`` is when this tier's journal began (nothing is missing after it but what
    the ring evicted); ``replay_max_seconds`` is how far back a ``from`` may reach;
    ``journal_id`` names the journal's lineage, in which seqs mean the same records: random
    for a journal in memory only, kept in ``JOURNAL_DIR`` for one on disk (a downstream
    proxy resumes by seq only in the same lineage).
    """

    def __init__(self, journal: Journal, writer: JournalWriter | None, *, started_ns: int,
                 replay_max_seconds: float, journal_id: str = "") -> None:
        self.journal = journal
        self.writer = writer
        self.started_ns = started_ns
        self.replay_max_seconds = replay_max_seconds
        self.journal_id = journal_id
        self._first_seq = journal.next_seq

    def figures(self) -> JournalFigures:
        """The journal's figures now, for metrics."""
        ring, writer = self.journal.ring, self.writer
        figures = JournalFigures(records=self.journal.next_seq - self._first_seq, memory_records=len(ring),
                                 memory_bytes=ring.size_bytes)
        if writer is None:
            return figures
        stats = writer.stats
        return JournalFigures(
            records=figures.records, memory_records=figures.memory_records, memory_bytes=figures.memory_bytes,
            disk=True, disk_records_written=stats.records_written, disk_bytes_written=stats.bytes_written,
            disk_records_dropped=stats.records_dropped, disk_gaps=stats.gaps, disk_seqs_missing=stats.seqs_missing,
            disk_write_errors=stats.write_errors,
        )

    def reach_ns(self) -> int:
        """The earliest receive time the journal still holds everything from: the first segment on
        disk, or this run's start while the memory ring evicted nothing, or the ring's oldest."""
        ring = self.journal.ring
        reach = self.started_ns if ring.evicted == 0 or ring.oldest_ns is None else ring.oldest_ns
        first = self._first_segment()
        return reach if first is None else min(reach, first.start_ns)

    def _first_segment(self) -> SegmentFile | None:
        """The oldest segment on disk, if the journal has a disk and it holds one."""
        if self.writer is None:
            return None
        try:
            segments = list_segments(self.writer.directory)
        except OSError:
            return None
        return segments[0] if segments else None

    def reach_seq(self) -> tuple[int, int | None]:
        """The oldest seq the journal still holds everything from, and its receive time if known:
        the first segment on disk, else the memory ring's oldest (this run's first seq while the
        ring evicted nothing), else the next seq (nothing held yet)."""
        ring = self.journal.ring
        first = self._first_segment()
        if first is not None:
            return first.first_seq, first.start_ns
        if ring.first_seq is not None:
            return ring.first_seq, ring.oldest_ns
        return self.journal.next_seq, None

    async def replay(self, stitch: Stitch, send: Send) -> bool:
        """Serve ``stitch``'s replay through ``send``: the ``replay_partial`` status when the
        journal does not reach back to the start, the records from the start to the stitch's end
        (from disk while the ring does not hold them), then ``replay_complete``. Returns whether
        it was all sent (False: ``send`` said stop). The stitch must be ready."""
        assert stitch.ready and stitch.through is not None
        from_ns = stitch.request.from_ns
        if stitch.request.from_seq is not None:  # a downstream proxy resuming by seq
            reach_seq, reach_ns = (await trio.to_thread.run_sync(self.reach_seq) if self.writer is not None
                                   else self.reach_seq())
            start, partial = resume_start(stitch.request, self.journal_id, stitch.hold_from, reach_seq, reach_ns)
            stitch.start_at(start)
            if partial is not None and not await send([partial]):
                return False
        else:
            reach = await trio.to_thread.run_sync(self.reach_ns) if self.writer is not None else self.reach_ns()
            if reach > from_ns and not await send([stitch.partial_frame(reach)]):
                return False
        ring = self.journal.ring
        disk: Iterator[list[Record]] | None = None
        disk_fresh = False  # the disk iterator was opened after the last block taken
        waited_since: float | None = None
        through = stitch.through
        while not stitch.done:
            cursor, first = stitch.cursor, ring.first_seq
            if cursor is None and first is not None and (self.writer is None or from_ns >= ring.oldest_ns):  # type: ignore[operator]
                stitch.start_at(ring.seq_at_time(from_ns))
                continue
            if cursor is not None and first is not None and cursor >= first:
                try:
                    records = ring.records_from(cursor, RING_CHUNK_RECORDS)
                except SeqEvicted:
                    continue  # evicted since we looked: the disk, or a gap, below
                if not records:  # cannot be (the end was journaled), but never loop on it
                    log.error("replay: seq %d is not in the journal's memory; the replay ends there", cursor)
                    stitch.skip_to(through + 1, "")
                    continue
                if not await send(stitch.take(records)):
                    return False
                continue
            if self.writer is None:
                # Not in memory, and no disk: the ring evicted it (a slow replay), or holds nothing.
                target = first if first is not None else through + 1
                if cursor is None:
                    stitch.start_at(target)
                elif not await send(stitch.skip_to(target, "evicted from memory before the replay reached it")):
                    return False
                continue
            # From disk, a block at a time in a worker thread, until memory holds the cursor.
            if disk is None:
                disk = (read_blocks(self.writer.directory, from_ns=from_ns) if cursor is None
                        else read_blocks(self.writer.directory, from_seq=cursor))
                disk_fresh = True
            block = await trio.to_thread.run_sync(next, disk, None)
            if block is not None:
                waited_since, disk_fresh = None, False
                if first is not None:
                    older = [record for record in block if record.seq < first]  # memory has the rest
                    if not older:
                        if cursor is None:
                            stitch.start_at(block[0].seq)
                        continue
                    block = older
                if not await send(stitch.take(block)):
                    return False
                continue
            disk = None
            if not disk_fresh:
                continue  # a segment may have begun since the directory was listed: look again
            if cursor is None and first is not None:
                # Nothing on disk at or after the start: memory holds all there is.
                stitch.start_at(ring.seq_at_time(from_ns))
                continue
            # Memory does not hold the cursor (or holds nothing: JOURNAL_MEMORY_SECONDS=0), and
            # the disk has nothing there: the writer may not have written it yet.
            behind = self.writer.stats.last_written_seq < min(through, (first or math.inf) - 1)
            now = time.monotonic()
            if behind and (waited_since is None or now - waited_since < WRITER_WAIT_SECONDS):
                waited_since = waited_since or now
                await trio.sleep(self.writer.block_seconds)
                continue
            if cursor is None:
                stitch.start_at(through + 1)  # nothing at or after the start, anywhere
                continue
            target = first if first is not None and first > cursor else through + 1
            if not await send(stitch.skip_to(target, "not on disk")):
                return False
        return await send([stitch.complete_frame()])
