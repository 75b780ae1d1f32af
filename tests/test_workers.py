"""FILTERED_PROXY_WORKERS: worker processes on one port (SO_REUSEPORT), one metrics endpoint for all,
a dead worker restarted, SIGTERM stopping every worker, and no worker outliving its parent.

The workers are real processes configured from the environment, as in production; the
simulator and the firehose run in the test's own process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import trio

from proxy.app.config import load_filtered_config
from proxy.app.workers import Workers, merge_clients, merge_metrics, merge_status, run_workers
from proxy.net.http import http_get
from tests.helpers import CLIENT_KEY, FIREHOSE_KEY, authed_client, start_firehose, wait_until

TRIO_RUN = str(Path(sys.executable).parent / "trio-run")


# --- merging what the workers report (no processes) ----------------------------------------------


def test_metrics_of_several_workers_become_one_exposition_labelled_by_worker():
    one = ('# HELP proxy_events_out_total Events sent\n# TYPE proxy_events_out_total counter\n'
           'proxy_events_out_total{tier="filtered"} 5.0\n'
           '# HELP proxy_clients_connected Clients\n# TYPE proxy_clients_connected gauge\n'
           'proxy_clients_connected{tier="filtered"} 2.0\n')
    two = one.replace("5.0", "7.0").replace("2.0", "3.0")
    text = merge_metrics([(1, one), (2, two)]).decode()
    assert text.count("# TYPE proxy_events_out_total counter") == 1
    assert 'proxy_events_out_total{tier="filtered",worker="1"} 5.0' in text
    assert 'proxy_events_out_total{tier="filtered",worker="2"} 7.0' in text
    assert 'proxy_clients_connected{tier="filtered",worker="2"} 3.0' in text


def test_clients_of_several_workers_get_ids_naming_their_worker():
    merged = merge_clients([(2, [{"id": 1, "peer": "b"}]), (1, [{"id": 10, "peer": "c"}, {"id": 9, "peer": "a"}])])
    assert [(view["id"], view["worker"], view["peer"]) for view in merged] == [
        ("1-9", 1, "a"), ("1-10", 1, "c"), ("2-1", 2, "b")]


def test_status_of_several_workers_sums_clients_rates_and_keys_and_shows_a_link_that_is_down():
    def status(clients: int, state: str, rate_ms: int, key_clients: int) -> dict:
        return {"tier": "filtered", "market": "stocks", "clients_connected": clients,
                "upstream": {"state": state, "label": "firehose proxy", "last_error": None if state == "connected"
                             else "refused", "reconnects": 1, "outages": [{"began_ms": rate_ms, "seconds": 1.0,
                                                                           "reason": "x"}]},
                "rates": [{"t_ms": rate_ms, "events_in": 10, "events_out": 20}],
                "keys": [{"key": "team", "clients": key_clients, "events_sent": 5, "events_dropped": 0}]}

    merged = merge_status([(1, status(2, "connected", 1_000_100, 1)), (2, status(3, "connecting", 1_000_900, 2))])
    assert merged["clients_connected"] == 5
    assert merged["upstream"]["state"] == "connecting" and merged["upstream"]["reconnects"] == 2
    assert len(merged["upstream"]["outages"]) == 2
    assert merged["rates"] == [{"t_ms": 1_000_000, "events_in": 20, "events_out": 40}]
    assert merged["keys"] == [{"key": "team", "clients": 3, "events_sent": 10, "events_dropped": 0}]
    assert [(w["worker"], w["clients_connected"]) for w in merged["workers"]] == [(1, 2), (2, 3)]


# --- real workers -------------------------------------------------------------------------------


def _worker_environment(monkeypatch: pytest.MonkeyPatch, firehose_port: int) -> None:
    for name, value in {
        "FIREHOSE_URL": f"ws://127.0.0.1:{firehose_port}", "FILTERED_PROXY_FIREHOSE_KEY": FIREHOSE_KEY,
        "FILTERED_PROXY_API_KEYS": CLIENT_KEY, "FILTERED_PROXY_HOST": "127.0.0.1", "FILTERED_PROXY_PORT": "0",
        "FILTERED_METRICS_PORT": "9765", "FILTERED_PROXY_WORKERS": "2", "LOG_LEVEL": "warning",
    }.items():
        monkeypatch.setenv(name, value)


async def _get(port: int, path: str) -> tuple[int, bytes]:
    return await http_get("127.0.0.1", port, path, timeout=20)


async def _start_workers(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Workers:
    _sim, firehose = await start_firehose(nursery, simulator={"events_per_second": 2000})
    _worker_environment(monkeypatch, firehose.port)
    config = attrs.evolve(load_filtered_config(), metrics_port=0)  # the parent's own port: any free one
    with trio.fail_after(60):
        return await nursery.start(run_workers, config)


async def _clients_by_worker(workers: Workers, count: int) -> dict[int, int]:
    status, body = await _get(workers.metrics_port, "/clients")
    assert status == 200
    views = json.loads(body)
    assert len(views) == count
    return {int(view["peer"].rsplit(":", 1)[1]): view["worker"] for view in views}


async def test_workers_share_the_port_and_each_client_gets_exactly_its_channels(nursery, monkeypatch):
    workers = await _start_workers(nursery, monkeypatch)
    assert workers.config.workers == 2 and all(slot.pid for slot in workers.slots)
    clients = []
    for number in range(16):
        params = "T.*" if number % 2 else "Q.*"
        clients.append((params, await authed_client(nursery, workers.port, CLIENT_KEY, subscribe=params)))
    for params, client in clients:
        events = await client.more_events(20)
        assert {event["ev"] for event in events} == {params[0]}
    where = await _clients_by_worker(workers, len(clients))
    # the kernel spreads connections by a hash of their addresses: 16 all on one worker is a 1 in 32,768 chance
    assert set(where.values()) == {1, 2}

    status, body = await _get(workers.metrics_port, "/metrics")
    assert status == 200
    connected = dict(re.findall(rb'proxy_clients_connected\{market="stocks",tier="filtered",worker="(\d)"\} ([\d.]+)', body))
    assert sorted(connected) == [b"1", b"2"] and sum(float(value) for value in connected.values()) == len(clients)
    status, body = await _get(workers.metrics_port, "/readyz")
    assert status == 200 and body.count(b"ready: firehose proxy connected") == 2
    status, body = await _get(workers.metrics_port, "/status.json")
    assert status == 200 and json.loads(body)["clients_connected"] == len(clients)


async def test_a_killed_worker_is_restarted_and_the_other_workers_clients_never_notice(nursery, monkeypatch, caplog):
    workers = await _start_workers(nursery, monkeypatch)
    clients = [await authed_client(nursery, workers.port, CLIENT_KEY, subscribe="T.*,Q.*") for _ in range(12)]
    where = await _clients_by_worker(workers, len(clients))
    victim = workers.slots[0]
    survivors = [client for client in clients if where[client.ws.local.port] != victim.index]
    assert survivors, "every client landed on the same worker"
    old_pid = victim.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    await wait_until(lambda: victim.pid not in (None, old_pid) and victim.metrics_port is not None, timeout=60,
                     what="the worker to be started again")
    for client in survivors:  # still served, by the worker that was not killed
        await client.more_events(50)
    assert victim.restarts == 1
    assert any(f"worker 1 (pid {old_pid}) exited with signal SIGKILL" in record.getMessage()
               for record in caplog.records)
    status, _body = await _get(workers.metrics_port, "/readyz")
    for _ in range(100):  # the new worker's link to the firehose comes up shortly after it listens
        if status == 200:
            break
        await trio.sleep(0.1)
        status, _body = await _get(workers.metrics_port, "/readyz")
    assert status == 200
    newcomer = await authed_client(nursery, workers.port, CLIENT_KEY, subscribe="Q.*")
    assert {event["ev"] for event in await newcomer.more_events(20)} == {"Q"}


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


def _start_parent(monkeypatch: pytest.MonkeyPatch, firehose_port: int, tmp_path: Path):
    _worker_environment(monkeypatch, firehose_port)
    log = tmp_path / "parent.log"
    process = subprocess.Popen([TRIO_RUN, "proxy.filtered"], stdout=subprocess.DEVNULL,
                               stderr=log.open("w"), env={**os.environ, "LOG_LEVEL": "info"})
    return process, log


async def _worker_pids(log: Path, count: int) -> list[int]:
    pattern = re.compile(r"worker \d \(pid (\d+)\) listens")
    with trio.fail_after(60):
        while len(pids := pattern.findall(log.read_text())) < count:
            await trio.sleep(0.1)
    return [int(pid) for pid in pids]


async def test_sigterm_stops_every_worker_and_the_parent_exits_0(nursery, monkeypatch, tmp_path):
    _sim, firehose = await start_firehose(nursery)
    process, log = _start_parent(monkeypatch, firehose.port, tmp_path)
    try:
        pids = await _worker_pids(log, 2)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while process.poll() is None:
                await trio.sleep(0.05)
        assert process.returncode == 0, log.read_text()
        assert [pid for pid in pids if _alive(pid)] == []
        assert "Traceback" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()


async def test_no_worker_outlives_a_parent_killed_with_sigkill(nursery, monkeypatch, tmp_path):
    _sim, firehose = await start_firehose(nursery)
    process, log = _start_parent(monkeypatch, firehose.port, tmp_path)
    pids: list[int] = []
    try:
        pids = await _worker_pids(log, 2)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            await trio.sleep(0.1)
        assert [pid for pid in pids if _alive(pid)] == []
        assert "the parent process is gone" in log.read_text()
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
