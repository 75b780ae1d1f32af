"""Writes a journal through the real writer as fast as it is allowed, until killed.

Usage: python journal_crash_writer.py DIR [--piecemeal]
Prints ``start SEQ`` once recovered, then ``written SEQ`` each time a block's write() returned,
so a test that kills it with SIGKILL knows what must survive. Every record's bytes follow from
its seq (:func:`expected`), so what is read back can be checked record by record.

``--piecemeal`` writes each block in 4 KiB pieces a millisecond apart, as a slow disk takes
it, and prints ``mid-block`` once a block's first piece is in the file: a kill then leaves the
torn tail a crash can leave (a write() to the page cache is otherwise over too quickly for a
kill to land inside one but by rare chance).
"""

from __future__ import annotations

import random
import sys
import threading
import time

import trio

from proxy.core.journal import Journal, RecordKind
from proxy.net.journal_store import SegmentAppender
from proxy.net.journal_writer import JournalWriter

PIECE = 4096
# Both the trio thread ("written") and the writer's worker thread ("mid-block") report on stdout;
# print() writes a line and its newline in two calls, so unguarded lines could interleave
# ("written 19550mid-block") and the test would misread them.
REPORT_LOCK = threading.Lock()


def report(line: str) -> None:
    """Write one whole line to stdout and flush it, whichever thread calls."""
    with REPORT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def expected(seq: int) -> tuple[RecordKind, bytes]:
    """The kind and bytes of the record journaled under ``seq``."""
    if seq % 97 == 0:
        return RecordKind.UPSTREAM_LOST, b"outage at seq %d" % seq
    # random bytes (as hex) compress poorly, so blocks are large and writes take a while
    noise = random.Random(seq).randbytes(200 + seq % 1800).hex().encode()
    return RecordKind.FRAME, b'[{"ev":"T","sym":"S%d","q":%d,"x":"%s"}]' % (seq % 13, seq, noise)


async def main(directory: str) -> None:
    writer = JournalWriter(directory, retention_seconds=None, block_seconds=0.005, block_bytes=1 << 20,
                           segment_bytes=4 << 20)
    async with trio.open_nursery() as nursery:
        recovered = await nursery.start(writer.run)
        report(f"start {recovered.next_seq}")
        journal = Journal(next_seq=recovered.next_seq, not_before_ns=recovered.last_ns, sink=writer.offer,
                          memory_seconds=1)
        reported = 0
        while True:
            for _ in range(50):
                kind, data = expected(journal.next_seq)
                if kind is RecordKind.FRAME:
                    journal.frame(data, time.time_ns())
                else:
                    journal.upstream_lost(data.decode(), time.time_ns())
            await trio.sleep(0)
            while journal.next_seq - 1 - writer.stats.last_written_seq > 4096:
                await trio.sleep(0.001)  # stay within the writer's queue: a kill, not gaps, is tested
            if writer.stats.last_written_seq != reported:
                reported = writer.stats.last_written_seq
                report(f"written {reported}")


def write_piecemeal() -> None:
    whole = SegmentAppender._write

    def piecemeal(self: SegmentAppender, data: bytes) -> None:
        for start in range(0, len(data), PIECE):
            whole(self, data[start:start + PIECE])
            if start == 0 and len(data) > 16 * PIECE:  # at least 15 pieces, 15 ms, still to come
                report("mid-block")  # from the worker thread
            time.sleep(0.001)

    SegmentAppender._write = piecemeal  # type: ignore[method-assign]


if __name__ == "__main__":
    if "--piecemeal" in sys.argv[2:]:
        write_piecemeal()
    trio.run(main, sys.argv[1])
