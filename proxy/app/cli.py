"""``trio-run MODULE``: run a module's ``async def main()`` under Trio, shutting down cleanly.

SIGINT (Ctrl-C) and SIGTERM cancel the main task instead of raising through it,
so a tier closes its clients and upstream in order and the process exits 0
without a traceback. A :class:`~proxy.core.errors.ConfigError` prints one line and
exits 2.
"""

from __future__ import annotations

import cProfile
import importlib
import os
import signal
import sys
from typing import Awaitable, Callable

import trio

from .config import ConfigError
from ..core.errors import leaves

__all__ = ["USAGE", "run_module_main", "main"]

USAGE = "usage: trio-run MODULE   (for example: trio-run proxy.firehose)"


async def _run_until_signal(main: Callable[[], Awaitable[object]]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def cancel_on_signal() -> None:
                async for signum in signals:
                    print(f"trio-run: {signal.Signals(signum).name} received, shutting down",
                          file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(cancel_on_signal)
            await main()
            nursery.cancel_scope.cancel()


def run_module_main(main: Callable[[], Awaitable[object]]) -> int:
    """Run ``main`` until it returns or a signal arrives; the process exit code.

    With ``PROXY_PROFILE=FILE`` set, the run is profiled with cProfile and the
    statistics written to FILE at exit (read them with ``python -m pstats FILE``).
    """
    profile_path = os.environ.get("PROXY_PROFILE")
    profiler = cProfile.Profile() if profile_path else None
    try:
        if profiler is not None:
            profiler.enable()
        trio.run(_run_until_signal, main)
    except (ConfigError, BaseExceptionGroup) as raised:
        config_errors = _config_errors(raised)
        if not config_errors:
            raise
        print(config_errors[0], file=sys.stderr)
        return 2
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
    return 0


def _config_errors(raised: BaseException) -> list[ConfigError]:
    """The ConfigErrors in ``raised``, only when there is nothing else in it."""
    found = list(leaves(raised))
    return found if all(isinstance(leaf, ConfigError) for leaf in found) else []  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``trio-run MODULE``: import MODULE and run its ``main()``; the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        module = importlib.import_module(args[0])
    except ImportError as error:
        print(f"trio-run: cannot import {args[0]!r}: {error}", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"trio-run: module {args[0]!r} has no async def main()", file=sys.stderr)
        return 2
    return run_module_main(entry)


if __name__ == "__main__":
    sys.exit(main())
