"""Operations: /healthz, /readyz, /metrics, the summary line, graceful shutdown on SIGTERM."""

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from tests.helpers import (
    FIREHOSE_KEY,
    LIVENESS_SECONDS,
    POLYGON_KEY,
    authed_client,
    connect,
    start_firehose,
    start_simulator,
    wait_connected,
    wait_until,
)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=LIVENESS_SECONDS) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{port}{path}")


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_endpoints_with_the_upstream_up_and_down(nursery):
    sim, firehose = await start_firehose(nursery, simulator=dict(events_per_second=1000), metrics_port=0)
    port = firehose.metrics_port
    assert await get(port, "/healthz") == (200, "ok\n")
    await wait_connected(firehose)
    status, body = await get(port, "/readyz")
    assert status == 200 and "ready" in body
    sim.faults.force_max_connections = True
    sim.drop_all()
    await wait_until(lambda: firehose.link.state.value != "connected")
    status, body = await get(port, "/readyz")
    assert status == 503 and body.startswith("not ready: Polygon")
    assert (await get(port, "/healthz"))[0] == 200  # alive, though not ready
    status, body = await get(port, "/metrics")
    assert status == 200 and metric(body, "proxy_upstream_connected") == 0
    assert (await get(port, "/nope"))[0] == 404
    sim.faults.force_max_connections = False
    await wait_connected(firehose)
    assert (await get(port, "/readyz"))[0] == 200


async def test_metrics_move_when_traffic_flows(nursery):
    _, firehose = await start_firehose(nursery, simulator=dict(events_per_second=2000), metrics_port=0)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*,Q.AAPL")
    await client.wait_events(100)
    _, before = await get(firehose.metrics_port, "/metrics")
    await client.more_events(100)
    _, after = await get(firehose.metrics_port, "/metrics")
    assert metric(after, "proxy_clients_connected") == 1
    assert metric(after, "proxy_client_channels") == 2
    assert metric(after, "proxy_upstream_channels") == 2
    for name in ("proxy_upstream_frames_total", "proxy_upstream_events_total", "proxy_upstream_bytes_total",
                 "proxy_client_frames_sent_total", "proxy_client_events_sent_total",
                 "proxy_client_bytes_sent_total", "proxy_routing_latency_seconds_count"):
        assert metric(after, name) > metric(before, name) > 0, name
    assert 'proxy_events_dropped_total{market="stocks",reason="slow_consumer",tier="firehose"} 0.0' in after
    # the latency histogram: cumulative buckets ending in +Inf == count, a sum, the tier label
    buckets = [(line.split('le="')[1].split('"')[0], float(line.rsplit(" ", 1)[1]))
               for line in after.splitlines() if line.startswith("proxy_routing_latency_seconds_bucket{")]
    assert [le for le, _ in buckets][-1] == "+Inf" and len(buckets) == 13
    counts = [count for _, count in buckets]
    assert counts == sorted(counts) and counts[-1] == metric(after, "proxy_routing_latency_seconds_count")
    assert all('tier="firehose"' in line for line in after.splitlines()
               if line.startswith("proxy_routing_latency_seconds_"))
    assert 0 < metric(after, "proxy_routing_latency_seconds_sum") < counts[-1]  # each well under a second


async def test_auth_failures_are_counted(nursery):
    _, firehose = await start_firehose(nursery, metrics_port=0)
    client = await connect(nursery, firehose.port)
    await client.auth("wrong")
    await client.close_code()
    _, body = await get(firehose.metrics_port, "/metrics")
    assert metric(body, "proxy_auth_failures_total") == 1


async def test_sigterm_closes_clients_with_1001_and_exits_0_quickly(nursery, tmp_path):
    sim = await start_simulator(nursery, events_per_second=500)
    env = {
        **os.environ, "PROXY_ENV_FILE": str(tmp_path / "none.env"),
        "POLYGON_API_KEY": POLYGON_KEY, "POLYGON_URL": f"ws://127.0.0.1:{sim.port}/stocks",
        "FIREHOSE_HOST": "127.0.0.1", "FIREHOSE_PORT": "0", "FIREHOSE_API_KEYS": FIREHOSE_KEY,
        "FIREHOSE_METRICS_PORT": "0", "LOG_LEVEL": "info",
    }
    (tmp_path / "none.env").write_text("")
    trio_run = Path(sys.executable).parent / "trio-run"
    process = await trio.lowlevel.open_process(
        [str(trio_run), "proxy.firehose"], env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    log_text = b""
    with trio.fail_after(15):
        while b"Listening for clients on" not in log_text:
            log_text += await process.stderr.receive_some(4096)
    port = int(log_text.split(b"Listening for clients on ws://127.0.0.1:")[1].split()[0])
    client = await authed_client(nursery, port, FIREHOSE_KEY, subscribe="T.*")
    await client.wait_events(10)
    await wait_until(lambda: len(sim.connections) == 1)
    process.send_signal(signal.SIGTERM)
    code = None
    with trio.fail_after(2 * LIVENESS_SECONDS):  # seconds unloaded: this bound only says it never hangs
        try:
            while True:
                await client.receive()
        except ConnectionClosed as closed:
            code = closed.reason.code
        await process.wait()
    assert code == 1001
    assert process.returncode == 0
    rest = b""
    while chunk := await process.stderr.receive_some(4096):
        rest += chunk
    assert b"Traceback" not in log_text + rest
    await wait_until(lambda: not sim.connections, what="the upstream closing")


async def test_alert_rules_and_dashboard_only_use_metrics_that_exist(nursery):
    import re

    _, firehose = await start_firehose(nursery, metrics_port=0)
    _, body = await get(firehose.metrics_port, "/metrics")
    exposed = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and line[0] != "#"}
    deploy = Path(__file__).parent.parent / "deploy"
    for path in (deploy / "prometheus" / "alerts.yml", deploy / "grafana" / "polygon-proxy.json"):
        used = set(re.findall(r"\b(proxy_[a-z_]+)", path.read_text()))
        assert used and used <= exposed, (path.name, used - exposed)


def test_latency_histogram_buckets_are_less_or_equal_and_cumulative():
    from proxy.app.exposition import histogram_family
    from proxy.core.stats import LatencyHistogram

    histogram = LatencyHistogram(bounds=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 2.0):
        histogram.observe(seconds)
    assert histogram.counts == [2, 2, 1]  # a value on a bound belongs to that bound's bucket (le)
    family = histogram_family(histogram, "x_seconds", "x", ["tier"], ["t"])
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("x_seconds_bucket", "0.1")] == 2 and samples[("x_seconds_bucket", "1.0")] == 4
    assert samples[("x_seconds_bucket", "+Inf")] == samples[("x_seconds_count", None)] == 5
    assert samples[("x_seconds_sum", None)] == 3.65
