"""What the journal costs and how fast it reads back.

``python -m bench.journal_cost [--seconds 60] [--rate 20000] [--symbols 50] [--frame-events 200]``

1. **Writing.** A feed of ``seconds`` × ``rate`` events over ``symbols`` symbols (the simulator's
   market model, cut into frames of ``frame-events`` events, stamped 1/rate apart as if received
   live) goes through :class:`~proxy.core.journal.Journal` (ring of 300 s / 256 MB, as the
   defaults) into a real :class:`~proxy.net.journal_writer.JournalWriter` on this machine's disk,
   as fast as the writer takes it. Reported: the router's cost per frame (wall time inside
   ``journal.frame``, which includes the writer's ``offer``), and the process's whole CPU per
   frame and per event (user + system, every thread: compression and writes included), less the
   same loop with journaling off.
2. **Reading back**, from the journal just written: the time from opening the directory to the
   first event of ``cat --from`` the middle of the feed; then events/s for the whole feed, every
   event, and for 5 symbols' trades and quotes, each event selected and formatted as ``cat``
   prints it (the output thrown away); ``ls`` and ``verify``; and ``python -m proxy.journal cat``
   itself: its first line, and all of it to ``/dev/null``.

The written directory is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from proxy.app.journal_cli import main as journal_main
from proxy.core.journal import EventSelector, Journal, RecordKind, format_ns
from proxy.core.protocol import parse_channel_list
from proxy.net.journal_store import list_segments, read_blocks
from proxy.net.journal_writer import WRITE_QUEUE_RECORDS, JournalWriter
from proxy.sim.market import MarketModel, frame_of, prebuild, stamp, synthetic_symbols


def cpu_now() -> float:
    """This process's CPU seconds so far, user and system, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_feed(seconds: float, rate: int, symbols: int, frame_events: int, start_ns: int) -> list[tuple[int, bytes]]:
    """(receive ns, frame) for the whole feed; frames cycle through 300,000 pre-built events."""
    model = MarketModel(synthetic_symbols(symbols), seed=17)
    cycle = [frame_of(events) for events in prebuild(model, min(300_000, int(seconds * rate)), frame_events)]
    count = int(seconds * rate) // frame_events
    step_ns = int(frame_events / rate * 1e9)
    feed = []
    for index in range(count):
        received_ns = start_ns + index * step_ns
        feed.append((received_ns, stamp(cycle[index % len(cycle)], received_ns // 1_000_000)))
    return feed


async def write(directory: Path, feed: list[tuple[int, bytes]], journaling: bool) -> dict:
    """Feed ``feed`` as a router would, journaling it or not; returns CPU, wall and router seconds."""
    writer = JournalWriter(directory, retention_seconds=None)
    async with trio.open_nursery() as nursery:
        recovered = await nursery.start(writer.run)
        journal = Journal(next_seq=recovered.next_seq, sink=writer.offer)
        router_seconds = 0.0
        cpu_start, wall_start = cpu_now(), time.perf_counter()
        for index, (received_ns, frame) in enumerate(feed):
            if journaling:
                before = time.perf_counter()
                journal.frame(frame, received_ns)
                router_seconds += time.perf_counter() - before
                if index % 1000 == 0:
                    # Faster than real time, the feed would outrun the writer's queue and measure
                    # gaps: keep it within half the queue of what is written.
                    while journal.next_seq - 1 - writer.stats.last_written_seq > WRITE_QUEUE_RECORDS // 2:
                        await trio.sleep(0.001)
            await trio.sleep(0)  # the router's await for its next frame
        with trio.fail_after(60):
            while journaling and writer.stats.last_written_seq < journal.next_seq - 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # the stop's flush and close are in the nursery's exit: measured too
    return dict(cpu=cpu_now() - cpu_start, wall=time.perf_counter() - wall_start, router=router_seconds,
                stats=writer.stats)


def read_back(directory: Path, from_ns: int, channels: str) -> dict:
    """Open, seek and select as ``cat`` does; returns time to the first event and events/s."""
    selector = EventSelector(parse_channel_list(channels))
    started = time.perf_counter()
    first_after: float | None = None
    events = 0
    sink = bytearray()
    for records in read_blocks(directory, from_ns=from_ns):
        lines = []
        for record in records:
            if record.kind is not RecordKind.FRAME:
                continue
            prefix = b'{"seq":%d,"received":"%s","received_ns":%d,' % (
                record.seq, format_ns(record.received_ns).encode(), record.received_ns)
            lines.extend(b'%s"event":%s}\n' % (prefix, event) for event in selector.select(record.data))
        if lines and first_after is None:
            first_after = time.perf_counter() - started
        events += len(lines)
        sink += b"".join(lines)
        if len(sink) > 1 << 24:
            sink.clear()
    elapsed = time.perf_counter() - started
    return dict(first=first_after, events=events, seconds=elapsed, rate=events / elapsed)


def command_line(directory: Path, middle_ns: int) -> None:
    """The same reads through ``python -m proxy.journal cat``, as a person runs it."""
    python = [sys.executable, "-m"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import proxy.app.journal_cli"], check=True)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    process = subprocess.Popen([*python, "proxy.journal", "cat", str(directory), "--from", str(middle_ns // 10**6)],
                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()
    first = time.perf_counter() - started
    process.kill()
    process.wait()
    started = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run([*python, "proxy.journal", "cat", str(directory)], stdout=null, check=True)
    whole = time.perf_counter() - started
    print(f"command line: first line of cat --from the middle after {first * 1000:.0f} ms (starting Python "
          f"and importing alone: {startup * 1000:.0f} ms); cat of everything to /dev/null {whole:.2f} s")


def main() -> None:
    """The command line: build the feed, write it twice, read it back, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--frame-events", type=int, default=200)
    parser.add_argument("--dir", help="where to write (default: a new directory under the system's temp)")
    parser.add_argument("--keep", action="store_true", help="keep the journal written")
    args = parser.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="journal-bench-"))
    start_ns = time.time_ns() - int(args.seconds * 1e9)
    feed = build_feed(args.seconds, args.rate, args.symbols, args.frame_events, start_ns)
    events = len(feed) * args.frame_events
    raw = sum(len(frame) for _, frame in feed)
    print(f"feed: {len(feed):,} frames of {args.frame_events} events, {events:,} events, {raw / 1e6:,.1f} MB, "
          f"{args.seconds:.0f} s at {args.rate:,}/s over {args.symbols} symbols")
    try:
        baseline = trio.run(write, base / "baseline", feed, False)
        journaled = trio.run(write, base / "journal", feed, True)
        extra = journaled["cpu"] - baseline["cpu"]
        stats = journaled["stats"]
        on_disk = sum(s.size for s in list_segments(base / "journal"))
        print(f"write: router {journaled['router'] / len(feed) * 1e6:.2f} us/frame "
              f"({journaled['router'] / events * 1e6:.3f} us/event); whole process "
              f"{extra / len(feed) * 1e6:.1f} us/frame, {extra / events * 1e6:.3f} us/event "
              f"(CPU {journaled['cpu']:.2f} s journaled, {baseline['cpu']:.2f} s without, "
              f"{journaled['wall']:.2f} s wall)")
        print(f"       {stats.blocks_written:,} blocks, {on_disk / 1e6:,.1f} MB on disk (ratio "
              f"{raw / on_disk:.2f}), {stats.fsyncs} fsyncs, {stats.records_dropped} dropped, {stats.gaps} gaps")
        middle = start_ns + int(args.seconds * 1e9 / 2)
        for label, from_ns, channels in (("from the middle, every event", middle, "*"),
                                         ("all, every event", None, "*"),
                                         ("all, 5 symbols' T and Q", None,
                                          "T.AAPL,Q.AAPL,T.MSFT,Q.MSFT,T.NVDA,Q.NVDA,T.SPY,Q.SPY,T.TSLA,Q.TSLA")):
            result = read_back(base / "journal", from_ns or 0, channels)
            print(f"read {label}: first event after {result['first'] * 1000:.1f} ms; {result['events']:,} events "
                  f"in {result['seconds']:.2f} s = {result['rate']:,.0f} events/s")
        for command in ("ls", "verify"):
            started = time.perf_counter()
            with open("/dev/null", "w") as null:
                journal_main([command, str(base / "journal")], stdout=null)
            print(f"{command}: {time.perf_counter() - started:.2f} s")
        command_line(base / "journal", middle)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept: {base / 'journal'}")


if __name__ == "__main__":
    main()
