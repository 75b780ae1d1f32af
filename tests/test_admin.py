"""Operators' views on the metrics port: /clients against what real clients hold, /status.json,
the status page's files, and who may see them (ADMIN_TOKEN, else loopback only)."""

from __future__ import annotations

import json
from typing import Any
import urllib.error
import urllib.request

import pytest
import trio

from proxy.app.admin import allowed as admin_allows
from proxy.net.http import HttpRequest
from tests.helpers import (
    CLIENT_KEY,
    FIREHOSE_KEY,
    LIVENESS_SECONDS,
    authed_client,
    handshake,
    masked,
    start_chain,
    start_firehose,
    wait_until,
)

TOKEN = "a-long-admin-token-123"


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # the 303 itself is what is tested
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=LIVENESS_SECONDS) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    return await trio.to_thread.run_sync(_get, url, headers)


async def chain(nursery, **filtered_overrides):
    """The chain with the filtered proxy's metrics port open."""
    return await start_chain(nursery, simulator=dict(events_per_second=1000),
                             filtered=dict(metrics_port=0, **filtered_overrides))


async def test_clients_lists_what_real_clients_hold(nursery):
    _, _, filtered = await chain(nursery)
    base = f"http://127.0.0.1:{filtered.metrics_port}"
    a = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.AAPL,Q.MSFT")
    many = ",".join(f"T.S{i}" for i in range(150))
    await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe=many)
    await a.wait_events(3)
    status, headers, body = await get(base + "/clients")
    assert status == 200 and headers["content-type"] == "application/json"
    views = json.loads(body)
    assert len(views) == 2 and [view["id"] for view in views] == sorted(s.id for s in filtered.hub.sessions)
    first, second = views
    assert first["channels"] == ["Q.MSFT", "T.AAPL"] and first["channel_count"] == 2
    assert first["key"] == "unnamed" and first["path"] == "/stocks" and first["peer"].startswith("127.0.0.1:")
    assert first["events_sent"] >= 3 and first["events_dropped"] == 0 and first["slow"] is False
    assert first["last_control_seconds_ago"] is not None and first["connected_seconds"] >= 0
    assert second["channel_count"] == 150 and len(second["channels"]) == 100  # listed up to a limit
    status, _, body = await get(base + f"/clients/{second['id']}")
    assert status == 200 and len(json.loads(body)["channels"]) == 150
    assert sorted(json.loads(body)["channels"]) == sorted(f"T.S{i}" for i in range(150))
    status, _, body = await get(base + "/clients/99999")
    assert status == 404 and b"no client" in body


async def test_status_json_has_the_upstream_rates_and_per_key_totals(nursery):
    _, _, filtered = await chain(nursery)
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.*")
    await wait_until(lambda: len(filtered.history.rates) >= 2, timeout=10, what="two rate samples")
    await client.wait_events(5)
    status, _, body = await get(f"http://127.0.0.1:{filtered.metrics_port}/status.json")
    report = json.loads(body)
    assert status == 200 and report["tier"] == "filtered" and report["market"] == "stocks"
    assert report["upstream"]["state"] == "connected" and report["clients_connected"] == 1
    assert report["rates"] and max(rate["events_in"] for rate in report["rates"]) > 0
    assert [k["key"] for k in report["keys"]] == ["unnamed"] and report["keys"][0]["clients"] == 1


async def test_the_status_page_and_its_chart_library_are_served_from_the_package(nursery):
    _, _, filtered = await chain(nursery)
    base = f"http://127.0.0.1:{filtered.metrics_port}"
    status, headers, page = await get(base + "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"uPlot" in page
    status, headers, script = await get(base + "/static/vendor/uplot/uPlot.iife.min.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and len(script) > 40_000
    for escape in ("/static/../admin.py", "/static/vendor/../../admin.py", "/static/nothing.js"):
        assert (await get(base + escape))[0] == 404


async def test_with_a_token_only_its_bearer_or_its_cookie_may_look(nursery):
    _, _, filtered = await chain(nursery, admin_token=TOKEN)
    base = f"http://127.0.0.1:{filtered.metrics_port}"
    for path in ("/", "/clients", "/status.json", "/clients/1"):
        status, _, body = await get(base + path)
        assert status == 403 and b"ADMIN_TOKEN" in body, path
    assert (await get(base + "/clients", {"Authorization": "Bearer wrong-token-xxxxxxx"}))[0] == 403
    assert (await get(base + "/clients", {"Authorization": f"Bearer {TOKEN}"}))[0] == 200
    assert (await get(base + "/login?token=wrong"))[0] == 403
    status, headers, _ = await get(base + f"/login?token={TOKEN}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"]
    assert (await get(base + "/status.json", {"Cookie": cookie}))[0] == 200
    # probes and scrapers stay open
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await get(base + path))[0] == 200, path


@pytest.mark.parametrize("peer, token, headers, allowed", [
    ("127.0.0.1", None, {}, True),
    ("::1", None, {}, True),
    ("10.1.2.3", None, {}, False),
    ("192.168.0.9", None, {"authorization": f"Bearer {TOKEN}"}, False),  # no token configured: loopback only
    ("10.1.2.3", TOKEN, {"authorization": f"Bearer {TOKEN}"}, True),
    ("10.1.2.3", TOKEN, {"cookie": f"other=1; proxy_admin={TOKEN}"}, True),
    ("127.0.0.1", TOKEN, {}, False),  # a token set: loopback is not enough
    ("", None, {}, False),
])
def test_who_may_see_the_operator_views(peer, token, headers, allowed):
    assert admin_allows(HttpRequest(method="GET", path="/clients", headers=headers, peer=peer), token) is allowed


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    import os
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium")
    return found


async def test_the_status_page_in_a_real_browser_shows_the_clients_and_the_rates(nursery, tmp_path):
    """Headless Chromium loads the page against a running tier; its table and chart match /clients."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it in CI)")
    _, _, filtered = await chain(nursery)
    clients = [await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe=params)
               for params in ("T.*", "Q.AAPL,T.MSFT", "Q.*")]
    for client in clients:
        nursery.start_soon(client.collect, 60)
    await wait_until(lambda: len(filtered.history.rates) >= 3, timeout=10, what="three seconds of rates")
    url = f"http://127.0.0.1:{filtered.metrics_port}/"
    result = await trio.run_process(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", url], capture_stdout=True, capture_stderr=True, check=False)
    dom = result.stdout.decode()
    assert result.returncode == 0 and "<table" in dom, result.stderr.decode()[-2000:]
    _, _, body = await get(url + "clients")
    expected = json.loads(body)
    import re

    shown_ids = sorted(int(i) for i in re.findall(r'<tr data-id="(\d+)"', dom))
    assert shown_ids == sorted(view["id"] for view in expected) and len(shown_ids) == 3
    for view in expected:  # each row shows the client's channel count, as /clients says
        row = re.search(r'<tr data-id="%d"[^>]*>(.*?)</tr>' % view["id"], dom, flags=re.S)
        assert row and f'<td class="number">{view["channel_count"]}</td>' in row.group(1)
    points = int(re.search(r'data-points="(\d+)"', dom).group(1))
    assert points >= 3 and "<canvas" in dom  # uPlot drew the rates
    assert "upstream connected" in dom and "3 clients" in dom
    screenshot = tmp_path / "status.png"
    await trio.run_process(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=5000",
         "--window-size=1100,900", f"--screenshot={screenshot}", url], capture_stdout=True, capture_stderr=True)
    assert screenshot.stat().st_size > 10_000


async def test_metrics_per_key_name_count_clients_sent_and_dropped(nursery):
    _, _, filtered = await chain(nursery)
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.*")
    await client.wait_events(5)
    _, _, body = await get(f"http://127.0.0.1:{filtered.metrics_port}/metrics")
    text = body.decode()
    assert 'proxy_key_clients{key="unnamed",market="stocks",tier="filtered"} 1.0' in text
    sent = [line for line in text.splitlines() if line.startswith('proxy_key_events_sent_total{key="unnamed"')]
    assert sent and float(sent[0].rsplit(" ", 1)[1]) >= 5
    await client.ws.aclose()
    await wait_until(lambda: not filtered.hub.sessions, what="the client gone")
    _, _, body = await get(f"http://127.0.0.1:{filtered.metrics_port}/metrics")
    text = body.decode()
    assert 'proxy_key_clients{key="unnamed",market="stocks",tier="filtered"} 0.0' in text  # it left; its totals stay
    kept = [line for line in text.splitlines() if line.startswith('proxy_key_events_sent_total{key="unnamed"')]
    assert float(kept[0].rsplit(" ", 1)[1]) >= float(sent[0].rsplit(" ", 1)[1])


# --- dead connections --------------------------------------------------------------------------


async def test_a_half_open_client_is_released_and_a_live_one_stays(nursery):
    """Over real sockets: a client whose socket stops answering (not closed: a vanished laptop) is
    closed 1011 and its channels released; one that answers pings, as every WebSocket library does
    while it reads, stays however idle. When each happens (CLIENT_PING_SECONDS, then
    CLIENT_PONG_TIMEOUT_SECONDS) is tested without sockets, in test_hub."""
    _, firehose = await start_firehose(nursery, simulator=dict(events_per_second=200),
                                       client_ping_seconds=0.3, client_pong_timeout_seconds=1.0)
    live = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="LULD.AAPL")  # a rare channel
    nursery.start_soon(live.collect, 120)  # it reads, so its library answers pings
    # the silent one: handshake, auth and subscribe over a raw socket, then it reads and answers nothing
    sock, _ = await handshake(firehose.port, path="/stocks")
    await sock.send(masked(json.dumps({"action": "auth", "params": FIREHOSE_KEY}))
                    + masked(json.dumps({"action": "subscribe", "params": "Q.ZZZZ"})))
    await wait_until(lambda: "Q.ZZZZ" in {c.text for c in firehose.registry.upstream}, what="its subscribe applied")
    silent = max(firehose.hub.sessions, key=lambda session: session.id)
    await wait_until(lambda: silent not in firehose.hub.sessions, what="the silent client released")
    assert silent.close_request == (1011, "no answer to ping") and firehose.stats.dead_clients_closed == 1
    await wait_until(lambda: "Q.ZZZZ" not in {c.text for c in firehose.registry.upstream}, what="its channel released")
    # the live one sends nothing but pongs: its connection hearing from it, pings later, is their answers
    (kept,) = firehose.hub.sessions
    released_at = trio.current_time()
    await wait_until(lambda: kept.connection.last_received_at > released_at + 1.0, what="pongs from the live client")
    assert firehose.hub.sessions == {kept} and firehose.stats.dead_clients_closed == 1
    assert live.ws.closed is None
    sock.close()
