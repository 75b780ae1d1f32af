"""The command-line client: what an operator sees when checking a feed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from proxy.app.client_cli import format_event
from tests.helpers import FIREHOSE_KEY, start_firehose


def test_events_are_formatted_readably():
    trade = {"ev": "T", "sym": "AAPL", "p": 187.32, "s": 100, "t": 1_700_000_000_123}
    assert format_event(trade) == "22:13:20.123  T    AAPL       187.32 x 100"
    quote = {"ev": "Q", "sym": "MSFT", "bp": 1.5, "bs": 2, "ap": 1.6, "as": 3, "t": 1_700_000_000_000}
    assert format_event(quote).endswith("MSFT       bid 1.5 x 2  ask 1.6 x 3")
    odd = {"ev": "XYZ", "sym": "X", "k": 1}
    assert format_event(odd) == " " * 14 + "XYZ  X          {\"sym\":\"X\",\"k\":1}"  # no time: the column stays


async def _run_client(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return await trio.run_process(
        [sys.executable, "-m", "proxy.client", *arguments], capture_stdout=True, capture_stderr=True,
        check=False, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


async def test_the_client_prints_count_events_of_its_channels_then_exits_0(nursery):
    _, firehose = await start_firehose(nursery)
    url = f"ws://127.0.0.1:{firehose.port}/stocks"
    result = await _run_client("--url", url, "--count", "5", "--json", "T.*", env={"PROXY_KEY": FIREHOSE_KEY})
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(events) == 5 and all(event["ev"] == "T" for event in events)
    assert b"status auth_success" in result.stderr and b"subscribed to: T.*" in result.stderr
    readable = await _run_client("--url", url, "--key", FIREHOSE_KEY, "--count", "3", "Q.*")
    lines = readable.stdout.decode().splitlines()
    assert readable.returncode == 0 and len(lines) == 3 and all(" Q " in line and "bid" in line for line in lines)


async def test_a_refused_key_or_no_server_is_exit_1_with_a_reason(nursery):
    _, firehose = await start_firehose(nursery)
    refused = await _run_client("--url", f"ws://127.0.0.1:{firehose.port}", "--key", "wrong", "T.*")
    assert refused.returncode == 1 and b"status auth_failed" in refused.stderr
    nothing = await _run_client("--url", "ws://127.0.0.1:9/stocks", "--key", "k", "T.*")
    assert nothing.returncode == 1 and b"cannot talk to ws://127.0.0.1:9/stocks" in nothing.stderr
    # a subscribe refused whole (here: more channels than a client may hold) brings nothing: exit 1, not a wait
    _, small = await start_firehose(nursery, max_channels_per_client=2)
    with trio.fail_after(30):
        whole = await _run_client("--url", f"ws://127.0.0.1:{small.port}/stocks", "--key", FIREHOSE_KEY,
                                  "--count", "5", "T.AAPL", "T.MSFT", "Q.AAPL")
    assert whole.returncode == 1 and b"nothing of this subscribe was applied" in whole.stderr


@pytest.mark.parametrize("arguments", [[], ["--count", "0", "T.*"]])
def test_bad_arguments_are_usage_errors(arguments):
    result = subprocess.run([sys.executable, "-m", "proxy.client", *arguments], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: python -m proxy.client" in result.stderr
