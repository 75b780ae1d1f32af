"""The journal's sans-I/O core: records and blocks round-trip, torn tails are told from damage
at every byte, damage is located precisely, the memory ring keeps its bounds and finds records,
and replay selects exactly the events live routing would."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from proxy.core.journal import (
    BLOCK_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    ZSTD_WINDOW_LOG,
    BlockCodec,
    EventSelector,
    FrameRun,
    RECORD_OVERHEAD_BYTES,
    Journal,
    JournalFormatError,
    JournalRing,
    Record,
    RecordKind,
    SegmentInfo,
    SeqEvicted,
    count_event_types,
    encode_segment_header,
    format_ns,
    frame_record,
    gap_record,
    outage_record,
    parse_block_header,
    parse_segment_name,
    retention_victims,
    scan_segment,
    segment_name,
)
from proxy.core.protocol import parse_channel_list
from proxy.core.routing import FrameError, route_frame
from proxy.core.subscriptions import SubscriptionRegistry
from proxy.sim.market import MarketModel, frame_of, prebuild, synthetic_symbols

CODEC = BlockCodec()
T0 = 1_764_000_000_000_000_000  # ns, late 2025


def as_stored(record: Record) -> Record:
    """A record as it reads back from disk: frames as bytes, reasons as str."""
    data = record.data
    if record.kind is RecordKind.FRAME and isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    elif record.kind is not RecordKind.FRAME and isinstance(data, bytes):
        data = data.decode()
    return Record(record.kind, record.seq, record.received_ns, data, record.end_seq)


def numbered(specs: list[tuple[int, object, int, int]], first_seq: int = 1) -> list[Record]:
    """Records from (kind, data, ns step, gap length) with contiguous seqs and rising times."""
    records, seq, ns = [], first_seq, T0
    for kind, data, step, gap_length in specs:
        ns += step
        if kind == RecordKind.FRAME:
            records.append(frame_record(seq, ns, data))
        elif kind == RecordKind.GAP:
            records.append(gap_record(seq, seq + gap_length, ns, str(data)))
        else:
            records.append(outage_record(RecordKind(kind), seq, ns, str(data)))
        seq = records[-1].end_seq + 1
    return records


def segment_of(blocks: list[list[Record]]) -> tuple[bytes, list[int]]:
    """A segment holding these blocks, and each block's offset."""
    data = bytearray(encode_segment_header(blocks[0][0].seq, blocks[0][0].received_ns))
    offsets = []
    for records in blocks:
        offsets.append(len(data))
        data += CODEC.encode(records)
    return bytes(data), offsets


def sample_blocks(count: int = 3, per_block: int = 5) -> list[list[Record]]:
    model = MarketModel(synthetic_symbols(10), seed=3)
    records = numbered([(RecordKind.FRAME, frame_of(model.stream_events(20, 1000 + i)), 1000, 0)
                        for i in range(count * per_block)])
    return [records[i:i + per_block] for i in range(0, len(records), per_block)]


def decoded(data: bytes) -> list[Record]:
    scan = scan_segment(data, decode=CODEC.decode)
    out = []
    for span in scan.blocks:
        start = span.offset + BLOCK_HEADER_SIZE
        out += CODEC.decode(span.header, data[start:start + span.header.payload_size], span.offset)
    return out


# --- the block format --------------------------------------------------------------------------

record_specs = st.lists(
    st.tuples(
        st.sampled_from(list(RecordKind)),
        st.one_of(st.binary(max_size=300), st.text(max_size=100)),
        st.integers(0, 10**9),
        st.integers(0, 50),
    ),
    min_size=1, max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(record_specs, st.integers(1, 2**40), st.data())
def test_records_round_trip_through_blocks_and_segments(specs, first_seq, data):
    records = numbered(specs, first_seq)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(records) - 1), max_size=5)) if len(records) > 1 else [])
    blocks = [records[a:b] for a, b in zip([0] + cuts, cuts + [len(records)])]
    segment, offsets = segment_of(blocks)
    scan = scan_segment(segment, decode=CODEC.decode)
    assert scan.clean and scan.torn is None
    assert [span.offset for span in scan.blocks] == offsets
    assert scan.header.first_seq == first_seq and scan.first_seq == first_seq
    assert scan.last_seq == records[-1].end_seq
    assert decoded(segment) == [as_stored(record) for record in records]
    for span, block in zip(scan.blocks, blocks):
        header = span.header
        assert (header.first_seq, header.last_seq, header.count) == (block[0].seq, block[-1].end_seq, len(block))
        assert (header.first_ns, header.last_ns) == (block[0].received_ns, block[-1].received_ns)


def test_a_block_is_compressed_with_tables_sized_for_a_block():
    # The writer's zstd settings (ZSTD_WINDOW_LOG, ZSTD_HASH_LOG): a window of one block, not
    # level 1's 512 KiB; the block still reads back with a plain decompressor, byte for byte.
    frames = [frame_of(events) for events in prebuild(MarketModel(synthetic_symbols(50), seed=3), 8_000, 200)]
    records = [frame_record(seq, T0 + seq, frame) for seq, frame in enumerate(frames, start=1)]
    block = CODEC.encode(records)
    header = parse_block_header(block, 0)
    payload = block[BLOCK_HEADER_SIZE:]
    assert header.raw_size > 2 << ZSTD_WINDOW_LOG  # past both windows
    assert zstandard.get_frame_parameters(payload).window_size == 1 << ZSTD_WINDOW_LOG
    raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=header.raw_size)
    assert len(raw) == header.raw_size
    assert CODEC.decode(header, payload) == [as_stored(record) for record in records]


def test_the_encoder_refuses_records_out_of_order():
    with pytest.raises(ValueError):
        CODEC.encode([frame_record(2, T0, b"[]"), frame_record(2, T0, b"[]")])
    with pytest.raises(ValueError):
        CODEC.encode([frame_record(2, T0, b"[]"), frame_record(3, T0 - 1, b"[]")])
    with pytest.raises(ValueError):
        CODEC.encode([gap_record(2, 5, T0, "x"), frame_record(5, T0, b"[]")])  # inside the gap
    with pytest.raises(ValueError):
        CODEC.encode([])


# frames as bytes, as text, and as text ending in a lone surrogate (which strict UTF-8 refuses)
frame_data = st.one_of(st.binary(max_size=200), st.text(max_size=60),
                       st.builds(lambda text, code: text + chr(code), st.text(max_size=30), st.integers(0xD800, 0xDFFF)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.lists(frame_data, min_size=1, max_size=12), st.text(max_size=20)), min_size=1,
                max_size=12), st.integers(1, 2**40), st.lists(st.integers(0, 10**6), min_size=12, max_size=12))
def test_a_run_of_frames_is_encoded_byte_for_byte_as_its_records(entries, first_seq, steps):
    """The writer's fast path for a read's frames (C loops) against the plain one, record by record:
    the same bytes, text and binary frames mixed or not; decoding gives the records back."""
    runs_and_records: list = []
    seq, ns = first_seq, T0
    for entry, step in zip(entries, steps):
        ns += step
        if isinstance(entry, list):
            runs_and_records.append(FrameRun(seq, seq + len(entry) - 1, ns, entry))
            seq += len(entry)
        else:
            runs_and_records.append(outage_record(RecordKind.UPSTREAM_LOST, seq, ns, entry))
            seq += 1
    expanded: list[Record] = []
    for entry in runs_and_records:
        if isinstance(entry, FrameRun):  # the records a run stands for, one a frame
            expanded += [frame_record(entry.seq + i, entry.received_ns, data) for i, data in enumerate(entry.frames)]
        else:
            expanded.append(entry)
    block = CODEC.encode(runs_and_records)
    assert block == CODEC.encode(expanded)
    header = parse_block_header(block, 0)
    assert header.count == len(expanded) and header.last_seq == seq - 1
    assert CODEC.decode(header, block[BLOCK_HEADER_SIZE:]) == [as_stored(record) for record in expanded]


def test_a_run_must_hold_one_frame_per_seq():
    with pytest.raises(ValueError):
        CODEC.encode([FrameRun(1, 3, T0, [b"[]", b"[]"])])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**19), st.integers(0, 4_000_000_000 * 10**9))
def test_segment_names_sort_by_seq_and_carry_the_start(seq, start_ns):
    name = segment_name(seq, start_ns)
    assert parse_segment_name(name) == (seq, start_ns)
    assert segment_name(seq + 1, 0) > segment_name(seq, start_ns)


def test_other_names_are_not_segments():
    for name in ("LOCK", "journal-1-20261125T101500.000000000Z.seg", "notes.txt",
                 segment_name(1, T0) + ".bak", "x" + segment_name(1, T0)):
        assert parse_segment_name(name) is None


# --- torn tails and damage -------------------------------------------------------------------------


def test_a_torn_tail_at_every_byte_of_the_last_block_keeps_everything_before_it():
    blocks = sample_blocks()
    segment, offsets = segment_of(blocks)
    last = offsets[-1]
    expected = [as_stored(record) for block in blocks[:-1] for record in block]
    for cut in range(last, len(segment)):
        scan = scan_segment(segment[:cut], decode=CODEC.decode)
        assert scan.clean, (cut, scan.damage)
        assert len(scan.blocks) == len(blocks) - 1
        if cut == last:
            assert scan.torn is None
        else:
            assert scan.torn is not None and scan.torn.offset == last and scan.torn.size == cut - last
        assert scan.intact_end == last
        assert decoded(segment[:cut]) == expected
    assert scan_segment(segment, decode=CODEC.decode).torn is None


def test_a_torn_segment_header_is_a_torn_tail_at_byte_zero():
    segment, _ = segment_of(sample_blocks(1))
    for cut in range(1, SEGMENT_HEADER_SIZE):
        scan = scan_segment(segment[:cut])
        assert scan.clean and scan.blocks == () and scan.torn.offset == 0
    empty = scan_segment(segment[:SEGMENT_HEADER_SIZE])
    assert empty.clean and empty.torn is None and empty.blocks == ()


def test_a_zero_filled_tail_is_torn_not_damage():
    segment, offsets = segment_of(sample_blocks())
    scan = scan_segment(segment + bytes(5000))
    assert scan.clean and len(scan.blocks) == 3
    assert scan.torn.offset == len(segment) and scan.torn.zeroed


def test_garbage_after_the_last_block_is_damage():
    segment, _ = segment_of(sample_blocks())
    scan = scan_segment(segment + b"not a block at all")
    assert not scan.clean and scan.torn is None
    assert scan.damage[0].offset == len(segment) and scan.damage[0].end == len(segment) + 18


def test_a_flipped_byte_anywhere_in_a_middle_block_is_located_and_costs_only_that_block():
    blocks = sample_blocks()
    segment, offsets = segment_of(blocks)
    start, end = offsets[1], offsets[2]
    lost = (blocks[1][0].seq, blocks[1][-1].end_seq)
    for position in range(start, end):
        damaged = bytearray(segment)
        damaged[position] ^= 0x40
        scan = scan_segment(bytes(damaged), decode=CODEC.decode)
        assert len(scan.damage) == 1, position
        damage = scan.damage[0]
        assert (damage.offset, damage.end) == (start, end), position
        assert damage.lost == lost
        expected_kind = ("bad_magic" if position < start + 4 else
                         "header_checksum" if position < start + BLOCK_HEADER_SIZE else "payload_checksum")
        assert damage.kind == expected_kind, position
        assert [span.offset for span in scan.blocks] == [offsets[0], offsets[2]]
        assert scan.torn is None


def test_a_damaged_segment_header_is_reported_and_the_blocks_still_read():
    segment, offsets = segment_of(sample_blocks())
    damaged = bytearray(segment)
    damaged[10] ^= 1
    scan = scan_segment(bytes(damaged), decode=CODEC.decode)
    assert [d.offset for d in scan.damage] == [0] and scan.damage[0].kind == "segment_header"
    assert scan.header is None and len(scan.blocks) == 3


def test_a_block_missing_from_the_middle_is_a_seq_gap():
    blocks = sample_blocks()
    segment, offsets = segment_of(blocks)
    holed = segment[:offsets[1]] + segment[offsets[2]:]
    scan = scan_segment(holed, decode=CODEC.decode)
    assert len(scan.blocks) == 2
    (damage,) = scan.damage
    assert damage.kind == "seq_gap" and damage.lost == (blocks[1][0].seq, blocks[1][-1].end_seq)


def test_a_gap_record_makes_a_hole_in_seqs_legitimate():
    records = numbered([(RecordKind.FRAME, b"[]", 1, 0), (RecordKind.GAP, "disk", 1, 9),
                        (RecordKind.FRAME, b"[]", 1, 0)])
    segment, _ = segment_of([records[:1], records[1:2], records[2:]])
    scan = scan_segment(segment, decode=CODEC.decode)
    assert scan.clean and records[2].seq == 12


def test_a_header_cannot_claim_an_absurd_size():
    segment, offsets = segment_of(sample_blocks(1))
    header = parse_block_header(segment, offsets[0])
    assert header.count == 5
    with pytest.raises(JournalFormatError) as raised:
        parse_block_header(segment, offsets[0] + 1)
    assert raised.value.kind == "bad_magic" and raised.value.offset == offsets[0] + 1


# --- retention ---------------------------------------------------------------------------------------

HOUR = 3600 * 10**9


def infos(*specs: tuple[int, int]) -> list[SegmentInfo]:
    """Segments from (start hour, size)."""
    return [SegmentInfo(f"s{i}", i * 100 + 1, T0 + hour * HOUR, size) for i, (hour, size) in enumerate(specs)]


def test_retention_deletes_segments_whose_every_record_is_too_old():
    segments = infos((0, 10), (1, 10), (2, 10), (3, 10))
    now = T0 + 4 * HOUR
    # segment 0 ends when segment 1 starts (hour 1): older than 2.5 h
    assert retention_victims(segments, now_ns=now, max_age_ns=int(2.5 * HOUR), max_bytes=None) == 1
    assert retention_victims(segments, now_ns=now, max_age_ns=int(1.5 * HOUR), max_bytes=None) == 2
    # the newest is never deleted, however old
    assert retention_victims(segments, now_ns=T0 + 100 * HOUR, max_age_ns=HOUR, max_bytes=None) == 3
    assert retention_victims(segments, now_ns=now, max_age_ns=10 * HOUR, max_bytes=None) == 0


def test_retention_deletes_the_oldest_while_over_the_size_bound():
    segments = infos((0, 40), (1, 30), (2, 20), (3, 10))
    now = T0 + 4 * HOUR
    assert retention_victims(segments, now_ns=now, max_age_ns=None, max_bytes=100) == 0
    assert retention_victims(segments, now_ns=now, max_age_ns=None, max_bytes=99) == 1
    assert retention_victims(segments, now_ns=now, max_age_ns=None, max_bytes=30) == 2
    assert retention_victims(segments, now_ns=now, max_age_ns=None, max_bytes=1) == 3
    assert retention_victims(segments[:1], now_ns=now, max_age_ns=1, max_bytes=1) == 0


# --- the ring ------------------------------------------------------------------------------------------


def fill(ring: JournalRing, count: int, step_ns: int = 10**9, size: int = 100, first: int = 1) -> list[Record]:
    records = [frame_record(first + i, T0 + (first - 1 + i) * step_ns, b"x" * size) for i in range(count)]
    for record in records:
        ring.append(record)
    return records


def test_the_ring_keeps_the_last_seconds():
    ring = JournalRing(max_seconds=10, max_bytes=10**9)
    records = fill(ring, 100)  # one a second
    assert len(ring) == 11  # ages 0..10 s from the newest
    assert (ring.first_seq, ring.last_seq) == (90, 100)
    assert ring.oldest_ns == records[89].received_ns and ring.newest_ns == records[99].received_ns


def test_the_ring_keeps_its_byte_bound():
    ring = JournalRing(max_seconds=10**6, max_bytes=10_000)
    fill(ring, 1000, size=840)  # 1000 bytes each with the overhead
    assert len(ring) == 10 and ring.size_bytes == 10_000
    assert ring.first_seq == 991


def test_whichever_bound_binds_first():
    by_time = JournalRing(max_seconds=5, max_bytes=10_000)
    fill(by_time, 50, step_ns=10**9, size=40)  # 200 bytes each: time binds (6 records)
    by_bytes = JournalRing(max_seconds=5, max_bytes=10_000)
    fill(by_bytes, 500, step_ns=10**6, size=40)  # 1 ms apart: bytes bind (50 records)
    assert len(by_time) == 6 and len(by_bytes) == 50


def test_ring_lookups_by_time_and_seq():
    ring = JournalRing(max_seconds=1000, max_bytes=10**9)
    records = fill(ring, 50, step_ns=1000)
    assert ring.get(7) == records[6]
    assert ring.seq_at_time(T0 + 7000) == 8
    assert ring.seq_at_time(T0 + 6999) == 8
    assert ring.seq_at_time(T0 - 5) == 1
    assert ring.seq_at_time(T0 + 10**9) == 51  # after the newest: the next seq to come
    assert [r.seq for r in ring.records_from(45)] == [45, 46, 47, 48, 49, 50]
    assert [r.seq for r in ring.records_from(45, limit=2)] == [45, 46]
    assert ring.records_from(51) == []
    with pytest.raises(SeqEvicted):
        ring.get(51)


def test_ring_lookups_survive_eviction_and_compaction():
    ring = JournalRing(max_seconds=10**6, max_bytes=500 * 260)
    records = fill(ring, 5000, step_ns=1000)
    assert len(ring) == 500 and ring.first_seq == 4501
    assert ring.get(4700) == records[4699]
    assert ring.seq_at_time(records[4799].received_ns) == 4800
    assert not ring.covers_time(records[4000].received_ns)
    assert ring.covers_time(records[4600].received_ns)
    with pytest.raises(SeqEvicted):
        ring.get(4500)
    with pytest.raises(SeqEvicted):
        ring.records_from(10)


def test_iterating_the_ring_sees_appends_and_notices_falling_behind():
    ring = JournalRing(max_seconds=10**6, max_bytes=20 * 260)
    fill(ring, 10)
    reader = ring.iter_from(5)
    assert [next(reader).seq for _ in range(6)] == [5, 6, 7, 8, 9, 10]
    fill(ring, 2, first=11)
    assert [r.seq for r in reader] == [11, 12]
    behind = ring.iter_from(ring.first_seq)
    next(behind)
    fill(ring, 40, first=13)
    with pytest.raises(SeqEvicted):
        list(behind)


def test_a_ring_with_a_zero_bound_is_off():
    ring = JournalRing(max_seconds=0, max_bytes=10**9)
    fill(ring, 5)
    assert len(ring) == 0 and not ring.covers_time(T0)


def test_the_ring_refuses_holes_and_time_going_back():
    ring = JournalRing(max_seconds=10, max_bytes=10**9)
    fill(ring, 3)
    with pytest.raises(ValueError):
        ring.append(frame_record(5, T0 + 10**10, b""))
    with pytest.raises(ValueError):
        ring.append(frame_record(4, T0, b""))


class RingAgainstAModel(RuleBasedStateMachine):
    """The ring, fed a read's frames at a time (and an outage now and then), holds exactly what
    its definition says: the longest run of the newest records whose oldest is at most
    ``max_seconds`` older than the newest and which count at most ``max_bytes`` together; every
    lookup answers from that, kinds included."""

    @initialize(seconds=st.integers(1, 50), max_bytes=st.integers(1, 5_000))
    def start(self, seconds: int, max_bytes: int) -> None:
        self.ring = JournalRing(max_seconds=seconds, max_bytes=max_bytes)
        self.max_ns, self.max_bytes = seconds * 10**9, max_bytes
        self.records: list[Record] = []  # everything ever appended

    def held(self) -> list[Record]:
        kept: list[Record] = []
        total = 0
        for record in reversed(self.records):
            total += len(record.data) + RECORD_OVERHEAD_BYTES
            if total > self.max_bytes or record.received_ns < self.records[-1].received_ns - self.max_ns:
                break
            kept.append(record)
        return kept[::-1]

    def next_seq_and_ns(self, step_s: float) -> tuple[int, int]:
        if not self.records:
            return 7, T0
        return self.records[-1].seq + 1, self.records[-1].received_ns + int(step_s * 1e9)

    @rule(frames=st.lists(st.binary(max_size=300), max_size=6), step_s=st.sampled_from([0, 0.5, 3, 20, 80]))
    def a_read(self, frames: list[bytes], step_s: float) -> None:
        seq, ns = self.next_seq_and_ns(step_s)
        self.ring.extend(seq, ns, frames)
        self.records += [frame_record(seq + i, ns, data) for i, data in enumerate(frames)]

    @rule(reason=st.text(max_size=30), step_s=st.sampled_from([0, 1, 30]))
    def an_outage(self, reason: str, step_s: float) -> None:
        seq, ns = self.next_seq_and_ns(step_s)
        record = outage_record(RecordKind.UPSTREAM_LOST, seq, ns, reason)
        self.ring.append(record)
        self.records.append(record)

    @invariant()
    def holds_what_the_bounds_allow(self) -> None:
        if not hasattr(self, "ring"):
            return
        held, ring = self.held(), self.ring
        assert len(ring) == len(held)
        assert ring.records_from(held[0].seq if held else 1) == held
        assert ring.size_bytes == sum(len(r.data) + RECORD_OVERHEAD_BYTES for r in held)
        assert ring.evicted == len(self.records) - len(held)
        # an evicted outage's kind goes with it (no lookup would show a stale one: only memory would)
        assert all(ring.first_seq <= seq <= ring.last_seq for seq in ring._kinds)
        if not held:
            assert ring.first_seq is None and ring.last_seq is None
            return
        assert (ring.first_seq, ring.last_seq) == (held[0].seq, held[-1].seq)
        assert (ring.oldest_ns, ring.newest_ns) == (held[0].received_ns, held[-1].received_ns)
        middle = held[len(held) // 2]
        assert ring.get(middle.seq) == middle
        assert ring.seq_at_time(middle.received_ns) == next(r.seq for r in held if r.received_ns >= middle.received_ns)
        assert ring.seq_at_time(held[-1].received_ns + 1) == held[-1].seq + 1
        if len(self.records) > len(held):
            with pytest.raises(SeqEvicted):
                ring.get(held[0].seq - 1)
            assert not ring.covers_time(held[0].received_ns - 1) or held[0].received_ns == \
                self.records[-len(held) - 1].received_ns


test_the_ring_holds_what_its_bounds_allow = RingAgainstAModel.TestCase
test_the_ring_holds_what_its_bounds_allow.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_the_journal_numbers_a_read_and_hands_it_on_as_one_run():
    sunk: list = []
    journal = Journal(next_seq=10, not_before_ns=T0, memory_seconds=60, memory_bytes=10**6, sink=sunk.append)
    frames = ["[1]", b"[2]", "[3]"]
    assert journal.frames(frames, T0 - 7) == 10  # the wall clock stepped back: clamped
    assert journal.frames([], T0 + 50) == 13 and journal.next_seq == 13  # nothing read: nothing journaled
    lost = journal.upstream_lost("gone", T0 + 1)
    assert journal.frames(["[4]"], T0 + 2) == 14
    assert sunk == [FrameRun(10, 12, T0, frames), lost, FrameRun(14, 14, T0 + 2, ["[4]"])]
    assert sunk[0].frames is frames  # taken as it is: not copied
    assert [(r.seq, r.kind, r.received_ns, r.data) for r in journal.ring.records_from(10)] == [
        (10, RecordKind.FRAME, T0, "[1]"), (11, RecordKind.FRAME, T0, b"[2]"), (12, RecordKind.FRAME, T0, "[3]"),
        (13, RecordKind.UPSTREAM_LOST, T0 + 1, "gone"), (14, RecordKind.FRAME, T0 + 2, "[4]")]


def test_the_journal_numbers_records_clamps_time_and_feeds_its_sink():
    sunk: list[Record] = []
    journal = Journal(next_seq=41, not_before_ns=T0, memory_seconds=60, memory_bytes=10**6, sink=sunk.append)
    a = journal.frame("[]", T0 + 5)
    b = journal.upstream_lost("connection closed (1006)", T0 + 3)  # the wall clock stepped back
    c = journal.upstream_restored("after 1.0s", T0 + 9)
    d = journal.frame(b"[]", T0 - 100)
    assert [r.seq for r in sunk] == [41, 42, 43, 44] and sunk == [a, b, c, d]
    assert [r.received_ns for r in sunk] == [T0 + 5, T0 + 5, T0 + 9, T0 + 9]
    assert b.kind is RecordKind.UPSTREAM_LOST and b.reason == "connection closed (1006)"
    assert journal.ring.get(43) == c and journal.next_seq == 45


# --- replay selection ----------------------------------------------------------------------------------

ODD_EVENTS = [
    b'{"ev":"status","status":"success","message":"subscribed to: T.AAPL"}',
    b'{"ev":"LULD","T":"AAPL","h":1}',
    b'{"ev":"XT","pair":"BTC-USD","p":1}',
    b'{"ev":"C","p":"EUR/USD","a":1}',
    b'{"ev":"NEW","pair":"ABC","sym":"AAPL"}',  # not in the table: the first of sym, pair, T
    b'{"ev":"T","p":1}',  # no symbol: only `*` gets it
    b'{"ev":5,"sym":"AAPL"}',
    b'{"ev":"T","sym":"BRK.A","p":1}',
    b'{"ev":"T","sym":"aapl"}',
    b'{"ev":"st\\u0061tus","message":"a status spelled with an escape"}',
]
CHANNEL_POOL = ["*", "T.*", "Q.*", "LULD.*", "T.AAPL", "Q.AAPL", "LULD.AAPL", "T.MSFT", "AM.*", "A.AAPL",
                "XT.BTC-USD", "C.EUR/USD", "NEW.AAPL", "NEW.ABC", "T.BRK.A", "T.aapl", "FMV.*"]
MODEL_FRAMES = []
_model = MarketModel(synthetic_symbols(12), seed=11)
for _i in range(30):
    MODEL_FRAMES.append(frame_of(_model.stream_events(15, 1000 + _i)))
MODEL_FRAMES.append(frame_of(_model.second_aggregates(1000)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(CHANNEL_POOL), min_size=1, max_size=5, unique=True),
       st.lists(st.sampled_from(ODD_EVENTS), max_size=6), st.sampled_from(MODEL_FRAMES), st.booleans())
def test_replay_selects_exactly_what_live_routing_sends(channels, odd, model_frame, as_text):
    frame = b"[" + b",".join([*odd, model_frame[1:-1]]) + b"]"
    parsed = parse_channel_list(",".join(channels))
    registry = SubscriptionRegistry(clock=lambda: 0.0)
    registry.subscribe("live", parsed)
    registry.subscribe("someone else", parse_channel_list("T.ZZZZ"))  # so routing reads events
    routed = route_frame(frame.decode() if as_text else frame, registry)
    if "*" in channels:
        live = routed.whole
        live = b"" if live is None else (live.encode() if isinstance(live, str) else live)[1:-1]
    else:
        live = routed.batches.get("live", (b"", 0))[0]
    replayed = b",".join(EventSelector(parsed).select(frame.decode() if as_text else frame))
    assert replayed == live


SINGLE_EVENTS = [*ODD_EVENTS, *(bytes(raw) for frame in MODEL_FRAMES[:3] for raw in msgspec.json.decode(
    frame, type=list[msgspec.Raw]))]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(CHANNEL_POOL), min_size=1, max_size=5, unique=True),
       st.sampled_from(SINGLE_EVENTS), st.sampled_from([(b"[", b"]"), (b"[ ", b"]"), (b"[", b" ]"), (b"[\n", b"\n]")]),
       st.booleans())
def test_a_one_event_frame_is_selected_exactly_as_live_routing_sends_it(channels, event, brackets, as_text):
    # Polygon's usual frame takes the selector's one-parse path; spaces around the event the general one.
    frame = brackets[0] + event + brackets[1]
    parsed = parse_channel_list(",".join(channels))
    registry = SubscriptionRegistry(clock=lambda: 0.0)
    registry.subscribe("live", parsed)
    registry.subscribe("someone else", parse_channel_list("T.ZZZZ"))
    routed = route_frame(frame.decode() if as_text else frame, registry)
    if "*" in channels:
        live = routed.whole
        live = b"" if live is None else (live.encode() if isinstance(live, str) else live).strip(b"[] \n")
        live = b"" if routed.statuses and routed.event_count == 0 else live
    else:
        live = routed.batches.get("live", (b"", 0))[0]
    selected = EventSelector(parsed).select(frame.decode() if as_text else frame)
    replayed = b",".join(item.encode() if isinstance(item, str) else item for item in selected)
    assert replayed == live


def test_replay_refuses_what_routing_refuses():
    selector = EventSelector(parse_channel_list("T.*"))
    for bad in (b"not json", b'{"ev":"T"}', b"[1,2]"):
        with pytest.raises(FrameError):
            selector.select(bad)


def test_events_are_counted_by_type():
    counts: Counter[str] = Counter()
    assert count_event_types(b'[{"ev":"T"},{"ev":"Q"},{"ev":"T"},{"ev":3},{"x":1}]', counts) == 5
    assert counts == {"T": 2, "Q": 1, "?": 2}


def test_receive_times_print_to_the_ns_in_utc():
    assert format_ns(1_764_065_700_123_456_789) == "2025-11-25T10:15:00.123456789Z"


def test_the_ring_leaves_its_records_to_no_collector_walk() -> None:
    """A ring of a million records must not be walked by every full collection of Python's
    cycle collector (it paused the router 190 ms each time): what it keeps is not tracked."""
    import gc

    journal = Journal(memory_seconds=1e6, memory_bytes=10**9)
    gc.collect()
    before = len(gc.get_objects())
    for index in range(10_000):
        journal.frame(b'[{"ev":"T","sym":"AAPL"}]', 1_000 + index)
    journal.upstream_lost("gone", 20_000)
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    assert journal.ring.get(5).data == b'[{"ev":"T","sym":"AAPL"}]' and journal.ring.get(10_001).reason == "gone"
