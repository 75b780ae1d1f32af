"""The journal without I/O: its records, its on-disk format as bytes, and the memory ring.

Every frame a tier receives from upstream becomes a :class:`Record` with a tier-local
sequence number (``seq``) and its receive time in ns since the epoch; upstream outages
are records of their own, so a replay shows the gap where it happened. The router
appends through :class:`Journal`, a read's frames at a time, which numbers the records,
keeps the last minutes of them in a :class:`JournalRing` (bounded by seconds and bytes,
whichever binds first) and hands them to a sink (the disk writer in
:mod:`proxy.net.journal_writer`) as one :class:`FrameRun` a read.

On disk (docs/journal.md has the picture), a journal is a directory of append-only
*segments*. A segment is a 32-byte header, then *blocks*: a 60-byte header with its
own CRC32 (magic, sizes, record count, first/last seq, first/last receive time, the
payload's CRC32) and a zstandard-compressed payload of records. This is the usual
shape of a write-ahead log (length-prefixed, checksummed, append-only), chosen for
what a crash leaves: a process killed while writing leaves at most one incomplete
block at the end of the last segment, which :func:`scan_segment` recognises as a
*torn tail* (expected, not damage) and recovery cuts off. Anything else that fails
a check is *damage*, reported with its byte offset and the seqs it cost, and the
scan resynchronises on the next block whose checksums hold.

Seqs are contiguous across a journal: each record's seq follows the previous
record's ``end_seq``; records the disk could not take are covered by a ``GAP``
record naming them. A hole without a gap record is damage, which is how a lost or
deleted block in the middle is found.

Replay selects events with :class:`EventSelector`, which asks the routing code's own
questions (:class:`~proxy.core.protocol.EventKey`, :func:`~proxy.core.protocol.event_symbol`,
:meth:`~proxy.core.subscriptions.SubscriptionRegistry.channel_targets`), so a replay
selects exactly what live routing would have.
"""

from __future__ import annotations

import bisect
import datetime
import enum
import operator
import re
import struct
import zlib
from collections import Counter
from itertools import accumulate, repeat
from typing import Callable, Iterable, Iterator, Protocol, Sequence, TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import mmap

import attrs
import msgspec
import zstandard

from .errors import JournalFormatError, SeqEvicted
from .protocol import EVERYTHING_CHANNEL, Channel, EventKey, event_symbol
from .routing import FrameError, may_hold_status
from .subscriptions import SubscriptionRegistry

__all__ = [
    "RecordKind",
    "Record",
    "frame_record",
    "outage_record",
    "gap_record",
    "FrameRun",
    "Entry",
    "entry_records",
    "entry_size",
    "Buffer",
    "SEGMENT_MAGIC",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_SUFFIX",
    "BLOCK_MAGIC",
    "BLOCK_HEADER_SIZE",
    "CODEC_ZSTD",
    "ZSTD_HASH_LOG",
    "ZSTD_LEVEL",
    "ZSTD_WINDOW_LOG",
    "MAX_BLOCK_RAW_BYTES",
    "RECORD_OVERHEAD_BYTES",
    "JournalFormatError",
    "SegmentHeader",
    "encode_segment_header",
    "parse_segment_header",
    "segment_name",
    "parse_segment_name",
    "BlockHeader",
    "parse_block_header",
    "BlockCodec",
    "BlockSpan",
    "Damage",
    "TornTail",
    "SegmentScan",
    "scan_segment",
    "walk_blocks",
    "SegmentInfo",
    "retention_victims",
    "SeqEvicted",
    "JournalRing",
    "Journal",
    "EventSelector",
    "count_event_types",
    "format_ns",
]


# --- records ------------------------------------------------------------------------------


class RecordKind(enum.IntEnum):
    """What a record is. The values are the on-disk codes: never renumber them."""

    FRAME = 1  #: a frame as upstream sent it
    UPSTREAM_LOST = 2  #: the upstream connection was lost; ``data`` says why
    UPSTREAM_RESTORED = 3  #: the upstream connection is back; ``data`` says what it was
    GAP = 4  #: seqs ``seq``..``end_seq`` are not in this journal; ``data`` says why


# Not frozen: a frozen attrs class sets each field through object.__setattr__, and a record is
# made per frame wherever frames are read as records (a replay from the ring, a segment decoded)
# (measured: 2.6 µs a record frozen, 1.0 µs not, 0.9 µs for a plain tuple). Nothing changes a
# record once made.
@attrs.define(slots=True)
class Record:
    """One journal record; treat it as immutable.

    ``seq`` is the tier-local sequence number; ``end_seq`` equals it except for a
    ``GAP``, which stands for ``seq``..``end_seq``. ``received_ns`` is the receive time
    in ns since the epoch, never earlier than the record before it. ``data`` is the
    frame as received for a ``FRAME`` (``str`` or ``bytes`` in memory, ``bytes`` when
    read from disk) and the reason, as text, for the other kinds.
    """

    kind: RecordKind
    seq: int
    received_ns: int
    data: str | bytes
    end_seq: int

    @property
    def reason(self) -> str:
        """The text of an outage or gap record (a frame's text, for a frame)."""
        return self.data if isinstance(self.data, str) else self.data.decode("utf-8", "replace")


def frame_record(seq: int, received_ns: int, data: str | bytes) -> Record:
    """A ``FRAME`` record. Takes the frame as received; returns the record."""
    return Record(RecordKind.FRAME, seq, received_ns, data, seq)


def outage_record(kind: RecordKind, seq: int, received_ns: int, reason: str) -> Record:
    """An ``UPSTREAM_LOST`` or ``UPSTREAM_RESTORED`` record; raises ValueError for another kind."""
    if kind not in (RecordKind.UPSTREAM_LOST, RecordKind.UPSTREAM_RESTORED):
        raise ValueError(f"not an outage kind: {kind!r}")
    return Record(kind, seq, received_ns, reason, seq)


def gap_record(first_seq: int, last_seq: int, received_ns: int, reason: str) -> Record:
    """A ``GAP`` record standing for ``first_seq``..``last_seq``; raises ValueError if empty."""
    if last_seq < first_seq:
        raise ValueError(f"empty gap {first_seq}..{last_seq}")
    return Record(RecordKind.GAP, first_seq, received_ns, reason, last_seq)


@attrs.define(slots=True)
class FrameRun:
    """The frames one read brought, journaled together: seqs ``seq``..``end_seq``, one frame each,
    all received at ``received_ns``. Treat it as immutable.

    The router hands the disk writer one of these per read rather than a :class:`Record` per
    frame, and the writer encodes it in one pass (:meth:`BlockCodec.encode`): per frame, the
    journal's cost is then a few list operations in C, not a Python object and a call. On disk
    its frames are ordinary ``FRAME`` records; readers never see a run.
    """

    seq: int
    end_seq: int
    received_ns: int
    #: the frames as received, in order; the run holds the list itself, which must not change
    frames: Sequence[str | bytes]

    #: What a run's records are (so that code asking an entry's kind needs no special case).
    kind = RecordKind.FRAME

    @property
    def size(self) -> int:
        """The frames' length in all (characters for ``str``, bytes for ``bytes``)."""
        return sum(map(len, self.frames))


#: What the router hands the disk writer: a record (an outage; a gap, from the writer itself) or
#: a run of frames.
Entry: TypeAlias = "Record | FrameRun"


def entry_records(entry: Entry) -> int:
    """How many records ``entry`` is on disk: a run's frame count, 1 for a record (a gap too)."""
    return len(entry.frames) if type(entry) is FrameRun else 1


def entry_size(entry: Entry) -> int:
    """The length of ``entry``'s data: what the writer measures blocks by."""
    return entry.size if type(entry) is FrameRun else len(entry.data)  # type: ignore[union-attr]


# --- the on-disk format: segment header -----------------------------------------------------

#: What the decoders read: ``bytes``, or an ``mmap`` of a segment file (which the shells map
#: so that a reader touches only the blocks it needs). A type only: nothing here opens files.
Buffer: TypeAlias = "bytes | bytearray | mmap.mmap"


SEGMENT_MAGIC = b"PJOURNAL"
SEGMENT_SUFFIX = ".seg"
_SEGMENT = struct.Struct("<8sHHQq")  # magic, version, reserved, first seq, start ns
_CRC = struct.Struct("<I")
SEGMENT_HEADER_SIZE = _SEGMENT.size + _CRC.size  # 32
_SEGMENT_VERSION = 1

BLOCK_MAGIC = b"PJB1"
#: magic, version, codec, flags, payload size, raw size, records, first seq, last seq,
#: first ns, last ns, payload CRC32; then the CRC32 of these 56 bytes.
_BLOCK = struct.Struct("<4sBBHIIIQQqqI")
BLOCK_HEADER_SIZE = _BLOCK.size + _CRC.size  # 60
_BLOCK_VERSION = 1
CODEC_ZSTD = 1
#: zstd level 1: on simulator frames, a ratio of 5.6 at the cost of level -5's 3.1 (docs/journal.md).
ZSTD_LEVEL = 1
#: Level 1's tables made to fit a block: a 256 KiB window (a block is about that) and a 4,096-entry
#: hash table (16 KiB: it stays in cache between blocks written a tenth of a second apart).
#: On frames of 181 events, 0.290 -> 0.266 us an event, ratio 5.71 -> 5.79 (docs/performance.md).
ZSTD_WINDOW_LOG = 18
ZSTD_HASH_LOG = 12
#: A block never holds more than this, uncompressed: a decoder refuses larger claims
#: (a damaged size must not make it allocate gigabytes).
MAX_BLOCK_RAW_BYTES = 64 * 1024 * 1024
#: kind, seq, received ns, data length; a GAP's data starts with its end seq.
_RECORD = struct.Struct("<BQqI")
_GAP_END = struct.Struct("<Q")


@attrs.frozen
class SegmentHeader:
    """A segment's header: the seq and receive time of its first record."""

    first_seq: int
    start_ns: int


def encode_segment_header(first_seq: int, start_ns: int) -> bytes:
    """The 32 header bytes of a segment whose first record is ``first_seq`` at ``start_ns``."""
    head = _SEGMENT.pack(SEGMENT_MAGIC, _SEGMENT_VERSION, 0, first_seq, start_ns)
    return head + _CRC.pack(zlib.crc32(head))


def parse_segment_header(buf: Buffer) -> SegmentHeader:
    """Read a segment header from the start of ``buf``.

    Raises :class:`JournalFormatError`: ``truncated`` when fewer than 32 bytes are
    there, ``segment_header`` when the magic, version or checksum is wrong.
    """
    if len(buf) < SEGMENT_HEADER_SIZE:
        raise JournalFormatError("truncated", 0, f"segment header incomplete: {len(buf)} of "
                                 f"{SEGMENT_HEADER_SIZE} bytes")
    magic, version, _reserved, first_seq, start_ns = _SEGMENT.unpack_from(buf, 0)
    if magic != SEGMENT_MAGIC:
        raise JournalFormatError("segment_header", 0, f"not a journal segment (magic {bytes(magic)!r})")
    (stored,) = _CRC.unpack_from(buf, _SEGMENT.size)
    computed = zlib.crc32(buf[:_SEGMENT.size])
    if stored != computed:
        raise JournalFormatError("segment_header", 0, f"segment header checksum mismatch "
                                 f"(stored {stored:#010x}, computed {computed:#010x})")
    if version != _SEGMENT_VERSION:
        raise JournalFormatError("segment_header", 0, f"segment format version {version} is not "
                                 f"known (this code reads {_SEGMENT_VERSION})")
    return SegmentHeader(first_seq, start_ns)


_NAME = re.compile(r"journal-(\d{20})-(\d{8}T\d{6})\.(\d{9})Z" + re.escape(SEGMENT_SUFFIX))


def segment_name(first_seq: int, start_ns: int) -> str:
    """The file name of a segment: ``journal-<first seq, 20 digits>-<start, UTC to the ns>.seg``.

    Names sort by seq, and say when each segment starts, so retention and seeking by
    time need no file opened.
    """
    seconds, nanos = divmod(start_ns, 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"journal-{first_seq:020d}-{stamp}.{nanos:09d}Z{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """``(first_seq, start_ns)`` from a segment's file name, or None for any other name."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    try:
        when = datetime.datetime.strptime(match.group(2), "%Y%m%dT%H%M%S").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return int(match.group(1)), int(when.timestamp()) * 1_000_000_000 + int(match.group(3))


# --- blocks -----------------------------------------------------------------------------------


@attrs.frozen
class BlockHeader:
    """What a block's header says about its payload and its records."""

    codec: int
    payload_size: int
    raw_size: int
    count: int
    first_seq: int
    last_seq: int
    first_ns: int
    last_ns: int
    payload_crc: int

    @property
    def size(self) -> int:
        """The whole block's size in bytes: header and payload."""
        return BLOCK_HEADER_SIZE + self.payload_size


def parse_block_header(buf: Buffer, offset: int) -> BlockHeader:
    """Read the block header at ``offset`` of a segment's bytes.

    Raises :class:`JournalFormatError`: ``truncated`` (fewer than 60 bytes left),
    ``bad_magic``, ``header_checksum`` or ``bad_header`` (fields that contradict each
    other, an unknown version or codec, a raw size over :data:`MAX_BLOCK_RAW_BYTES`).
    The payload is not looked at.
    """
    if len(buf) - offset < BLOCK_HEADER_SIZE:
        raise JournalFormatError("truncated", offset, f"block header incomplete: "
                                 f"{len(buf) - offset} of {BLOCK_HEADER_SIZE} bytes")
    fields = _BLOCK.unpack_from(buf, offset)
    magic, version, codec, _flags, payload_size, raw_size, count, first_seq, last_seq, first_ns, last_ns, crc = fields
    if magic != BLOCK_MAGIC:
        raise JournalFormatError("bad_magic", offset, f"no block starts here (bytes {bytes(magic)!r})")
    (stored,) = _CRC.unpack_from(buf, offset + _BLOCK.size)
    computed = zlib.crc32(buf[offset:offset + _BLOCK.size])
    if stored != computed:
        raise JournalFormatError("header_checksum", offset, f"block header checksum mismatch "
                                 f"(stored {stored:#010x}, computed {computed:#010x})")
    problem = None
    if version != _BLOCK_VERSION:
        problem = f"block format version {version} is not known"
    elif codec != CODEC_ZSTD:
        problem = f"unknown codec {codec}"
    elif count < 1 or last_seq < first_seq or last_ns < first_ns:
        problem = f"inconsistent header ({count} records, seqs {first_seq}..{last_seq})"
    elif raw_size > MAX_BLOCK_RAW_BYTES:
        problem = f"claims {raw_size} bytes uncompressed, more than any block holds"
    if problem:
        raise JournalFormatError("bad_header", offset, problem)
    return BlockHeader(codec, payload_size, raw_size, count, first_seq, last_seq, first_ns, last_ns, crc)


class BlockCodec:
    """Turns records into a block's bytes and a block's payload back into records.

    Holds zstandard contexts, which are not safe to share between threads: give
    each thread its own codec. ``level`` is zstd's compression level.
    """

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self._compressor = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
            level, window_log=ZSTD_WINDOW_LOG, hash_log=ZSTD_HASH_LOG))
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, records: Sequence[Entry]) -> bytes:
        """One block (header and payload) holding ``records`` (records, and runs of frames as
        the records they stand for).

        Takes entries in seq order, each starting after the previous one's ``end_seq``, with
        non-decreasing receive times; raises ValueError otherwise or when there are none.
        Frames held as ``str`` are encoded to UTF-8 here (off the router).
        """
        if not records:
            raise ValueError("a block holds at least one record")
        parts: list[bytes] = []
        pack = _RECORD.pack
        previous_end = records[0].seq - 1
        previous_ns = records[0].received_ns
        count = 0
        for record in records:
            if record.seq <= previous_end or record.end_seq < record.seq or record.received_ns < previous_ns:
                raise ValueError(f"records out of order at seq {record.seq}")
            previous_end, previous_ns = record.end_seq, record.received_ns
            if type(record) is FrameRun:
                count += _encode_run(record, parts)
                continue
            data = _as_bytes(record.data)  # type: ignore[union-attr]
            if record.kind is RecordKind.GAP:
                data = _GAP_END.pack(record.end_seq) + data
            parts.append(pack(record.kind, record.seq, record.received_ns, len(data)))
            parts.append(data)
            count += 1
        raw = b"".join(parts)
        if len(raw) > MAX_BLOCK_RAW_BYTES:
            raise ValueError(f"{len(raw)} bytes do not fit one block (at most {MAX_BLOCK_RAW_BYTES})")
        payload = self._compressor.compress(raw)
        head = _BLOCK.pack(BLOCK_MAGIC, _BLOCK_VERSION, CODEC_ZSTD, 0, len(payload), len(raw), count,
                           records[0].seq, records[-1].end_seq, records[0].received_ns,
                           records[-1].received_ns, zlib.crc32(payload))
        return head + _CRC.pack(zlib.crc32(head)) + payload

    def decode(self, header: BlockHeader, payload: Buffer, offset: int = 0) -> list[Record]:
        """The records of a block whose header is ``header`` and payload ``payload``.

        ``offset`` (the block's place in its segment) only goes into errors. Raises
        :class:`JournalFormatError`: ``truncated`` when the payload is short,
        ``payload_checksum``, or ``bad_payload`` when the checksum holds but the
        records contradict the header (which only a bug or a forged block can do).
        """
        if len(payload) < header.payload_size:
            raise JournalFormatError("truncated", offset, f"block payload incomplete: {len(payload)} of "
                                     f"{header.payload_size} bytes")
        computed = zlib.crc32(payload)
        if computed != header.payload_crc:
            raise JournalFormatError("payload_checksum", offset, f"block payload checksum mismatch "
                                     f"(stored {header.payload_crc:#010x}, computed {computed:#010x})")
        try:
            raw = self._decompressor.decompress(memoryview(payload), max_output_size=header.raw_size)
        except zstandard.ZstdError as error:
            raise JournalFormatError("bad_payload", offset, f"payload does not decompress: {error}") from None
        if len(raw) != header.raw_size:
            raise JournalFormatError("bad_payload", offset, f"payload holds {len(raw)} bytes, header says "
                                     f"{header.raw_size}")
        return _parse_records(raw, header, offset)


def _as_bytes(data: str | bytes) -> bytes:
    """A record's data as stored: text in UTF-8 (lone surrogates kept, as ``surrogatepass`` does)."""
    return data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data


def _encode_run(run: FrameRun, parts: list[bytes]) -> int:
    """Append ``run``'s records to ``parts`` (a header, then the frame, for each); returns how many.

    The same bytes as encoding each frame as a record, made with C's loops (map over the frames,
    one header each from ``struct``, interleaved by slice assignment), because this runs for every
    frame: with one-event frames it took the writer most of its time per frame in Python.
    """
    frames = run.frames
    count = len(frames)
    if run.end_seq - run.seq + 1 != count:
        raise ValueError(f"a run of seqs {run.seq}..{run.end_seq} holds {count} frames")
    try:
        # text frames, the usual case; strict UTF-8 is 3 times as fast as with an error handler
        # (0.04 against 0.12 us a frame) and the same bytes for every text but a lone surrogate's
        datas = list(map(str.encode, frames))  # type: ignore[arg-type]
    except (TypeError, UnicodeEncodeError):  # a binary frame among them, or a lone surrogate
        datas = list(map(_as_bytes, frames))
    chunk: list[bytes] = [b""] * (2 * count)
    chunk[0::2] = list(map(_RECORD.pack, repeat(RecordKind.FRAME, count), range(run.seq, run.end_seq + 1),
                           repeat(run.received_ns, count), map(len, datas)))
    chunk[1::2] = datas
    parts += chunk
    return count


def _parse_records(raw: bytes, header: BlockHeader, offset: int) -> list[Record]:
    records: list[Record] = []
    position, size = 0, len(raw)
    unpack = _RECORD.unpack_from
    previous_end = header.first_seq - 1
    previous_ns = header.first_ns

    def bad(message: str) -> JournalFormatError:
        return JournalFormatError("bad_payload", offset, f"record {len(records)}: {message}")

    while position < size:
        if size - position < _RECORD.size:
            raise bad("cut short")
        kind_code, seq, received_ns, length = unpack(raw, position)
        position += _RECORD.size
        if length > size - position:
            raise bad("data runs past the payload")
        data = raw[position:position + length]
        position += length
        try:
            kind = RecordKind(kind_code)
        except ValueError:
            raise bad(f"unknown record kind {kind_code}") from None
        end_seq = seq
        if kind is RecordKind.FRAME:
            record = Record(kind, seq, received_ns, data, seq)
        elif kind is RecordKind.GAP:
            if length < _GAP_END.size:
                raise bad("gap without its end")
            (end_seq,) = _GAP_END.unpack_from(data)
            record = Record(kind, seq, received_ns, data[_GAP_END.size:].decode("utf-8", "replace"), end_seq)
        else:
            record = Record(kind, seq, received_ns, data.decode("utf-8", "replace"), seq)
        if seq != previous_end + 1 or end_seq < seq:
            raise bad(f"seq {seq} does not follow {previous_end}")
        if received_ns < previous_ns:
            raise bad("receive time goes back")
        previous_end, previous_ns = end_seq, received_ns
        records.append(record)
    if len(records) != header.count or previous_end != header.last_seq or previous_ns != header.last_ns:
        raise JournalFormatError("bad_payload", offset, f"records do not match the header ({len(records)} "
                                 f"records ending at seq {previous_end}; header says {header.count} "
                                 f"ending at {header.last_seq})")
    return records


# --- scanning a segment ------------------------------------------------------------------------


@attrs.frozen
class BlockSpan:
    """An intact block: where it starts in its segment, and its header."""

    offset: int
    header: BlockHeader


@attrs.frozen
class Damage:
    """Bytes ``offset``..``end`` of a segment that hold no intact block.

    ``kind`` is the :class:`JournalFormatError` kind found at ``offset`` (or
    ``seq_gap`` / ``seq_order`` for intact blocks whose seqs do not follow);
    ``after_seq`` is the last seq intact before it and ``resumed_seq`` the first
    after it (None at the segment's start or end), so the seqs lost are
    ``after_seq + 1``..``resumed_seq - 1`` when both are known.
    """

    offset: int
    end: int
    kind: str
    message: str
    after_seq: int | None
    resumed_seq: int | None

    @property
    def lost(self) -> tuple[int | None, int | None]:
        """The first and last seq lost, each None where the damage reaches a segment's edge."""
        return (None if self.after_seq is None else self.after_seq + 1,
                None if self.resumed_seq is None else self.resumed_seq - 1)


@attrs.frozen
class TornTail:
    """An incomplete block at a segment's end: ``size`` bytes from ``offset``.

    What a process killed while writing leaves; ``zeroed`` when the bytes are all
    zero, as a file system may leave them after a power loss.
    """

    offset: int
    size: int
    zeroed: bool = False


@attrs.frozen
class SegmentScan:
    """All that one pass over a segment's bytes found.

    ``intact_end`` is where a torn tail starts (the length to truncate to), or the
    size. ``records`` holds the decoded records when the scan decoded them.
    """

    size: int
    header: SegmentHeader | None
    blocks: tuple[BlockSpan, ...]
    damage: tuple[Damage, ...]
    torn: TornTail | None

    @property
    def intact_end(self) -> int:
        """Where the torn tail starts (the length recovery truncates to), or the size."""
        return self.torn.offset if self.torn is not None else self.size

    @property
    def clean(self) -> bool:
        """No damage (a torn tail is not damage)."""
        return not self.damage

    @property
    def first_seq(self) -> int | None:
        """The first seq of the first intact block (None without one)."""
        return self.blocks[0].header.first_seq if self.blocks else None

    @property
    def last_seq(self) -> int | None:
        """The highest seq of any intact block (None without one)."""
        return max(block.header.last_seq for block in self.blocks) if self.blocks else None

    @property
    def first_ns(self) -> int | None:
        """The receive time of the first intact block's first record (None without one)."""
        return self.blocks[0].header.first_ns if self.blocks else None

    @property
    def last_ns(self) -> int | None:
        """The receive time of the last intact block's last record (None without one)."""
        return self.blocks[-1].header.last_ns if self.blocks else None


def walk_blocks(
    buf: Buffer,
    offset: int = SEGMENT_HEADER_SIZE,
    *,
    check_payloads: bool = True,
    decode: Callable[[BlockHeader, Buffer, int], object] | None = None,
    after_seq: int | None = None,
) -> Iterator[BlockSpan | Damage | TornTail]:
    """Walk a segment's blocks from ``offset``: each intact block, each damaged stretch,
    and at most one torn tail, last, in file order.

    ``check_payloads`` verifies each payload's CRC32 (reading every byte);
    without it only headers are checked, which is how a reader skips to a time
    cheaply (it checks payloads as it decodes them). ``decode``, when given, is
    called on each block (``BlockCodec.decode``) and a :class:`JournalFormatError`
    it raises makes that block damage. After damage, the walk resumes at the next
    offset where a block's checksums hold. Seqs are checked to follow across
    blocks (``seq_gap``, ``seq_order``), from ``after_seq`` when given (the seq
    before the segment's first, from its header).
    """
    size = len(buf)
    pending: tuple[int, JournalFormatError] | None = None  # damage found, not yet closed
    position = offset

    def close_damage(end: int, resumed: int | None) -> Damage:
        start, error = pending  # type: ignore[misc]
        return Damage(start, end, error.kind, error.message, after_seq, resumed)

    while position < size:
        try:
            header = parse_block_header(buf, position)
            if position + header.size > size:
                raise JournalFormatError("truncated", position, f"block payload incomplete: "
                                         f"{size - position - BLOCK_HEADER_SIZE} of {header.payload_size} bytes")
            if check_payloads or decode is not None:
                payload = buf[position + BLOCK_HEADER_SIZE:position + header.size]
                if decode is not None:
                    decode(header, payload, position)
                else:
                    computed = zlib.crc32(payload)
                    if computed != header.payload_crc:
                        raise JournalFormatError(
                            "payload_checksum", position, f"block payload checksum mismatch "
                            f"(stored {header.payload_crc:#010x}, computed {computed:#010x})")
        except JournalFormatError as error:
            if pending is None:
                if error.kind == "truncated" and _may_be_torn(buf, position):
                    yield TornTail(position, size - position)
                    return
                if _all_zero(buf, position):
                    yield TornTail(position, size - position, zeroed=True)
                    return
                pending = (position, error)
            found = _find_magic(buf, position + 1)
            if found < 0:
                yield close_damage(size, None)
                return
            position = found
            continue
        # an intact block
        if pending is not None:
            yield close_damage(position, header.first_seq)
            pending = None
        elif after_seq is not None and header.first_seq != after_seq + 1:
            kind = "seq_gap" if header.first_seq > after_seq + 1 else "seq_order"
            message = (f"seqs {after_seq + 1}..{header.first_seq - 1} are missing with no gap record"
                       if kind == "seq_gap" else f"block starts at seq {header.first_seq}, "
                       f"not after {after_seq}")
            yield Damage(position, position, kind, message, after_seq, header.first_seq)
        yield BlockSpan(position, header)
        after_seq = header.last_seq if after_seq is None else max(after_seq, header.last_seq)
        position += header.size
    if pending is not None:
        yield close_damage(size, None)


def _may_be_torn(buf: Buffer, position: int) -> bool:
    """Whether the bytes from ``position`` to the end can be the start of a block whose
    write was cut short: they begin as a block's magic does (what follows a valid
    header's magic is checked by its CRC when the header is complete)."""
    rest = bytes(buf[position:position + len(BLOCK_MAGIC)])
    return BLOCK_MAGIC.startswith(rest)


def _all_zero(buf: Buffer, position: int) -> bool:
    if buf[position:position + 1] != b"\0":
        return False  # the usual answer, without copying the rest of the file
    rest = bytes(buf[position:])
    return len(rest) > 0 and rest.count(0) == len(rest)


def _find_magic(buf: Buffer, start: int) -> int:
    """The next offset from ``start`` where a block with valid checksums begins, or -1."""
    size = len(buf)
    while True:
        found = buf.find(BLOCK_MAGIC, start)
        if found < 0:
            return -1
        try:
            header = parse_block_header(buf, found)
            if found + header.size <= size and zlib.crc32(buf[found + BLOCK_HEADER_SIZE:found + header.size]) == header.payload_crc:
                return found
        except JournalFormatError:
            pass
        start = found + 1


def scan_segment(
    buf: Buffer,
    *,
    check_payloads: bool = True,
    decode: Callable[[BlockHeader, Buffer, int], object] | None = None,
) -> SegmentScan:
    """Check a whole segment's bytes: its header, then every block (see :func:`walk_blocks`).

    Returns a :class:`SegmentScan`; never raises on bad bytes. A header shorter
    than 32 bytes that starts as a header does is a torn tail at offset 0 (a crash
    right after the file was created); any other bad header is damage at offset 0,
    and the blocks after it are still scanned.
    """
    header: SegmentHeader | None = None
    damage: list[Damage] = []
    try:
        header = parse_segment_header(buf)
    except JournalFormatError as error:
        if error.kind == "truncated" and SEGMENT_MAGIC.startswith(bytes(buf[:len(SEGMENT_MAGIC)])):
            return SegmentScan(len(buf), None, (), (), TornTail(0, len(buf)))
        if error.kind == "truncated" and _all_zero(buf, 0):
            return SegmentScan(len(buf), None, (), (), TornTail(0, len(buf), zeroed=True))
        damage.append(Damage(0, min(len(buf), SEGMENT_HEADER_SIZE), error.kind, error.message, None, None))
    blocks: list[BlockSpan] = []
    torn: TornTail | None = None
    before_first = None if header is None else header.first_seq - 1
    for item in walk_blocks(buf, SEGMENT_HEADER_SIZE, check_payloads=check_payloads, decode=decode,
                            after_seq=before_first):
        if isinstance(item, BlockSpan):
            blocks.append(item)
        elif isinstance(item, Damage):
            damage.append(item)
        else:
            torn = item
    return SegmentScan(len(buf), header, tuple(blocks), tuple(damage), torn)


# --- retention -----------------------------------------------------------------------------------


@attrs.frozen
class SegmentInfo:
    """What retention and seeking know of a segment without opening it: its name's
    first seq and start time, and its size."""

    name: str
    first_seq: int
    start_ns: int
    size: int


def retention_victims(
    segments: Sequence[SegmentInfo], *, now_ns: int, max_age_ns: int | None, max_bytes: int | None
) -> int:
    """How many of the oldest ``segments`` (sorted by seq) retention deletes now.

    A segment is too old when every record in it is: when the next segment started
    before ``now_ns - max_age_ns`` (a segment's records are never later than the next
    one's start). While the total size is over ``max_bytes``, the oldest go too. The
    newest segment (the one being written) is never a victim, and none is deleted
    past one that is kept: the journal stays one stretch without holes.
    """
    total = sum(segment.size for segment in segments)
    victims = 0
    for index in range(len(segments) - 1):
        too_old = max_age_ns is not None and segments[index + 1].start_ns < now_ns - max_age_ns
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break
        total -= segments[index].size
        victims += 1
    return victims


# --- the memory ring --------------------------------------------------------------------------

#: What one record costs in memory beyond its data's length: its slots in the ring's lists, the
#: str or bytes object's header (an estimate, not a measurement per record).
RECORD_OVERHEAD_BYTES = 160


class JournalRing:
    """The journal's recent past in memory: every record of the last ``max_seconds``
    (measured between receive times, from the newest record back), at most
    ``max_bytes`` of them, whichever binds first.

    Records are appended in seq order without holes, one seq each (a gap is the disk's
    record, never the ring's), so a seq is found by subtraction and a receive time by
    bisection. A bound of 0 turns the ring off (appends are dropped). Memory is counted as
    each record's data length plus :data:`RECORD_OVERHEAD_BYTES`.

    The records are kept column by column, in parallel lists (data, receive time, bytes
    counted before each), and the few records that are not frames have their kind in a
    dict: appending a read's frames (:meth:`extend`) is then a few list operations in C
    whatever their number, and eviction two bisections. No object is made per record,
    which also keeps Python's collector from walking millions of them (a tuple or
    :class:`Record` per record made each full collection take 190 ms with a million
    held). :class:`Record` values are made only when records are read.
    """

    def __init__(self, *, max_seconds: float, max_bytes: int) -> None:
        self.max_ns = int(max_seconds * 1_000_000_000)
        self.max_bytes = max_bytes
        self.enabled = max_seconds > 0 and max_bytes > 0
        self.evicted = 0
        # One entry per record; position i holds seq ``_base_seq + i``. The entries before
        # ``_head`` are evicted (their data already dropped); the lists are compacted now and then.
        self._data: list[str | bytes | None] = []
        self._times: list[int] = []
        self._bytes_before: list[int] = []  # bytes counted from position 0 up to each record...
        self._bytes_total = 0  # ... and up to the end
        self._kinds: dict[int, RecordKind] = {}  # seq -> kind of the records that are not frames
        self._base_seq = 0
        self._head = 0

    def __len__(self) -> int:
        return len(self._data) - self._head

    @property
    def size_bytes(self) -> int:
        """The memory the records held count for."""
        return self._bytes_total - self._bytes_before[self._head] if len(self) else 0

    @property
    def first_seq(self) -> int | None:
        """The oldest seq held, or None when empty."""
        return self._base_seq + self._head if len(self) else None

    @property
    def last_seq(self) -> int | None:
        """The newest seq held, or None when empty."""
        return self._base_seq + len(self._data) - 1 if len(self) else None

    @property
    def oldest_ns(self) -> int | None:
        """The receive time of the oldest record held, or None when empty."""
        return self._times[self._head] if len(self) else None

    @property
    def newest_ns(self) -> int | None:
        """The receive time of the newest record held, or None when empty."""
        return self._times[-1] if len(self) else None

    def append(self, record: Record) -> None:
        """Keep ``record`` and evict what the bounds no longer allow.

        Raises ValueError when its seq does not follow the newest record's, its time is
        earlier (the :class:`Journal` guarantees both) or it stands for more than one seq.
        """
        if not self.enabled:
            return
        if record.end_seq != record.seq:
            raise ValueError(f"a record of seqs {record.seq}..{record.end_seq}: the ring holds one seq a record")
        self._check_follows(record.seq, record.received_ns)
        if record.kind is not RecordKind.FRAME:
            self._kinds[record.seq] = record.kind
        self._keep(record.seq, record.received_ns, (record.data,))

    def extend(self, first_seq: int, received_ns: int, frames: Sequence[str | bytes]) -> None:
        """Keep ``frames``, received together at ``received_ns``, as the records of seqs
        ``first_seq`` on; evict what the bounds no longer allow. Raises ValueError as
        :meth:`append` does."""
        if not self.enabled or not frames:
            return
        self._check_follows(first_seq, received_ns)
        self._keep(first_seq, received_ns, frames)

    def _check_follows(self, seq: int, received_ns: int) -> None:
        newest = self.last_seq
        if newest is not None:
            if seq != newest + 1:
                raise ValueError(f"seq {seq} does not follow {newest}")
            if received_ns < self._times[-1]:
                raise ValueError("receive time goes back")

    def _keep(self, first_seq: int, received_ns: int, datas: Sequence[str | bytes]) -> None:
        data = self._data
        if len(data) == self._head:  # empty: the first record held sets the numbering
            self._base_seq = first_seq - len(data)
        count = len(datas)
        data.extend(datas)
        self._times.extend(repeat(received_ns, count))
        # the running byte count before each record, and after the last (C loops, not Python's)
        counted = list(accumulate(map(operator.add, map(len, datas), repeat(RECORD_OVERHEAD_BYTES, count)),
                                  initial=self._bytes_total))
        self._bytes_total = counted.pop()
        self._bytes_before.extend(counted)
        head = self._head
        if self._bytes_total - self._bytes_before[head] > self.max_bytes or \
                self._times[head] < received_ns - self.max_ns:
            self._evict(received_ns)

    def _evict(self, newest_ns: int) -> None:
        data, end = self._data, len(self._data)
        head = self._head
        # the first record young enough, and the first from which on the rest fit the bytes
        cut = max(bisect.bisect_left(self._times, newest_ns - self.max_ns, head, end),
                  bisect.bisect_left(self._bytes_before, self._bytes_total - self.max_bytes, head, end))
        data[head:cut] = repeat(None, cut - head)  # the data is freed now, not at compaction
        if self._kinds:
            first_kept = self._base_seq + cut
            for seq in [seq for seq in self._kinds if seq < first_kept]:
                del self._kinds[seq]
        self.evicted += cut - head
        self._head = head = cut
        if head > 1024 and head * 2 > end:
            for column in (data, self._times, self._bytes_before):
                del column[:head]
            self._base_seq += head
            self._head = 0

    def _record_at(self, index: int) -> Record:
        seq = self._base_seq + index
        kind = self._kinds.get(seq, RecordKind.FRAME) if self._kinds else RecordKind.FRAME
        return Record(kind, seq, self._times[index], self._data[index], seq)  # type: ignore[arg-type]

    def get(self, seq: int) -> Record:
        """The record with ``seq``; raises :class:`SeqEvicted` when it is not held."""
        index = self._index_of(seq)
        if index is None:
            raise SeqEvicted(seq)
        return self._record_at(index)

    def _index_of(self, seq: int) -> int | None:
        index = seq - self._base_seq
        return index if self._head <= index < len(self._data) else None

    def covers_time(self, received_ns: int) -> bool:
        """Whether every record received at or after ``received_ns`` is still held."""
        if not self.enabled:
            return False
        return self.evicted == 0 or (len(self) > 0 and received_ns >= self._times[self._head])

    def seq_at_time(self, received_ns: int) -> int:
        """The seq of the first record held received at or after ``received_ns``; the next
        seq to come when none is (the ring empty, or every record older)."""
        if not len(self):
            raise SeqEvicted("the ring is empty: the next seq is the journal's to say")
        return self._base_seq + bisect.bisect_left(self._times, received_ns, lo=self._head)

    def records_from(self, seq: int, limit: int | None = None) -> list[Record]:
        """Up to ``limit`` records from ``seq`` on (all of them without a limit); empty when
        ``seq`` is past the newest. Raises :class:`SeqEvicted` when ``seq`` is older than
        the oldest held."""
        first, last = self.first_seq, self.last_seq
        if first is None or last is None or seq > last:
            return []
        if seq < first:
            raise SeqEvicted(seq)
        start = seq - self._base_seq
        stop = len(self._data) if limit is None else min(len(self._data), start + limit)
        return [self._record_at(index) for index in range(start, stop)]

    def iter_from(self, seq: int) -> Iterator[Record]:
        """Records from ``seq`` on, including those appended while iterating; stops at the
        newest. Raises :class:`SeqEvicted` if the iteration falls behind the ring."""
        while True:
            index = self._index_of(seq)
            if index is None:
                if self.first_seq is not None and seq < self.first_seq:
                    raise SeqEvicted(seq)
                return
            record = self._record_at(index)
            yield record
            seq = record.end_seq + 1


class Journal:
    """The router's side of the journal: numbers records, keeps the ring, passes each on.

    ``next_seq`` and ``not_before_ns`` continue a journal on disk (what recovery of
    the journal directory returns); receive times are clamped so they never go back,
    even when the wall clock does, because lookups by time bisect. ``sink`` is called
    with every entry: each outage's record and each read's :class:`FrameRun` (the disk
    writer's non-blocking ``offer``); it must not block.
    """

    def __init__(
        self,
        *,
        next_seq: int = 1,
        not_before_ns: int = 0,
        memory_seconds: float = 300.0,
        memory_bytes: int = 256_000_000,
        sink: Callable[[Entry], object] | None = None,
    ) -> None:
        self.next_seq = next_seq
        self.last_ns = not_before_ns
        self.ring = JournalRing(max_seconds=memory_seconds, max_bytes=memory_bytes)
        self._ring_extend = self.ring.extend  # bound once: this runs for every read
        self._sink = sink

    def frames(self, frames: Sequence[str | bytes], received_ns: int) -> int:
        """Journal the frames one read from upstream brought, received at ``received_ns`` (ns
        since the epoch); returns the first one's seq (the others follow it, one each).

        Takes the frames as received (not copied, not encoded here) and keeps the sequence
        itself: it must not change afterwards. The sink gets them as one :class:`FrameRun`.
        """
        first = self.next_seq
        count = len(frames)
        if not count:
            return first
        received_ns = self._stamp(received_ns)
        self.next_seq = first + count
        self._ring_extend(first, received_ns, frames)
        if self._sink is not None:
            self._sink(FrameRun(first, first + count - 1, received_ns, frames))
        return first

    def frame(self, data: str | bytes, received_ns: int) -> Record:
        """Journal one frame received from upstream at ``received_ns`` (ns since the epoch).

        Takes the frame as received (not copied, not encoded here); returns its record.
        """
        return self._append(RecordKind.FRAME, data, received_ns)

    def upstream_lost(self, reason: str, received_ns: int) -> Record:
        """Journal the loss of the upstream connection, with why."""
        return self._append(RecordKind.UPSTREAM_LOST, reason, received_ns)

    def upstream_restored(self, reason: str, received_ns: int) -> Record:
        """Journal that the upstream connection is back, with what it was (e.g. the outage's length)."""
        return self._append(RecordKind.UPSTREAM_RESTORED, reason, received_ns)

    def _stamp(self, received_ns: int) -> int:
        """The receive time to journal under: never earlier than the last one, even when the wall
        clock stepped back (lookups by time bisect)."""
        if received_ns < self.last_ns:
            received_ns = self.last_ns
        self.last_ns = received_ns
        return received_ns

    def _append(self, kind: RecordKind, data: str | bytes, received_ns: int) -> Record:
        received_ns = self._stamp(received_ns)
        seq = self.next_seq
        self.next_seq = seq + 1
        record = Record(kind, seq, received_ns, data, seq)
        self.ring.append(record)
        if self._sink is not None:
            self._sink(record)
        return record

    @property
    def sink(self) -> Callable[[Entry], object] | None:
        """Where every record goes after the ring (None: nowhere)."""
        return self._sink

    @sink.setter
    def sink(self, sink: Callable[[Entry], object] | None) -> None:
        """Send the records from now on to ``sink`` (None: nowhere)."""
        self._sink = sink


# --- replay selection -----------------------------------------------------------------------------

_split_frame = msgspec.json.Decoder(list[msgspec.Raw]).decode
_read_keys = msgspec.json.Decoder(list[EventKey]).decode


class _EventType(msgspec.Struct):
    ev: object = None


_read_types = msgspec.json.Decoder(list[_EventType]).decode


def _split_objects(frame: str | bytes) -> list[msgspec.Raw]:
    """The raw events of a frame, checked in C to be a JSON array of objects."""
    events = _split_frame(frame)
    _check_objects(frame)
    return events


class _AnyObject(msgspec.Struct):
    """Any JSON object, its fields skipped."""


_check_objects = msgspec.json.Decoder(list[_AnyObject]).decode



class EventSelector:
    """The data events of a frame that a subscriber holding ``channels`` receives live.

    Decided as :func:`~proxy.core.routing.route_frame` decides: the same event
    parsing, the same symbol table, the same registry lookup (a private
    :class:`SubscriptionRegistry` holding the channels); statuses are never
    selected (routing takes them aside), ``*`` selects every data event.
    """

    def __init__(self, channels: Iterable[Channel]) -> None:
        channels = tuple(channels)
        self.channels = channels
        self.everything = EVERYTHING_CHANNEL in channels
        self._registry: SubscriptionRegistry[str] = SubscriptionRegistry(clock=lambda: 0.0)
        self._registry.subscribe("replay", channels)
        #: Whether the frame :meth:`select` last read holds a status event (its parse says so;
        #: False where a scan found none could be there): the replay relays an upstream tier's
        #: statuses, and a frame without one needs no second look.
        self.saw_status = False

    def select(self, frame: str | bytes) -> list[msgspec.Raw]:
        """The selected events of ``frame``, as their original bytes, in order.

        Raises :class:`~proxy.core.routing.FrameError` for a frame routing would drop.
        """
        everything = self.everything
        self.saw_status = False
        if everything and not may_hold_status(frame):
            # Every event is data and selected: routing's own fast path (it relays such a
            # frame whole to `*` holders after checking it is an array of objects).
            try:
                return _split_objects(frame)
            except msgspec.DecodeError as error:
                raise FrameError(f"frame is not a JSON array of objects: {error}") from None
        try:
            # every event's routing fields in one call into C, not one call per event
            keys = _read_keys(frame)
        except msgspec.DecodeError as error:
            raise FrameError(f"frame is not a JSON array of objects: {error}") from None
        targets_of = self._registry.channel_targets
        if len(keys) == 1:
            # Polygon's usual frame, one event: no second parse to cut it out. Its bytes are the
            # frame's between the brackets when nothing else is there (msgspec.Raw would be the
            # same span); a frame with spaces around its event takes the general path.
            key = keys[0]
            if key.ev == "status":
                self.saw_status = True
                return []  # statuses are never selected: routing takes them aside
            if not everything:
                symbol = event_symbol(key)
                if symbol is None or not targets_of(key.ev, symbol):  # type: ignore[arg-type]
                    return []
            if isinstance(frame, bytes) and frame[1:2] == b"{" and frame[-2:] == b"}]" and frame[:1] == b"[":
                return [frame[1:-1]]  # type: ignore[list-item]
        try:
            raw_events = _split_frame(frame)
        except msgspec.DecodeError as error:
            raise FrameError(f"frame is not a JSON array of objects: {error}") from None
        selected: list[msgspec.Raw] = []
        for raw, key in zip(raw_events, keys):
            ev = key.ev
            if ev == "status":
                self.saw_status = True
                continue
            if everything:
                selected.append(raw)
                continue
            symbol = event_symbol(key)
            if symbol is not None and targets_of(ev, symbol):  # type: ignore[arg-type]
                selected.append(raw)
        return selected


def count_event_types(frame: str | bytes, into: Counter[str]) -> int:
    """Add the events of ``frame`` to ``into`` by type (``ev``; ``?`` where it is not a
    string) and return how many there were. Raises :class:`FrameError` for a frame that
    is not a JSON array of objects."""
    try:
        events = _read_types(frame)
    except msgspec.DecodeError as error:
        raise FrameError(f"frame is not a JSON array of objects: {error}") from None
    into.update(event.ev if isinstance(event.ev, str) else "?" for event in events)
    return len(events)


def format_ns(received_ns: int) -> str:
    """A receive time as ISO 8601 in UTC to the ns: ``2026-11-25T10:15:00.123456789Z``."""
    seconds, nanos = divmod(received_ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"
