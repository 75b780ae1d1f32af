"""A new user's first hour: the README's own paths, clear answers to common mistakes.

Each test here reproduces something a new user met: a single ``.env`` for both tiers,
a client told nothing while the upstream is down, a busy port, JSON sent as a binary
frame, lowercase symbols, a market that disagrees with its URL, HTTP status lines with
no reason phrase, and a reconnect backoff that stayed high after a healthy connection.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from proxy.core.backoff import Backoff
from proxy.app.config import check_market_url, load_filtered_config, load_firehose_config
from proxy.core.errors import ConfigError
from proxy.net.upstream import LinkState
from tests.helpers import (
    CLIENT_KEY,
    FIREHOSE_KEY,
    LIVENESS_SECONDS,
    POLYGON_KEY,
    authed_client,
    connect,
    filtered_config,
    firehose_config,
    start_firehose,
    start_simulator,
    start_tier,
    wait_connected,
    wait_until,
)

TRIO_RUN = Path(sys.executable).parent / "trio-run"
TIER_VARIABLES = [
    "POLYGON_API_KEY", "POLYGON_URL", "FIREHOSE_HOST", "FIREHOSE_PORT", "FIREHOSE_API_KEYS",
    "FIREHOSE_METRICS_PORT", "FIREHOSE_SUBSCRIPTIONS", "FIREHOSE_URL", "FILTERED_PROXY_HOST",
    "FILTERED_PROXY_PORT", "FILTERED_PROXY_API_KEYS", "FILTERED_METRICS_PORT",
    "FILTERED_PROXY_FIREHOSE_KEY", "MARKET", "PROXY_ENV_FILE", "LOG_LEVEL", "LOG_LEVEL_LIBRARIES",
]


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    for name in TIER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- one .env for both tiers, and a refusal that names its setting ------------------


async def test_one_env_file_as_the_readme_shows_serves_both_tiers(nursery, clean_environment):
    sim = await start_simulator(nursery)
    env_file = clean_environment / ".env"
    lines = [
        "POLYGON_API_KEY=" + POLYGON_KEY, f"POLYGON_URL=ws://127.0.0.1:{sim.port}/stocks",
        "FIREHOSE_API_KEYS=" + FIREHOSE_KEY, "FILTERED_PROXY_API_KEYS=" + CLIENT_KEY,
        "FIREHOSE_HOST=127.0.0.1", "FIREHOSE_PORT=0", "FIREHOSE_METRICS_PORT=0",
        "FILTERED_PROXY_HOST=127.0.0.1", "FILTERED_PROXY_PORT=0", "FILTERED_METRICS_PORT=0",
    ]
    env_file.write_text("\n".join(lines) + "\n")
    firehose = await start_tier(nursery, load_firehose_config())
    env_file.write_text("\n".join(lines + [f"FIREHOSE_URL=ws://127.0.0.1:{firehose.port}"]) + "\n")
    config = load_filtered_config()
    assert config.upstream_api_key == FIREHOSE_KEY
    filtered = await start_tier(nursery, config)
    await wait_connected(filtered)  # the filtered link accepted
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.*")
    events = await client.wait_events(5)
    assert all(event["ev"] == "T" for event in events)


def test_the_filtered_tier_has_its_own_setting_for_its_firehose_key(clean_environment, monkeypatch):
    monkeypatch.setenv("POLYGON_API_KEY", "polygon")
    assert (load_filtered_config().upstream_api_key_source, load_filtered_config().upstream_api_key) == (
        "POLYGON_API_KEY", "polygon")  # the original arrangement: a firehose with no FIREHOSE_API_KEYS
    monkeypatch.setenv("FIREHOSE_API_KEYS", "first, second")
    assert load_filtered_config().upstream_api_key == "first"
    monkeypatch.setenv("FILTERED_PROXY_FIREHOSE_KEY", "mine")
    config = load_filtered_config()
    assert (config.upstream_api_key, config.upstream_api_key_source) == ("mine", "FILTERED_PROXY_FIREHOSE_KEY")


async def test_a_refused_key_names_its_setting_never_the_key(nursery, caplog):
    _, firehose = await start_firehose(nursery)
    secret = "wrong-firehose-key-1234567890"
    filtered = await start_tier(nursery, filtered_config(
        firehose, upstream_api_key=secret, upstream_api_key_source="FILTERED_PROXY_FIREHOSE_KEY"))
    await wait_until(lambda: filtered.link.state is LinkState.REFUSED, what="the firehose refusing the key")
    client = await connect(nursery, filtered.port)
    await client.auth(CLIENT_KEY)
    notice = (await client.next_status())[0]
    assert notice["status"] == "upstream_disconnected"
    assert "FILTERED_PROXY_FIREHOSE_KEY" in notice["message"] and secret not in notice["message"]
    logged = [r.getMessage() for r in caplog.records if "refused our key" in r.getMessage()]
    assert logged and "FILTERED_PROXY_FIREHOSE_KEY" in logged[0]
    assert all(secret not in r.getMessage() for r in caplog.records)


# --- a client that arrives while the upstream is down is told ------------------------


async def test_a_client_arriving_before_the_upstream_ever_connected_is_told(nursery):
    sim = await start_simulator(nursery)
    port = free_port()
    filtered = await start_tier(nursery, filtered_config(port))
    client = await connect(nursery, filtered.port)
    assert (await client.auth(CLIENT_KEY))[0]["status"] == "auth_success"
    notice = (await client.next_status())[0]
    assert notice["status"] == "upstream_disconnected" and "not connected yet" in notice["message"]
    await client.send("subscribe", "T.*")
    assert (await client.next_status())[0]["message"] == "subscribed to: T.*"
    await start_tier(nursery, firehose_config(sim, port=port))
    arrived = await client.next_status(timeout=10)
    assert arrived[0]["status"] == "upstream_connected"
    await client.wait_events(3)


async def test_a_client_arriving_during_an_outage_is_told_and_then_told_of_the_recovery(nursery):
    sim, firehose = await start_firehose(nursery)
    sim.faults.refuse_auth = 1_000  # keep it down while the client arrives
    sim.drop_all()
    await wait_until(lambda: firehose.link.state is not LinkState.CONNECTED, what="the outage")
    client = await connect(nursery, firehose.port)
    await client.auth(FIREHOSE_KEY)
    notice = (await client.next_status())[0]
    assert notice["status"] == "upstream_disconnected" and "connection lost" in notice["message"]
    sim.faults.refuse_auth = 0
    arrived = await client.next_status(timeout=10)
    assert arrived[0]["status"] == "upstream_connected"


async def test_a_client_arriving_while_connected_hears_nothing_extra(nursery):
    _, firehose = await start_firehose(nursery)
    client = await connect(nursery, firehose.port)
    await client.auth(FIREHOSE_KEY)
    await client.send("subscribe", "T.AAPL")
    assert (await client.next_status())[0]["message"] == "subscribed to: T.AAPL"


# --- busy ports ------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["FIREHOSE_PORT", "FIREHOSE_METRICS_PORT"])
async def test_a_busy_port_is_one_line_naming_the_setting_and_exit_2(tmp_path, setting):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "none.env").write_text("")
        env = {
            **os.environ, "PROXY_ENV_FILE": str(tmp_path / "none.env"), "POLYGON_API_KEY": POLYGON_KEY,
            "POLYGON_URL": "ws://127.0.0.1:9/stocks", "FIREHOSE_HOST": "127.0.0.1",
            "FIREHOSE_PORT": "0", "FIREHOSE_METRICS_PORT": "0", setting: str(port),
        }
        result = await trio.run_process([str(TRIO_RUN), "proxy.firehose"], env=env, capture_stdout=True,
                                        capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    errors = [line for line in result.stderr.decode().splitlines() if "configuration error" in line]
    assert result.returncode == 2, result.stderr.decode()
    assert errors == [f"configuration error: {setting}: port {port} on 127.0.0.1 is already in use "
                      "(another program, or this tier running twice?)"]
    assert "Traceback" not in result.stderr.decode()


async def test_a_busy_simulator_port_is_a_config_error(nursery):
    sim = await start_simulator(nursery)
    with pytest.raises(ConfigError, match="SIMULATOR_PORT: port .* already in use"):
        await start_simulator(nursery, port=sim.port)


# --- mistakes users make -----------------------------------------------------------


async def test_json_sent_as_a_binary_frame_works_like_text(nursery):
    _, firehose = await start_firehose(nursery)
    client = await connect(nursery, firehose.port)
    await client.ws.send_message(json.dumps({"action": "auth", "params": FIREHOSE_KEY}).encode())
    assert (await client.next_status())[0]["status"] == "auth_success"
    await client.ws.send_message(json.dumps({"action": "subscribe", "params": "T.*"}).encode())
    assert (await client.next_status())[0]["message"] == "subscribed to: T.*"
    await client.wait_events(3)
    await client.ws.send_message(b"\xff\xfe not utf-8")
    answer = (await client.next_status())[0]
    assert answer["status"] == "error" and "not UTF-8 JSON" in answer["message"]


async def test_lowercase_symbols_are_acknowledged_with_a_warning(nursery):
    _, firehose = await start_firehose(nursery)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY)
    await client.send("subscribe", "T.aapl,Q.MSFT")
    assert [s["message"] for s in await client.next_status()] == ["subscribed to: T.aapl", "subscribed to: Q.MSFT"]
    warning = (await client.next_status())[0]
    assert warning["status"] == "warning"
    assert "T.aapl (did you mean T.AAPL?)" in warning["message"] and "MSFT" not in warning["message"]


def test_a_market_that_disagrees_with_its_url_is_named():
    assert check_market_url("stocks", "wss://socket.polygon.io/stocks", "POLYGON_URL") is None
    assert check_market_url("stocks", "ws://localhost:8767", "FIREHOSE_URL") is None
    warning = check_market_url("crypto", "wss://socket.polygon.io/stocks", "POLYGON_URL")
    assert warning and "POLYGON_URL ends in /stocks but MARKET=crypto" in warning


async def test_start_up_logs_the_market_and_warns_on_a_mismatch(tmp_path):
    (tmp_path / "none.env").write_text("")
    env = {
        **os.environ, "PROXY_ENV_FILE": str(tmp_path / "none.env"), "POLYGON_API_KEY": POLYGON_KEY,
        "POLYGON_URL": "ws://127.0.0.1:9/stocks", "MARKET": "crypto", "FIREHOSE_HOST": "127.0.0.1",
        "FIREHOSE_PORT": "0", "FIREHOSE_METRICS_PORT": "0",
    }
    process = await trio.lowlevel.open_process([str(TRIO_RUN), "proxy.firehose"], env=env,
                                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    log = b""
    try:
        with trio.fail_after(15):
            while b"Listening for clients" not in log:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log
                log += chunk
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
    text = log.decode()
    assert "Market: crypto" in text
    assert "WARNING" in text and "POLYGON_URL ends in /stocks but MARKET=crypto" in text


# --- HTTP answers say what they are --------------------------------------------------


def _http(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=LIVENESS_SECONDS) as response:
            return response.status, response.reason, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.reason, error.read().decode()


async def test_http_answers_carry_a_reason_phrase_and_say_what_the_port_is(nursery):
    filtered = await start_tier(nursery, filtered_config(free_port(), metrics_port=0))
    base = f"http://127.0.0.1:{filtered.metrics_port}"
    code, reason, body = await trio.to_thread.run_sync(_http, base + "/readyz")
    assert (code, reason) == (503, "Service Unavailable") and body.startswith("not ready")
    code, reason, body = await trio.to_thread.run_sync(_http, base + "/nothing")
    assert (code, reason) == (404, "Not Found") and "filtered tier's health and metrics port" in body
    code, reason, body = await trio.to_thread.run_sync(_http, f"http://127.0.0.1:{filtered.port}/stocks")
    assert (code, reason) == (400, "Bad Request")
    assert "WebSocket port for the stocks market" in body


# --- reconnecting after a healthy connection starts from the short delay -----------------


async def test_backoff_restarts_short_after_a_connection_that_carried_data(nursery):
    slow = Backoff(initial_seconds=0.2, max_seconds=60, healthy_after_seconds=1_000, refused_seconds=60)
    sim, firehose = await start_firehose(nursery, backoff=slow)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*")
    await client.wait_events(3)
    firehose.link.failures = 12  # as after a long outage at start-up: the next wait would be 30-60 s
    outages = firehose.stats.outages
    sim.drop_all()
    await wait_until(lambda: firehose.stats.outages == outages + 1, what="the drop noticed")
    await wait_until(lambda: firehose.link.state is LinkState.CONNECTED, timeout=10,  # 30 s at least unless reset
                     what="a reconnect within the short delay")
