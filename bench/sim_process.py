"""The benchmark's simulator process: ``python -m bench.sim_process``.

Configured like ``trio-run proxy.simulator`` (``SIMULATOR_*`` variables). Reads
commands on standard input, one a line: ``mark`` sends a ``BENCH.MARK`` event to
every connection and opens or closes the counting window; after the closing mark
it prints one JSON line: the events sent in the window, by channel, the data frames
written in it (so the events per frame the firehose really got, whatever the
framing), and the events the generator skipped because it could not keep the rate.

With ``--journal DIR [--speed N|max]`` the source is a recording instead, replayed in a
loop (:mod:`proxy.sim.replay`; ``REPLAY_*`` variables as for ``python -m proxy.replay``):
the same server, marks and counts; nothing is skipped, and the JSON line says how far
the replay fell behind the recorded pace at most.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import trio

from proxy.app.config import load_simulator_config, setup_logging
from proxy.app.replay_config import load_replay_config
from proxy.sim.replay import Replay, run_replay
from proxy.sim.simulator import Simulator, run_simulator


async def _commands(simulator: Simulator, replay: Replay | None = None) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while chunk := await stdin.receive_some(4096):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip() == b"mark":
                simulator.mark()
                if not simulator.counting:
                    print(json.dumps({"window_events": simulator.window_events,
                                      "window_frames": simulator.window_frames,
                                      "window_frame_events": simulator.window_frame_events,
                                      "counts": dict(simulator.window_counts),
                                      "events_generated": simulator.events_generated,
                                      "events_skipped": simulator.events_skipped,
                                      "replay_behind_seconds": replay and round(replay.most_behind_seconds, 3)}),
                          flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_process")
    parser.add_argument("--journal", help="replay this recording (in a loop) instead of the synthetic market")
    parser.add_argument("--speed", default="1", help="with --journal: N times the recorded pace, or max")
    args = parser.parse_args()
    if args.journal:
        replay_config = load_replay_config(args.journal, {"speed": args.speed, "loop": "true"})
        setup_logging(replay_config.log_level)
        async with trio.open_nursery() as nursery:
            replay = await nursery.start(run_replay, replay_config)
            print(json.dumps({"port": replay.port}), flush=True)
            await _commands(replay.simulator, replay)
            nursery.cancel_scope.cancel()
        return
    config = load_simulator_config()
    setup_logging(config.log_level)
    async with trio.open_nursery() as nursery:
        simulator = await nursery.start(run_simulator, config)
        print(json.dumps({"port": simulator.port}), flush=True)
        await _commands(simulator)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
