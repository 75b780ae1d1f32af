"""The benchmark's simulator process: ``python -m bench.sim_process``.

Configured like ``trio-run proxy.simulator`` (``SIMULATOR_*`` variables). Reads
commands on standard input, one a line: ``mark`` sends a ``BENCH.MARK`` event to
every connection and opens or closes the counting window; after the closing mark
it prints one JSON line: the events sent in the window, by channel, the data frames
written in it (so the events per frame the firehose really got, whatever the
framing), and the events the generator skipped because it could not keep the rate.
"""

from __future__ import annotations

import json
import os
import sys

import trio

from proxy.app.config import load_simulator_config, setup_logging
from proxy.sim.simulator import Simulator, run_simulator


async def _commands(simulator: Simulator) -> None:
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
                                      "events_skipped": simulator.events_skipped}), flush=True)


async def main() -> None:
    config = load_simulator_config()
    setup_logging(config.log_level)
    async with trio.open_nursery() as nursery:
        simulator = await nursery.start(run_simulator, config)
        print(json.dumps({"port": simulator.port}), flush=True)
        await _commands(simulator)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
