"""The README's first command: scripts/demo runs the main job end to end (on free ports here)."""

import os
import re
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_demo_runs_the_chain_and_prints_the_filtered_stream():
    env = {**os.environ, "DEMO_SIMULATOR_PORT": str(free_port()), "DEMO_FIREHOSE_PORT": str(free_port()),
           "DEMO_FILTERED_PORT": str(free_port()), "DEMO_METRICS_PORT": str(free_port())}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo"), "--seconds", "3"], env=env,
                            capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"message":"subscribed to: T.AAPL"' in out
    trades = re.findall(r'^\{"ev":"(\w+)","sym":"(\w+)"', out, flags=re.MULTILINE)
    assert trades and set(trades) == {("T", "AAPL")}  # only what it subscribed to
    summaries = re.findall(r"^-- last second: (\d+) events out .* proxy events in so far: (\d+)$", out,
                           flags=re.MULTILINE)
    assert summaries, out[-2000:]
    assert int(summaries[-1][1]) > sum(int(n) for n, _ in summaries)  # in: every trade and quote
