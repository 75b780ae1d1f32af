"""How fast a resume's replay is built from the memory ring, without a socket.

``python -m bench.replay_cost [--seconds 60] [--rate 20000] [--symbols 50] [--frame-events 200]``

A ring holds ``seconds`` of a ``rate`` events/s feed over 3,000 symbols (the simulator's market
model, frames of ``frame-events``); a client holding T and Q of ``symbols`` symbols (the most
traded first) resumes from the start of it. The replay is built as the client's writer builds
it (:class:`~proxy.core.replay.Stitch` over ``records_from`` 16 records at a time) and its
frames are thrown away: what is measured is the tier's side (selection, joining), from the
start to the first frame and to ``replay_complete``, in events delivered per second of wall
time and of this process's CPU (on a shared machine the two differ). The
socket, the client and the other clients' live traffic are not in it.
"""

from __future__ import annotations

import argparse
import time

from proxy.core.journal import Journal
from proxy.core.protocol import parse_channel_list
from proxy.core.replay import ReplayRequest, Stitch
from proxy.net.replay import RING_CHUNK_RECORDS
from proxy.sim.market import MarketModel, frame_of, prebuild, synthetic_symbols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--frame-events", type=int, default=200)
    args = parser.parse_args()
    symbols = synthetic_symbols(3000)
    model = MarketModel(symbols, seed=17)
    total = int(args.seconds * args.rate)
    cycle = [frame_of(events) for events in prebuild(model, min(total, 300_000), args.frame_events)]
    journal = Journal(memory_seconds=args.seconds * 2, memory_bytes=10**10)
    step_ns = int(args.frame_events / args.rate * 1e9)
    start_ns = 1_800_000_000_000_000_000
    for index in range(total // args.frame_events):
        journal.frame(cycle[index % len(cycle)], start_ns + index * step_ns)
    channels = parse_channel_list(",".join(f"{ev}.{symbol}" for symbol in symbols[:args.symbols] for ev in ("T", "Q")))
    started, cpu_started = time.perf_counter(), time.process_time()
    stitch = Stitch(ReplayRequest(start_ns, start_ns / 1e6, channels), hold_from=journal.next_seq)
    stitch.close_at(journal.next_seq - 1, channels)
    stitch.start_at(journal.ring.seq_at_time(start_ns))
    first: float | None = None
    frames = size = 0
    while not stitch.done:
        assert stitch.cursor is not None
        out = stitch.take(journal.ring.records_from(stitch.cursor, RING_CHUNK_RECORDS))
        if out and first is None:
            first = time.perf_counter() - started
        frames += len(out)
        size += sum(len(frame) for frame in out)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{args.seconds:g} s of {args.rate:,} events/s in frames of {args.frame_events}; a client of "
          f"{args.symbols} symbols' T and Q: {stitch.events:,} events in {frames:,} frames ({size / 1e6:.1f} MB) "
          f"built in {elapsed:.2f} s, {stitch.events / elapsed:,.0f} events/s ({cpu:.2f} s of CPU: "
          f"{stitch.events / cpu:,.0f} events per CPU second); first frame after {(first or 0) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
