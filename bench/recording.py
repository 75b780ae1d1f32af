"""Recordings as the benchmark's source (``scripts/bench --journal DIR``).

- :func:`profile_journal`: what a recording holds, for the client plan and the offered
  rate: its symbols by how often they trade, its event types by count, and its rate in
  events a second (measured over its first frames, up to ``max_frames``).
- ``python -m bench.recording record --url ws://127.0.0.1:8766/stocks --key K --channels
  T.*,Q.* --seconds 30 DIR``: record what a Polygon-compatible upstream (the simulator,
  a tier) sends, every frame with its receive time, into a journal directory through the
  journal's own writer, as a tier's ``JOURNAL_DIR`` holds it. Benchmark input from the
  simulator at a rate and framing of your choice, replayed by ``scripts/bench --journal``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import attrs
import msgspec
import trio
from trio_websocket import open_websocket_url

from proxy.core.journal import Journal, RecordKind
from proxy.core.protocol import EventKey, event_symbol
from proxy.net.journal_store import read_blocks
from proxy.net.journal_writer import JournalWriter

__all__ = ["JournalProfile", "profile_journal", "record"]

_read_keys = msgspec.json.Decoder(list[EventKey]).decode


@attrs.frozen
class JournalProfile:
    """What a recording holds: symbols and event types, most frequent first, and its rate."""

    symbols: tuple[str, ...]
    types: tuple[str, ...]
    events: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        """The recording's data events a second (over the stretch profiled)."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


def profile_journal(directory: str | Path, *, from_ns: int | None = None, to_ns: int | None = None,
                    max_frames: int = 200_000) -> JournalProfile:
    """Profile the recording in ``directory`` from ``from_ns`` to ``to_ns`` (its first
    ``max_frames`` frames). Statuses are not events; frames that do not parse are skipped."""
    symbols: collections.Counter[str] = collections.Counter()
    types: collections.Counter[str] = collections.Counter()
    events = frames = 0
    first_ns = last_ns = None
    for block in read_blocks(directory, from_ns=from_ns):
        for record in block:
            if to_ns is not None and record.received_ns >= to_ns or frames >= max_frames:
                break
            if record.kind is not RecordKind.FRAME:
                continue
            frames += 1
            first_ns = record.received_ns if first_ns is None else first_ns
            last_ns = record.received_ns
            try:
                keys = _read_keys(record.data)
            except msgspec.DecodeError:
                continue
            for key in keys:
                if key.ev == "status" or not isinstance(key.ev, str):
                    continue
                events += 1
                types[key.ev] += 1
                symbol = event_symbol(key)
                if symbol is not None:
                    symbols[symbol] += 1
        else:
            continue
        break
    seconds = 0.0 if first_ns is None or last_ns is None else (last_ns - first_ns) / 1e9
    return JournalProfile(tuple(name for name, _ in symbols.most_common()),
                          tuple(name for name, _ in types.most_common()), events, seconds)


async def record(url: str, key: str, channels: str, directory: str | Path, seconds: float) -> int:
    """Record ``seconds`` of what ``url`` sends for ``channels`` (after authenticating with
    ``key``) into the journal ``directory``; returns the frames recorded. The answers to the
    auth and subscribe are recorded too, as a tier journals every frame it receives."""
    writer = JournalWriter(directory, retention_seconds=None, max_bytes=None)
    frames = 0
    async with trio.open_nursery() as nursery:
        recovered = await nursery.start(writer.run)
        journal = Journal(next_seq=recovered.next_seq, not_before_ns=recovered.last_ns, memory_seconds=0,
                          sink=writer.offer)
        async with open_websocket_url(url) as ws:
            await ws.get_message()  # connected
            await ws.send_message(json.dumps({"action": "auth", "params": key}))
            answer = await ws.get_message()
            if "auth_success" not in answer:
                raise SystemExit(f"the upstream refused the key: {answer}")
            await ws.send_message(json.dumps({"action": "subscribe", "params": channels}))
            with trio.move_on_after(seconds):
                while True:
                    journal.frame(await ws.get_message(), time.time_ns())
                    frames += 1
        nursery.cancel_scope.cancel()  # the writer writes what it holds, then stops
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recording", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="record an upstream's frames into a journal directory")
    rec.add_argument("directory")
    rec.add_argument("--url", default="ws://127.0.0.1:8766/stocks")
    rec.add_argument("--key", required=True)
    rec.add_argument("--channels", default="T.*,Q.*")
    rec.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    frames = trio.run(record, args.url, args.key, args.channels, args.directory, args.seconds)
    profile = profile_journal(args.directory)
    print(f"recorded {frames:,} frames into {args.directory}: {profile.events:,} events over "
          f"{profile.seconds:,.1f}s ({profile.events_per_second:,.0f}/s), types {', '.join(profile.types)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
