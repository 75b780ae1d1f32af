"""A simulator and a firehose tier in a process of their own, with few file descriptors (for tests).

``python -m tests.limited_tier NOFILE OVERRIDES_JSON`` sets RLIMIT_NOFILE,
starts both on 127.0.0.1 port 0 and prints ``port metrics_port`` on stdout;
logs go to stderr (WARNING and up); it runs until killed.
"""

from __future__ import annotations

import json
import logging
import resource
import sys

import trio

from proxy.core.protocol import parse_channel_list
from tests.helpers import firehose_config, start_simulator, start_tier


async def main(overrides: dict) -> None:
    async with trio.open_nursery() as nursery:
        sim = await start_simulator(nursery, events_per_second=200)
        tier = await start_tier(nursery, firehose_config(sim, static_channels=parse_channel_list("T.*"), **overrides))
        print(tier.port, tier.metrics_port, flush=True)


if __name__ == "__main__":
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    trio.run(main, json.loads(sys.argv[2]))
