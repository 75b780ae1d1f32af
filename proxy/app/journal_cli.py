"""``python -m proxy.journal ls|cat|verify DIR``: read a journal directory.

- ``ls``: each segment with its size, blocks, seqs, time range, frames, events per type,
  outages and gaps; then the totals.
- ``cat``: the events as JSON lines, each with its seq and receive time, selected by
  ``--channels`` exactly as live routing selects them (``*`` = every data event, the
  default), from ``--from`` (at or after) to ``--to`` (before); the journal's own records
  (upstream lost and restored, gaps) are printed where they happened, whatever the channels.
- ``verify``: every checksum and record of every segment, and the seqs across segments;
  damage is reported with the segment, the byte offset, what failed and the seqs it cost.
  Exit code 0 when clean (an incomplete block at the end of the last segment is what a
  crash while writing leaves, and is noted, not counted), 1 when damaged.

Times (``--from``, ``--to``) are ISO 8601 (``2026-11-25T10:15:00Z``; no zone means UTC), or
milliseconds since the epoch, or negative milliseconds: that long before now.

Long reads show a progress bar on stderr when stderr is a terminal. It is a few lines
here rather than a dependency (tqdm would do): one line redrawn at most ten times a second
is all it needs to be, and the project's dependencies are each there for a reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from collections import Counter
from typing import IO

import attrs

from ..core.errors import ClientMessageError
from ..core.journal import (
    BlockCodec,
    Damage,
    EventSelector,
    Record,
    RecordKind,
    TornTail,
    count_event_types,
    format_ns,
)
from ..core.protocol import EVERYTHING_CHANNEL, parse_channel_list
from ..core.routing import FrameError
from ..net.journal_store import SegmentFile, list_segments, read_blocks, scan_file

__all__ = ["PROG", "parse_time", "describe_problem", "Progress", "build_parser", "main"]

PROG = "python -m proxy.journal"
_MARKER_NAMES = {
    RecordKind.UPSTREAM_LOST: b"upstream_lost",
    RecordKind.UPSTREAM_RESTORED: b"upstream_restored",
    RecordKind.GAP: b"gap",
}


def parse_time(text: str, now_ns: int) -> int:
    """A time given on the command line, in ns since the epoch.

    Takes ISO 8601 (no zone: UTC), milliseconds since the epoch, or negative
    milliseconds before ``now_ns``. Raises ValueError with a sentence for anything else.
    """
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        milliseconds = int(text)
        return now_ns + milliseconds * 1_000_000 if milliseconds < 0 else milliseconds * 1_000_000
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give ISO 8601 (2026-11-25T10:15:00Z), milliseconds "
                         f"since the epoch, or negative milliseconds before now") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (when - epoch) // datetime.timedelta(microseconds=1) * 1000


class Progress:
    """A progress bar on one line of ``stream``, for reads that take a while.

    Drawn only when ``stream`` is a terminal, only once ``delay`` seconds have
    passed, and at most every ``interval`` seconds; :meth:`close` erases it.
    Takes the total in bytes; :meth:`advance` adds bytes done.
    """

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, *,
                 delay: float = 0.5, interval: float = 0.1) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty() and total > 0
        self.total, self.label, self.done = total, label, 0
        self._started = time.monotonic()
        self._next_draw = self._started + delay
        self._interval = interval
        self._drawn = False

    def advance(self, amount: int) -> None:
        """Count ``amount`` more bytes done, and redraw if it is time."""
        self.done += amount
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self._next_draw:
            self._next_draw = now + self._interval
            fraction = min(1.0, self.done / self.total)
            bar = "#" * int(fraction * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {fraction:4.0%} "
                              f"{self.done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB")
            self.stream.flush()
            self._drawn = True

    def close(self) -> None:
        """Erase the bar, if drawn (it is drawn again on the next advance)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


# --- ls ------------------------------------------------------------------------------------------


@attrs.define
class _Tally:
    blocks: int = 0
    frames: int = 0
    events: int = 0
    bad_frames: int = 0
    outages: int = 0
    restorations: int = 0
    gaps: int = 0
    seqs_missing: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_ns: int | None = None
    last_ns: int | None = None
    types: Counter[str] = attrs.field(factory=Counter)

    def add_block(self, records: list[Record]) -> None:
        self.blocks += 1
        if self.first_seq is None:
            self.first_seq, self.first_ns = records[0].seq, records[0].received_ns
        self.last_seq, self.last_ns = records[-1].end_seq, records[-1].received_ns
        for record in records:
            kind = record.kind
            if kind is RecordKind.FRAME:
                self.frames += 1
                try:
                    self.events += count_event_types(record.data, self.types)
                except FrameError:
                    self.bad_frames += 1
            elif kind is RecordKind.UPSTREAM_LOST:
                self.outages += 1
            elif kind is RecordKind.UPSTREAM_RESTORED:
                self.restorations += 1
            else:
                self.gaps += 1
                self.seqs_missing += record.end_seq - record.seq + 1

    def merge(self, other: _Tally) -> None:
        for name in ("blocks", "frames", "events", "bad_frames", "outages", "restorations", "gaps", "seqs_missing"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.types.update(other.types)
        if other.first_seq is not None:
            if self.first_seq is None:
                self.first_seq, self.first_ns = other.first_seq, other.first_ns
            self.last_seq, self.last_ns = other.last_seq, other.last_ns

    def lines(self, title: str) -> list[str]:
        if self.first_seq is None:
            return [f"{title}  no records"]
        assert self.first_ns is not None and self.last_ns is not None
        span = (self.last_ns - self.first_ns) / 1e9
        types = ", ".join(f"{name} {count:,}" for name, count in self.types.most_common())
        details = [f"{self.frames:,} frames", f"{self.events:,} events" + (f" ({types})" if types else "")]
        if self.bad_frames:
            details.append(f"{self.bad_frames:,} frames that are not JSON arrays of objects")
        details.append(f"upstream lost {self.outages:,}, restored {self.restorations:,}")
        details.append(f"{self.gaps:,} gaps" + (f" ({self.seqs_missing:,} seqs)" if self.gaps else ""))
        return [f"{title}  seqs {self.first_seq:,}..{self.last_seq:,}  {_short(self.first_ns)} .. "
                f"{_short(self.last_ns)} ({span:,.1f} s), {self.blocks:,} blocks",
                "    " + "; ".join(details)]


def _short(received_ns: int) -> str:
    return format_ns(received_ns)[:23] + "Z"  # to the millisecond


def _count(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _size(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size:,} bytes"


def _ls(segments: list[SegmentFile], directory: str, out: IO[str], err: IO[str]) -> int:
    codec = BlockCodec()
    progress = Progress(sum(s.size for s in segments), "reading", err)
    total = _Tally()
    problems = 0
    try:
        for segment in segments:
            tally = _Tally()
            noted: list[str] = []

            def note(name: str, problem: Damage | TornTail, segment: SegmentFile = segment) -> None:
                noted.append(describe_problem(problem, last=segment is segments[-1]))

            for records in read_blocks(directory, segments=[segment], codec=codec, on_problem=note,
                                       progress=progress.advance):
                tally.add_block(records)
            progress.close()
            for line in tally.lines(f"{segment.name}  {_size(segment.size)}"):
                print(line, file=out)
            for line in noted:
                print(f"    {line}", file=out)
                problems += not line.startswith("note:")
            total.merge(tally)
    finally:
        progress.close()
    for line in total.lines(f"total: {_count(len(segments), 'segment')}, {_size(sum(s.size for s in segments))}"):
        print(line, file=out)
    return 1 if problems else 0


def describe_problem(problem: Damage | TornTail, *, last: bool) -> str:
    """One line saying what a damaged stretch or a torn tail is, where, and the seqs it cost;
    ``last``: the problem is in the journal's last segment (where a torn tail is expected)."""
    if isinstance(problem, TornTail):
        what = ("zero bytes" if problem.zeroed else "an incomplete block")
        if last:
            return (f"note: ends with {what} ({problem.size:,} bytes from byte {problem.offset:,}): a crash "
                    f"while writing, or the writer in the middle of a block")
        return (f"DAMAGED: ends with {what} ({problem.size:,} bytes from byte {problem.offset:,}) though it is "
                f"not the last segment")
    first, last_lost = problem.lost
    if first is not None and last_lost is not None:
        lost = f"seqs {first:,}..{last_lost:,} lost" if last_lost >= first else "no seq lost"
    elif first is not None:
        lost = f"seqs from {first:,} to the segment's end lost"
    elif last_lost is not None:
        lost = f"seqs up to {last_lost:,} lost"
    else:
        lost = "the seqs lost are unknown"
    where = (f"at byte {problem.offset:,}" if problem.end == problem.offset
             else f"bytes {problem.offset:,}..{problem.end:,}")
    return f"DAMAGED {where}: {problem.message} [{problem.kind}]; {lost}"


# --- verify --------------------------------------------------------------------------------------


def _verify(segments: list[SegmentFile], out: IO[str], err: IO[str]) -> int:
    codec = BlockCodec()
    progress = Progress(sum(s.size for s in segments), "verifying", err)
    problems = 0
    blocks = 0
    previous: tuple[str, int] | None = None  # (name, last seq) of the segment before
    first_seq = last_seq = None
    try:
        for segment in segments:
            scan = scan_file(segment.path, decode=True, codec=codec)
            progress.advance(segment.size)
            progress.close()
            blocks += len(scan.blocks)
            lines = []
            if scan.header is not None and (scan.header.first_seq, scan.header.start_ns) != (
                    segment.first_seq, segment.start_ns):
                lines.append(f"DAMAGED: the header says seq {scan.header.first_seq:,} at "
                             f"{format_ns(scan.header.start_ns)}; the name says otherwise")
            lines += [describe_problem(damage, last=False) for damage in scan.damage]
            if scan.torn is not None:
                lines.append(describe_problem(scan.torn, last=segment is segments[-1]))
            if previous is not None and scan.first_seq is not None and scan.first_seq != previous[1] + 1:
                lines.append(f"DAMAGED: starts at seq {scan.first_seq:,}, but {previous[0]} ends at "
                             f"{previous[1]:,}" + (f": seqs {previous[1] + 1:,}..{scan.first_seq - 1:,} "
                                                   f"are missing" if scan.first_seq > previous[1] + 1 else ""))
            damaged = [line for line in lines if not line.startswith("note:")]
            problems += len(damaged)
            state = "DAMAGED" if damaged else "ok"
            seqs = (f"seqs {scan.first_seq:,}..{scan.last_seq:,}" if scan.first_seq is not None else "no blocks")
            print(f"{state:7} {segment.name}  {len(scan.blocks):,} blocks, {seqs}", file=out)
            for line in lines:
                print(f"        {line}", file=out)
            if scan.last_seq is not None:
                previous = (segment.name, scan.last_seq)
                first_seq = scan.first_seq if first_seq is None else first_seq
                last_seq = scan.last_seq
    finally:
        progress.close()
    span = f", seqs {first_seq:,}..{last_seq:,}" if first_seq is not None else ""
    verdict = "clean" if not problems else f"{problems} problem{'s' if problems > 1 else ''} found"
    print(f"verified {_count(len(segments), 'segment')}, {blocks:,} blocks{span}: {verdict}", file=out)
    return 1 if problems else 0


# --- cat -------------------------------------------------------------------------------------------


def _cat(segments: list[SegmentFile], directory: str, args: argparse.Namespace, out: IO[bytes] | _TextAsBytes,
         err: IO[str]) -> int:
    selector = EventSelector(args.channels)
    to_ns = args.to
    codec = BlockCodec()
    progress = Progress(sum(s.size for s in segments), "reading", err)
    problems: list[str] = []
    bad_frames = 0
    last_name = segments[-1].name if segments else None

    def note(name: str, problem: Damage | TornTail) -> None:
        if isinstance(problem, TornTail) and name == last_name:
            return  # a writer at work, or a crash: nothing the reader lacks
        problems.append(f"{name}: {describe_problem(problem, last=name == last_name)}")
        progress.close()
        print(f"{PROG}: {problems[-1]}", file=err)

    select = selector.select
    write = out.write
    try:
        for records in read_blocks(directory, from_ns=args.from_, codec=codec, on_problem=note,
                                   progress=progress.advance, segments=segments):
            lines: list[bytes] = []
            for record in records:
                received_ns = record.received_ns
                if to_ns is not None and received_ns >= to_ns:
                    write(b"".join(lines))
                    return _cat_end(problems, bad_frames, err)
                prefix = b'{"seq":%d,"received":"%s","received_ns":%d,' % (
                    record.seq, format_ns(received_ns).encode(), received_ns)
                if record.kind is RecordKind.FRAME:
                    try:
                        events = select(record.data)
                    except FrameError:
                        bad_frames += 1
                        continue
                    lines.extend(b'%s"event":%s}\n' % (prefix, event) for event in events)
                else:
                    marker = _MARKER_NAMES[record.kind]
                    end = b',"end_seq":%d' % record.end_seq if record.kind is RecordKind.GAP else b""
                    reason = _json_string(record.reason)
                    lines.append(b'%s"journal":"%s"%s,"reason":%s}\n' % (prefix, marker, end, reason))
            write(b"".join(lines))
    finally:
        progress.close()
    return _cat_end(problems, bad_frames, err)


def _json_string(text: str) -> bytes:
    return json.dumps(text).encode()


def _cat_end(problems: list[str], bad_frames: int, err: IO[str]) -> int:
    if bad_frames:
        print(f"{PROG}: {bad_frames:,} frames were not JSON arrays of objects (live routing drops "
              f"them too); skipped", file=err)
    return 1 if problems else 0


# --- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m proxy.journal``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read a tier's journal directory (JOURNAL_DIR): list it, print its events, check it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{ls,cat,verify}")
    ls = commands.add_parser("ls", help="segments, seqs, time ranges, frames, events per type, outages, gaps")
    ls.add_argument("directory", help="the journal directory")
    cat = commands.add_parser(
        "cat", help="events as JSON lines with their seq and receive time",
        description="Print the journal's events as JSON lines: {\"seq\", \"received\" (ISO 8601, UTC, to the ns), "
                    "\"received_ns\", \"event\" (the event's original bytes)}, and the journal's own records "
                    "(upstream_lost, upstream_restored, gap) where they happened, with a \"reason\". Statuses "
                    "inside frames (Polygon's answers, relayed notices) are not events: live routing sends "
                    "them to no channel, and they are not printed.")
    cat.add_argument("directory", help="the journal directory")
    cat.add_argument("--channels", default="*",
                     help="channels as a client subscribes them, e.g. T.AAPL,Q.* (default: *, every event)")
    cat.add_argument("--from", dest="from_", metavar="TIME",
                     help="events received at or after TIME: ISO 8601 (UTC unless a zone is given), ms since "
                          "the epoch, or negative ms before now")
    cat.add_argument("--to", metavar="TIME", help="events received before TIME (same forms)")
    verify = commands.add_parser("verify", help="check every checksum, record and seq; exit 1 on damage")
    verify.add_argument("directory", help="the journal directory")
    return parser


def main(argv: list[str] | None = None, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 fine, 1 damage found, 2 usage). A reader
    that stops reading (``| head``) ends ``cat`` and ``ls`` with 0, and ``verify`` with 1."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    directory = args.directory
    try:
        segments = list_segments(directory)
    except OSError as error:
        print(f"{PROG}: cannot read {directory}: {error.strerror or error}", file=err)
        return 2
    if not segments:
        markets = _market_journals(directory)
        if markets:
            # a tier serving several markets keeps one journal per market, each in its subdirectory
            print(f"{PROG}: {directory} holds one journal per market ({', '.join(markets)}); name one: "
                  f"{PROG} {args.command} {os.path.join(str(directory), markets[0])}", file=err)
            return 2
        print(f"{PROG}: no journal segments in {directory}", file=err)
        return 2 if args.command == "verify" else 0
    try:
        if args.command == "ls":
            return _ls(segments, directory, out, err)
        if args.command == "verify":
            return _verify(segments, out, err)
        try:
            now = time.time_ns()
            args.channels = parse_channel_list(args.channels) if args.channels.strip() else (EVERYTHING_CHANNEL,)
            args.from_ = None if args.from_ is None else parse_time(args.from_, now)
            args.to = None if args.to is None else parse_time(args.to, now)
        except (ValueError, ClientMessageError) as error:
            parser.error(str(error))
        binary = out.buffer if hasattr(out, "buffer") else _TextAsBytes(out)
        return _cat(segments, directory, args, binary, err)
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from complaining at exit.
        # For cat and ls that is the reader's choice, not a failure (a script with pipefail must
        # not stop on `cat ... | head`); a verify cut short cannot say the journal is clean.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1 if args.command == "verify" else 0


def _market_journals(directory: str | os.PathLike[str]) -> list[str]:
    """The subdirectories of ``directory`` that hold journal segments (a tier's per-market journals)."""
    try:
        names = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    except OSError:
        return []
    found = []
    for name in names:
        try:
            if list_segments(os.path.join(str(directory), name)):
                found.append(name)
        except OSError:
            continue
    return found


@attrs.define
class _TextAsBytes:
    """Bytes written to a text stream (tests pass a StringIO)."""

    stream: IO[str]

    def write(self, data: bytes) -> int:
        """Write UTF-8 ``data`` as text; returns what the stream returns."""
        return self.stream.write(data.decode())
