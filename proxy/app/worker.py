"""One worker of a filtered proxy run with ``FILTERED_PROXY_WORKERS`` (started by :mod:`proxy.app.workers`).

``python -m proxy.app.worker INDEX PORT``: the filtered tier as configured by the
environment and ``.env``, except that it listens on ``PORT`` with ``SO_REUSEPORT``
(its siblings listen there too; the kernel spreads the clients over them) and
serves its metrics port on loopback at a free port, for its parent only. Once
listening it writes one JSON line to stdout (``{"worker", "pid", "port",
"metrics_port"}``); it stops, as a tier stops, on SIGTERM or SIGINT, and also
when its stdin closes: the parent is gone, and a worker must not outlive it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import attrs
import trio

from .cli import run_module_main
from .config import load_filtered_config, setup_logging
from .tier import run_tier

__all__ = ["READY_FIELDS", "main", "serve"]

log = logging.getLogger("proxy.worker")

#: The fields of the line a worker writes once it listens.
READY_FIELDS = ("worker", "pid", "port", "metrics_port")


async def serve(index: int, port: int) -> None:
    """Run worker ``index`` on the shared ``port`` until cancelled or the parent goes."""
    config = load_filtered_config()
    config = attrs.evolve(
        config, workers=1, port=port, reuse_port=True, worker_index=index, metrics_host="127.0.0.1",
        metrics_port=None if config.metrics_port is None else 0,
    )
    setup_logging(config.log_level, config.library_log_level, tag=f"worker {index}")
    async with trio.open_nursery() as nursery:
        tier = await nursery.start(run_tier, config)
        ready = dict(zip(READY_FIELDS, (index, os.getpid(), tier.port, tier.metrics_port)))
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await _until_parent_gone()
        log.warning("the parent process is gone (stdin closed): worker %d stops", index)
        nursery.cancel_scope.cancel()


async def _until_parent_gone() -> None:
    """Return when stdin reaches its end: the parent holds the other end of that pipe."""
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    while await stdin.receive_some(4096):
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m proxy.app.worker INDEX PORT``; the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not all(arg.isdigit() for arg in args):
        print("usage: python -m proxy.app.worker INDEX PORT  (started by the filtered proxy's parent)",
              file=sys.stderr)
        return 2
    index, port = int(args[0]), int(args[1])
    return run_module_main(lambda: serve(index, port))


if __name__ == "__main__":
    raise SystemExit(main())
