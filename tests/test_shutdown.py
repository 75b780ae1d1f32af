"""Stopping: every interleaving of two tiers' stops is clean, and a stop lasts as long as its
close handshakes do, not as long as their timeouts.

Stopping both tiers together (``docker compose down``, a host shutdown) cancels the
filtered proxy within a millisecond of its upstream link seeing the firehose's 1001.
Both orders and sub-millisecond gaps are tried many times in-process (cancelling a
tier's scope is what ``trio-run`` does on SIGTERM), and a few times with real
processes and real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy.core.errors import leaves
from proxy.app.tier import Tier, run_tier
from tests.helpers import (
    CLIENT_KEY,
    FIREHOSE_KEY,
    LIVENESS_SECONDS,
    POLYGON_KEY,
    authed_client,
    filtered_config,
    firehose_config,
    start_simulator,
    wait_connected,
)

GAPS = (0.0, 0.0001, 0.0003, 0.0006, 0.001, 0.002)


async def _run_cancellable(config, errors: list[BaseException], stopped: trio.Event | None = None,
                           *, task_status=trio.TASK_STATUS_IGNORED):
    """Run a tier under a scope of its own; hand back (scope, tier); record what escapes it;
    set ``stopped`` once the tier has finished."""
    with trio.CancelScope() as scope:
        try:
            async with trio.open_nursery() as nursery:
                tier: Tier = await nursery.start(run_tier, config)
                task_status.started((scope, tier))
        except BaseException as raised:  # noqa: BLE001 - anything but cancellation escaping is the bug
            if not all(isinstance(leaf, trio.Cancelled) for leaf in leaves(raised)):
                errors.append(raised)
            raise
        finally:
            if stopped is not None:
                stopped.set()


@pytest.mark.parametrize("upstream_first", [True, False], ids=["firehose-first", "filtered-first"])
async def test_stopping_two_tiers_together_never_raises(nursery, upstream_first):
    sim = await start_simulator(nursery, events_per_second=2000, max_connections=100)
    errors: list[BaseException] = []
    for gap in GAPS:
        for _ in range(4):
            stopped = (trio.Event(), trio.Event())
            firehose_scope, firehose = await nursery.start(
                _run_cancellable, firehose_config(sim, static_channels=()), errors, stopped[0])
            filtered_scope, filtered = await nursery.start(
                _run_cancellable, filtered_config(firehose, shutdown_close_seconds=1.0), errors, stopped[1])
            await wait_connected(filtered)
            await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.*")
            first, second = (firehose_scope, filtered_scope) if upstream_first else (filtered_scope, firehose_scope)
            first.cancel()
            if gap:
                await trio.sleep(gap)
            second.cancel()
            with trio.fail_after(LIVENESS_SECONDS):  # both trees ended, and what escaped them is recorded
                for tier_stopped in stopped:
                    await tier_stopped.wait()
            assert not firehose.hub.sessions and not filtered.hub.sessions
    assert errors == []


async def test_a_stop_lasts_as_long_as_the_close_handshake_not_its_timeout(nursery):
    sim = await start_simulator(nursery, events_per_second=500)
    errors: list[BaseException] = []
    stopped = trio.Event()
    # A long close timeout: a stop that waits it out instead of the peer's answer takes 30 s, where
    # both handshakes on loopback take milliseconds, and well under 10 s on the busiest machine.
    scope, firehose = await nursery.start(
        _run_cancellable, firehose_config(sim, shutdown_close_seconds=30.0), errors, stopped)
    await wait_connected(firehose)
    await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*")
    started = trio.current_time()
    scope.cancel()
    with trio.fail_after(60):
        await stopped.wait()
    assert trio.current_time() - started < 10
    assert not sim.connections and errors == []


async def _start_process(module: str, env: dict[str, str], ready: bytes) -> tuple[trio.Process, bytearray]:
    process = await trio.lowlevel.open_process(
        [str(Path(sys.executable).parent / "trio-run"), module], env=env,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    log = bytearray()
    with trio.fail_after(15):
        while ready not in log:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, f"{module} exited before {ready!r}: {bytes(log)!r}"
            log += chunk
    return process, log


async def _rest(process: trio.Process, log: bytearray) -> bytes:
    while chunk := await process.stderr.receive_some(4096):
        log += chunk
    return bytes(log)


@pytest.mark.parametrize("upstream_first", [True, False], ids=["firehose-first", "filtered-first"])
async def test_sigterm_to_both_tier_processes_together_exits_0(nursery, tmp_path, upstream_first):
    sim = await start_simulator(nursery, events_per_second=2000, max_connections=100)
    (tmp_path / "none.env").write_text("")
    base = {**os.environ, "PROXY_ENV_FILE": str(tmp_path / "none.env"), "LOG_LEVEL": "info"}
    for gap in (0.0005, 0.001):
        firehose_env = {
            **base, "POLYGON_API_KEY": POLYGON_KEY, "POLYGON_URL": f"ws://127.0.0.1:{sim.port}/stocks",
            "FIREHOSE_HOST": "127.0.0.1", "FIREHOSE_PORT": "0", "FIREHOSE_API_KEYS": FIREHOSE_KEY,
            "FIREHOSE_METRICS_PORT": "0",
        }
        firehose, firehose_log = await _start_process("proxy.firehose", firehose_env, b"Listening for clients on")
        port = int(bytes(firehose_log).split(b"Listening for clients on ws://127.0.0.1:")[1].split()[0])
        filtered_env = {
            **base, "FIREHOSE_URL": f"ws://127.0.0.1:{port}", "FILTERED_PROXY_FIREHOSE_KEY": FIREHOSE_KEY,
            "FILTERED_PROXY_HOST": "127.0.0.1", "FILTERED_PROXY_PORT": "0",
            "FILTERED_PROXY_API_KEYS": CLIENT_KEY, "FILTERED_METRICS_PORT": "0",
        }
        filtered, filtered_log = await _start_process("proxy.filtered", filtered_env, b"Subscribed to wildcard")
        first, second = (firehose, filtered) if upstream_first else (filtered, firehose)
        first.send_signal(signal.SIGTERM)
        await trio.sleep(gap)
        second.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await firehose.wait()
            await filtered.wait()
            outputs = (await _rest(firehose, firehose_log), await _rest(filtered, filtered_log))
        assert (firehose.returncode, filtered.returncode) == (0, 0), outputs
        assert all(b"Traceback" not in output for output in outputs), outputs
