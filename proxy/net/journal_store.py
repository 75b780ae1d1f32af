"""Journal files: a directory of segments, listed, recovered, appended to, expired and read.

Synchronous on purpose: every function here does blocking file I/O, and the Trio
writer (:mod:`proxy.net.journal_writer`) calls them through ``trio.to_thread``; the
command line (:mod:`proxy.app.journal_cli`) calls them directly. The bytes are the
sans-I/O core's business (:mod:`proxy.core.journal`): this module only opens, maps,
truncates, appends, syncs and deletes files.

A directory holds one journal: segments named ``journal-<first seq>-<start>.seg``
(see :func:`~proxy.core.journal.segment_name`), and a ``LOCK`` file that the
writing process holds locked (``flock``), so that two tiers never write one
directory, and a ``JOURNAL_ID`` file naming the journal's lineage (its seqs mean the same
records for as long as it keeps that id; a downstream proxy resumes by seq within it).
Other files are ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os
import re
import secrets
from pathlib import Path
from typing import Callable, Iterator

import attrs

from ..core.errors import JournalLocked
from ..core.journal import (
    BLOCK_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    BlockCodec,
    Buffer,
    BlockSpan,
    Damage,
    JournalFormatError,
    Record,
    SegmentInfo,
    SegmentScan,
    TornTail,
    encode_segment_header,
    parse_segment_name,
    scan_segment,
    segment_name,
    walk_blocks,
)

__all__ = [
    "LOCK_NAME",
    "JOURNAL_ID_NAME",
    "journal_lineage",
    "JournalLocked",
    "SegmentFile",
    "list_segments",
    "mapped",
    "scan_file",
    "lock_directory",
    "fsync_directory",
    "Recovered",
    "recover",
    "SegmentAppender",
    "delete_segments",
    "read_blocks",
]

LOCK_NAME = "LOCK"
JOURNAL_ID_NAME = "JOURNAL_ID"
_JOURNAL_ID = re.compile(r"[0-9a-f]{32}")
#: data_sync(fd): the data and the size, not every inode time (fsync where there is no fdatasync).
_data_sync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


@attrs.frozen
class SegmentFile:
    """A segment file as listed: its path, and what its name and size say."""

    path: Path
    info: SegmentInfo

    @property
    def name(self) -> str:
        """The file's name."""
        return self.info.name

    @property
    def first_seq(self) -> int:
        """The seq of its first record, from its name."""
        return self.info.first_seq

    @property
    def start_ns(self) -> int:
        """The receive time of its first record, from its name."""
        return self.info.start_ns

    @property
    def size(self) -> int:
        """Its size in bytes when listed."""
        return self.info.size


def list_segments(directory: str | os.PathLike[str]) -> list[SegmentFile]:
    """The segments in ``directory``, oldest (lowest first seq) first.

    Files whose names are not segment names are ignored. Raises OSError when the
    directory cannot be read (FileNotFoundError when it does not exist).
    """
    found: list[SegmentFile] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            parsed = parse_segment_name(entry.name)
            if parsed is None or not entry.is_file(follow_symlinks=False):
                continue
            first_seq, start_ns = parsed
            found.append(SegmentFile(Path(entry.path), SegmentInfo(entry.name, first_seq, start_ns,
                                                                    entry.stat(follow_symlinks=False).st_size)))
    found.sort(key=lambda segment: (segment.first_seq, segment.start_ns))
    return found


@contextlib.contextmanager
def mapped(path: str | os.PathLike[str]) -> Iterator[Buffer]:
    """A read-only map of a file's bytes as they are now (``b""`` for an empty file).

    Reading through a map touches only the pages a reader needs: skipping to a time
    reads block headers, not every payload.
    """
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view


def scan_file(path: str | os.PathLike[str], *, decode: bool = False, codec: BlockCodec | None = None) -> SegmentScan:
    """:func:`~proxy.core.journal.scan_segment` over a file: every checksum checked, and
    with ``decode`` every block decompressed and its records checked too."""
    with mapped(path) as buf:
        if decode:
            return scan_segment(buf, decode=(codec or BlockCodec()).decode)
        return scan_segment(buf, check_payloads=True)


def lock_directory(directory: str | os.PathLike[str]) -> int:
    """Create ``directory`` if needed and lock it for writing; returns the lock's file
    descriptor (closing it releases the lock; so does the process's death, even by
    ``kill -9``). Raises :class:`JournalLocked` when another process holds it, OSError
    when the directory cannot be made or written."""
    os.makedirs(directory, exist_ok=True)
    descriptor = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise JournalLocked(error.errno, f"another process is writing a journal in {directory}") from None
        raise
    return descriptor


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a created or deleted segment) durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def journal_lineage(directory: str | os.PathLike[str], *, continuing: bool) -> str:
    """The id of the journal in ``directory``: the one its ``JOURNAL_ID`` file holds when the
    journal goes on from records on disk (``continuing``), else a new random one, written
    there (durably, before any record of it can be sent). A directory whose segments are
    all gone begins a new lineage: its seqs start again at 1. Raises OSError."""
    path = Path(directory) / JOURNAL_ID_NAME
    if continuing:
        try:
            kept = path.read_text(encoding="ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            kept = ""
        if _JOURNAL_ID.fullmatch(kept):
            return kept
    fresh = secrets.token_hex(16)
    staging = path.with_name(JOURNAL_ID_NAME + ".new")
    with open(staging, "w", encoding="ascii") as file:
        file.write(fresh + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)
    fsync_directory(directory)
    return fresh


@attrs.frozen
class Recovered:
    """What :func:`recover` found and did.

    ``next_seq`` and ``last_ns`` continue the journal (the seq after the last intact
    record, that record's receive time; 1 and 0 for a new journal). ``truncated``
    lists ``(segment name, offset, bytes cut)`` for a torn tail cut off; ``removed``
    the segments deleted for holding no intact block; ``damaged`` the damage left in
    place in the last segment (never deleted: ``verify`` reports it).
    """

    next_seq: int
    last_ns: int
    segments: tuple[SegmentFile, ...]
    truncated: tuple[tuple[str, int, int], ...] = ()
    removed: tuple[str, ...] = ()
    damaged: tuple[tuple[str, Damage], ...] = ()


def recover(directory: str | os.PathLike[str]) -> Recovered:
    """Make a journal directory ready to be appended to, after a clean stop or a crash.

    Only the last segment can have been being written: its torn tail (an incomplete
    last block) is truncated, and a last segment left with no intact block (a crash
    just after it was created) is deleted, which makes the one before it last. Damage
    that is not a torn tail is left for ``verify`` to report. Writing continues in a new
    segment. Creates the directory if needed. Raises OSError on I/O errors.
    """
    os.makedirs(directory, exist_ok=True)
    truncated: list[tuple[str, int, int]] = []
    removed: list[str] = []
    while True:
        segments = list_segments(directory)
        if not segments:
            return Recovered(1, 0, (), tuple(truncated), tuple(removed))
        last = segments[-1]
        scan = scan_file(last.path)
        if scan.torn is not None:
            with open(last.path, "r+b") as file:
                file.truncate(scan.torn.offset)
                _data_sync(file.fileno())
            truncated.append((last.name, scan.torn.offset, scan.torn.size))
        if not scan.blocks:
            os.unlink(last.path)
            fsync_directory(directory)
            removed.append(last.name)
            continue
        segments[-1] = SegmentFile(last.path, attrs.evolve(last.info, size=scan.intact_end))
        last_seq = scan.last_seq
        assert last_seq is not None and scan.last_ns is not None  # there are blocks
        return Recovered(last_seq + 1, scan.last_ns, tuple(segments), tuple(truncated), tuple(removed),
                         tuple((last.name, damage) for damage in scan.damage))


class SegmentAppender:
    """The segment being written: blocks appended, synced now and then, closed.

    Not thread-safe; the writer uses it from one worker thread at a time.
    """

    def __init__(self, path: Path, file: io.FileIO, first_seq: int, start_ns: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.start_ns = start_ns
        self.size = 0
        self.blocks = 0
        self.dirty = False
        self._file = file

    @classmethod
    def create(cls, directory: str | os.PathLike[str], first_seq: int, start_ns: int) -> SegmentAppender:
        """A new segment for records from ``first_seq`` (received at ``start_ns``), its
        header written. Raises FileExistsError when that segment exists, OSError on I/O
        errors."""
        path = Path(directory) / segment_name(first_seq, start_ns)
        file = io.FileIO(path, "xb")  # unbuffered: each block is one write() call
        appender = cls(path, file, first_seq, start_ns)
        try:
            appender._write(encode_segment_header(first_seq, start_ns))
            fsync_directory(directory)
        except OSError:
            file.close()
            raise
        return appender

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            if written is None or written == 0:
                raise OSError(errno.EIO, f"write to {self.path.name} wrote nothing")
            view = view[written:]
            self.size += written
        self.dirty = True

    def append(self, block: bytes) -> None:
        """Append one block. On an I/O error the segment is cut back to the last whole block
        (when the file system allows it) and the error raised: no torn block is left in the
        middle of a journal by a full disk."""
        good = self.size
        try:
            self._write(block)
        except OSError:
            with contextlib.suppress(OSError):
                self._file.truncate(good)
                self.size = good
            raise
        self.blocks += 1

    def sync(self) -> None:
        """Flush what was appended to the disk (fdatasync)."""
        if self.dirty:
            _data_sync(self._file.fileno())
            self.dirty = False

    def close(self) -> None:
        """Sync and close. Idempotent."""
        if self._file.closed:
            return
        try:
            self.sync()
        finally:
            self._file.close()

    def abandon(self) -> None:
        """Close without syncing, after an I/O error; never raises."""
        with contextlib.suppress(OSError):
            self._file.close()

    @property
    def info(self) -> SegmentInfo:
        """This segment as retention sees it."""
        return SegmentInfo(self.path.name, self.first_seq, self.start_ns, self.size)


def delete_segments(directory: str | os.PathLike[str], segments: list[SegmentFile] | list[SegmentInfo]) -> list[str]:
    """Delete these segments (already gone ones are fine), then sync the directory once.
    Returns the names deleted. Raises OSError on other I/O errors."""
    deleted: list[str] = []
    for segment in segments:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, segment.name))
            deleted.append(segment.name)
    if deleted:
        fsync_directory(directory)
    return deleted


def read_blocks(
    directory: str | os.PathLike[str],
    *,
    from_ns: int | None = None,
    from_seq: int | None = None,
    codec: BlockCodec | None = None,
    on_problem: Callable[[str, Damage | TornTail], None] | None = None,
    progress: Callable[[int], None] | None = None,
    segments: list[SegmentFile] | None = None,
) -> Iterator[list[Record]]:
    """The journal's records from ``from_ns`` (received at or after) and ``from_seq`` on,
    one decoded block at a time, in seq order.

    Segments that end before the start are skipped by their names, blocks by their
    headers, without decompressing them; the first block yielded is cut to the
    start. Damaged stretches are skipped and passed to ``on_problem`` with the segment's
    name, as is a torn tail. ``progress`` gets the bytes of each segment stretch
    passed over or read. ``segments`` (default: listed now) fixes which files are read.
    A generator: a Trio caller advances it in a worker thread, one block at a time.
    """
    codec = codec or BlockCodec()
    listed = list_segments(directory) if segments is None else segments
    start = 0
    for index in range(len(listed) - 1):
        following = listed[index + 1]
        # A segment's records are never later, or higher, than the next one's first.
        if (from_ns is not None and following.start_ns < from_ns) or (
                from_seq is not None and following.first_seq <= from_seq):
            if progress is not None:
                progress(listed[index].size)
            start = index + 1
        else:
            break
    for segment in listed[start:]:
        stack = contextlib.ExitStack()
        try:
            buf = stack.enter_context(mapped(segment.path))
        except FileNotFoundError:  # deleted by retention since it was listed
            continue
        with stack:
            done = 0
            for item in walk_blocks(buf, SEGMENT_HEADER_SIZE, check_payloads=False):
                if not isinstance(item, BlockSpan):
                    if on_problem is not None:
                        on_problem(segment.name, item)
                    continue
                header = item.header
                if progress is not None:
                    progress(item.offset + header.size - done)
                    done = item.offset + header.size
                if (from_ns is not None and header.last_ns < from_ns) or (
                        from_seq is not None and header.last_seq < from_seq):
                    continue
                payload = buf[item.offset + BLOCK_HEADER_SIZE:item.offset + header.size]
                try:
                    records = codec.decode(header, payload, item.offset)
                except JournalFormatError as error:
                    if on_problem is not None:
                        on_problem(segment.name, Damage(item.offset, item.offset + header.size, error.kind,
                                                        error.message, header.first_seq - 1, header.last_seq + 1))
                    continue
                if (from_ns is not None and records[0].received_ns < from_ns) or (
                        from_seq is not None and records[0].seq < from_seq):
                    records = [record for record in records
                               if (from_ns is None or record.received_ns >= from_ns)
                               and (from_seq is None or record.end_seq >= from_seq)]
                yield records
            if progress is not None and len(buf) > done:
                progress(len(buf) - done)
