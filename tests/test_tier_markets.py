"""Every market and feed from one deployment: both tiers serve each configured market at its
Polygon path on one port, with one upstream connection per market (or as many as the account
bought, the channels spread over them), the delayed feed under /delayed/, the market's caps and
wildcard rules enforced before Polygon refuses anything, and evictions met with the long backoff.
Real servers on 127.0.0.1; the simulator plays Polygon for every market."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.core.markets import MARKET_NAMES
from proxy.core.protocol import Channel, parse_channel_list
from proxy.core.routes import Route, replace_market_path, route_of_path, routes_for, unserved_message
from proxy.net.upstream import LinkState
from tests.helpers import (
    CLIENT_KEY, FIREHOSE_KEY, LIVENESS_SECONDS, POLYGON_KEY, connect, filtered_config, firehose_config,
    start_simulator, start_tier, wait_until,
)

CLIENTS = Path(__file__).parent / "clients"
#: Where each market's events carry their symbol, where it is not ``sym`` (Polygon's documentation).
SYMBOL_FIELD = {"XT": "pair", "XQ": "pair", "XA": "pair", "XAS": "pair", "XL2": "pair", "C": "p",
                "CA": "pair", "CAS": "pair", "V": "T", "LULD": "T", "NOI": "T"}


def selected(params: str, event: dict) -> bool:
    """A reference filter for every market, written from docs/protocol.md's rules."""
    symbol = event.get(SYMBOL_FIELD.get(event["ev"], "sym"))
    for channel in params.split(","):
        ev_type, _, wanted = channel.partition(".")
        if channel == "*" or (ev_type == event["ev"] and wanted in ("*", symbol)):
            return True
    return False


def feed_of(sim) -> str:
    return f"ws://127.0.0.1:{sim.port}"


async def start_markets(nursery, markets, *, simulator=None, firehose=None, filtered=None, delayed=()):
    """The simulator (every market), a firehose and a filtered proxy serving ``markets``."""
    sim = await start_simulator(nursery, **{"events_per_second": 600, **(simulator or {})})
    hose = await start_tier(nursery, firehose_config(
        sim, markets=tuple(markets), delayed_markets=tuple(delayed), polygon_feed=feed_of(sim),
        delayed_feed=f"{feed_of(sim)}/delayed", **(firehose or {})))
    proxy = None
    if filtered is not None:
        proxy = await start_tier(nursery, filtered_config(
            hose, markets=tuple(markets), delayed_markets=tuple(delayed), **filtered))
    return sim, hose, proxy


async def all_connected(tier, timeout=LIVENESS_SECONDS):
    for part in tier.parts:
        for link in part.links:
            await wait_until(lambda: link.state is LinkState.CONNECTED, timeout, what=f"{part.route.path}'s link")


async def market_client(nursery, port, path, key, subscribe=None):
    client = await connect(nursery, port, path)
    assert (await client.auth(key))[0]["status"] == "auth_success"
    if subscribe:
        await client.send("subscribe", subscribe)
    return client


# --- the routes, without I/O -------------------------------------------------------------------


def test_routes_paths_and_upstream_urls():
    routes = routes_for(["stocks", "options", "stocks"], ["stocks"])
    assert [route.path for route in routes] == ["stocks", "options", "delayed/stocks"]
    assert route_of_path("/", routes) == Route("stocks") and route_of_path("/options/", routes) == Route("options")
    assert route_of_path("/delayed/stocks", routes) == Route("stocks", delayed=True)
    assert route_of_path("/crypto", routes) is None and route_of_path("/delayed/options", routes) is None
    assert unserved_message("/crypto", routes) == ("this proxy does not serve the crypto market; it serves "
                                                   "/stocks, /options, /delayed/stocks (the MARKETS setting)")
    assert replace_market_path("wss://socket.polygon.io/stocks", "options") == "wss://socket.polygon.io/options"
    assert replace_market_path("ws://h:8767", "delayed/stocks") == "ws://h:8767/delayed/stocks"
    assert replace_market_path("ws://h:8767/delayed/stocks", "crypto") == "ws://h:8767/crypto"
    assert replace_market_path("ws://h/feed/", "options") == "ws://h/feed/options"


def test_each_route_gets_its_upstream_and_its_own_journal_directory(tmp_path):
    sim_port = 9
    base = dict(upstream_api_key="k", host="127.0.0.1", port=0)
    from proxy.core.settings import TierConfig
    one = TierConfig(tier="firehose", upstream_url="ws://127.0.0.1:9/anything", upstream_extra=(), **base)
    assert one.upstream_url_for(one.routes[0]) == "ws://127.0.0.1:9/anything"  # POLYGON_URL as it always was
    several = TierConfig(tier="firehose", upstream_url="wss://socket.polygon.io/stocks", upstream_extra=(),
                         markets=("stocks", "options"), delayed_markets=("stocks",), journal_dir=str(tmp_path), **base)
    assert [several.upstream_url_for(route) for route in several.routes] == [
        "wss://socket.polygon.io/stocks", "wss://socket.polygon.io/options", "wss://delayed.polygon.io/stocks"]
    assert [several.for_route(route).journal_dir for route in several.routes] == [
        f"{tmp_path}/stocks", f"{tmp_path}/options", f"{tmp_path}/delayed-stocks"]
    assert several.for_route(several.routes[1]).market == "options"
    filtered = TierConfig(tier="filtered", upstream_url=f"ws://127.0.0.1:{sim_port}", upstream_extra=(),
                          markets=("stocks", "crypto"), **base)
    assert [filtered.upstream_url_for(route) for route in filtered.routes] == [
        "ws://127.0.0.1:9/stocks", "ws://127.0.0.1:9/crypto"]


# --- both tiers, every market --------------------------------------------------------------------


async def test_three_markets_one_connection_each_and_every_client_gets_exactly_its_channels(nursery):
    sim, hose, proxy = await start_markets(nursery, ["stocks", "options", "crypto"], filtered={})
    await all_connected(hose)
    await all_connected(proxy)
    contract = sim.feeds["options"].symbols[0]
    wanted = {"/stocks": "T.*,Q.AAPL", "/options": f"T.*,Q.{contract}", "/crypto": "XT.BTC-USD,XQ.*"}
    clients = {path: await market_client(nursery, proxy.port, path, CLIENT_KEY, channels)
               for path, channels in wanted.items()}
    root = await market_client(nursery, proxy.port, "/", CLIENT_KEY, "T.*")  # / is the first market
    for path, client in clients.items():
        events = await client.more_events(30)
        assert all(selected(wanted[path], event) for event in events), path
    assert {event["ev"] for event in clients["/crypto"].events} <= {"XT", "XQ"}
    assert all(event["sym"].startswith("O:") for event in clients["/options"].events)
    assert all(not event["sym"].startswith("O:") for event in await root.more_events(10))
    # one connection per market at "Polygon", whatever the filtered proxy and its clients do
    for name in ("stocks", "options", "crypto"):
        assert len(sim.connections_to(name)) == 1, name
    assert sim.connections_to("forex") == []
    assert f"Q.{contract}" in sim.subscribed_channels("options") and "Q.AAPL" in sim.subscribed_channels("stocks")


async def test_the_official_client_works_unchanged_for_every_market_through_both_tiers(nursery):
    sim, hose, proxy = await start_markets(nursery, MARKET_NAMES, filtered={}, simulator=dict(events_per_second=1200))
    await all_connected(proxy)
    contract = sim.feeds["options"].symbols[0]
    channels = {"stocks": ("T.*", "EquityTrade"), "options": (f"T.{contract}", "EquityTrade"),
                "forex": ("C.EUR/USD", "ForexQuote"), "crypto": ("XT.BTC-USD", "CryptoTrade"),
                "indices": ("V.I:SPX", "IndexValue"), "futures": ("T.ESZ5", "FuturesTrade")}
    results = {}

    async def run(name: str, channel: str) -> None:
        results[name] = await trio.run_process(
            [sys.executable, str(CLIENTS / "massive_client.py"), f"127.0.0.1:{proxy.port}", CLIENT_KEY, channel,
             "3", name], capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL)

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for name, (channel, _) in channels.items():
                clients.start_soon(run, name, channel)
    for name, (channel, model) in channels.items():
        result = results[name]
        assert result.returncode == 0, result.stderr.decode()
        lines = [json.loads(line) for line in result.stdout.decode().splitlines() if line.startswith("[")]
        assert len(lines) >= 3 and {line[2] for line in lines} == {model}, (name, lines)
        if not channel.endswith("*"):
            assert {line[1] for line in lines} == {channel.split(".", 1)[1]}, (name, lines)


async def test_a_market_upstream_refuses_tells_its_clients_and_readyz_and_the_others_flow(nursery):
    sim, hose, _ = await start_markets(nursery, ["stocks", "options"], simulator=dict(entitled=("stocks",)),
                                       firehose=dict(metrics_port=0))
    options = hose.markets["options"]
    await wait_until(lambda: options.link.state is LinkState.REFUSED, what="the options refusal")
    await wait_until(lambda: hose.link.state is LinkState.CONNECTED, what="stocks")
    assert "plan doesn't include" in options.link.last_error or "auth_failed" in options.link.last_error
    stocks_client = await market_client(nursery, hose.port, "/stocks", FIREHOSE_KEY, "T.*")
    assert len(await stocks_client.more_events(20)) >= 20
    client = await connect(nursery, hose.port, "/options")
    answer = await client.auth(FIREHOSE_KEY)
    notice = next(s for s in answer + await client.next_status() if s["status"] == "upstream_disconnected")
    assert notice["message"] == (
        "Polygon options refused us (auth_failed: Your plan doesn't include websocket access. (Polygon options "
        "refused the key in POLYGON_API_KEY)); asking again every 0.3s; your subscriptions are kept, and "
        "upstream_connected follows if it accepts")
    body = await trio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{hose.metrics_port}/readyz", timeout=5).read().decode())
    assert body.startswith("ready:") and "stocks: Polygon stocks connected" in body
    assert "options: Polygon options refused" in body
    metrics = await trio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{hose.metrics_port}/metrics", timeout=5).read().decode())
    assert 'proxy_upstream_refused{market="options",tier="firehose"} 1.0' in metrics
    assert 'proxy_upstream_connected{market="stocks",tier="firehose"} 1.0' in metrics
    assert len(await stocks_client.more_events(20)) >= 20  # still flowing


async def test_an_unserved_market_is_refused_as_polygon_refuses_a_plan_without_it(nursery):
    _, hose, _ = await start_markets(nursery, ["stocks", "options"])
    client = await connect(nursery, hose.port, "/forex")
    answer = await client.auth(FIREHOSE_KEY)
    assert answer == [{"ev": "status", "status": "auth_failed", "message": (
        "this proxy does not serve the forex market; it serves /stocks, /options (the MARKETS setting)")}]
    assert await client.close_code() == 1008


async def test_the_delayed_feed_is_served_under_delayed_beside_real_time(nursery):
    # Polygon counts a market's delayed and real-time connections together: two connections for stocks.
    sim, hose, proxy = await start_markets(nursery, ["stocks"], delayed=["stocks"], filtered={},
                                           simulator=dict(max_connections=2),
                                           firehose=dict(upstream_connections={"stocks": 2}))
    await all_connected(hose)
    await all_connected(proxy)
    delayed = await market_client(nursery, proxy.port, "/delayed/stocks", CLIENT_KEY, "T.AAPL,Q.*")
    live = await market_client(nursery, proxy.port, "/stocks", CLIENT_KEY, "T.*")
    assert all(selected("T.AAPL,Q.*", event) for event in await delayed.more_events(20))
    assert all(event["ev"] == "T" for event in await live.more_events(20))
    connections = sim.connections_to("stocks")
    assert sorted(connection.delayed for connection in connections) == [False, True]
    assert Channel("T", "AAPL") in next(c for c in connections if c.delayed).channels


# --- the connection budget ---------------------------------------------------------------------------


async def test_a_subscribe_past_the_cap_is_refused_whole_and_upstream_never_passes_it(nursery):
    sim, hose, proxy = await start_markets(nursery, ["options"], filtered={"upstream_caps": {"options": {"Q": 5}}},
                                           firehose=dict(upstream_caps={"options": {"Q": 5}}))
    await all_connected(proxy)
    contracts = sim.feeds["options"].symbols[:8]
    first = await market_client(nursery, proxy.port, "/options", CLIENT_KEY)
    second = await market_client(nursery, proxy.port, "/options", CLIENT_KEY)
    assert (await first.request("subscribe", ",".join(f"Q.{c}" for c in contracts[:3])))[0]["status"] == "success"
    refused = await second.request("subscribe", ",".join(f"Q.{c}" for c in contracts[3:6]) + ",T.*")
    assert refused == [{"ev": "status", "status": "error", "message": (
        "options Q (quotes) is limited to 5 contracts a connection; this would hold 6; "
        "nothing of this subscribe was applied")}]
    wildcard = await second.request("subscribe", "Q.*")
    assert wildcard[0]["status"] == "error" and "Q.* is not allowed on options" in wildcard[0]["message"]
    assert (await second.request("subscribe", ",".join(f"Q.{c}" for c in contracts[3:5])))[0]["status"] == "success"
    await wait_until(lambda: sum(1 for c in sim.subscribed_channels("options") if c.startswith("Q.")) == 5,
                     what="five contracts at the simulator")
    assert "Q.*" not in sim.subscribed_channels("options") and "T.*" not in sim.subscribed_channels("options")
    quoted = {event["sym"] for event in await second.more_events(40) if event["ev"] == "Q"}
    assert quoted <= set(contracts[3:5]) and quoted
    assert proxy.stats.cap_refusals == 2


async def test_two_connections_double_the_cap_and_share_the_channels(nursery):
    sim, hose, _ = await start_markets(
        nursery, ["options"], simulator=dict(max_connections=2),
        firehose=dict(upstream_caps={"options": {"Q": 3}}, upstream_connections={"options": 2}))
    await all_connected(hose)
    assert len(hose.links) == 2 and len(sim.connections_to("options")) == 2
    contracts = sim.feeds["options"].symbols[:7]
    client = await market_client(nursery, hose.port, "/options", FIREHOSE_KEY)
    answer = await client.request("subscribe", ",".join(f"Q.{c}" for c in contracts[:6]))
    assert answer[0]["status"] == "success"
    await wait_until(lambda: sorted(len([c for c in conn.channels if c.ev_type == "Q"])
                                    for conn in sim.connections_to("options")) == [3, 3],
                     what="three contracts on each connection")
    quoted: set[str] = set()
    with trio.fail_after(LIVENESS_SECONDS):
        while quoted != set(contracts[:6]):  # events from both connections reach the client
            quoted |= {event["sym"] for event in await client.more_events(1) if event["ev"] == "Q"}
    over = await client.request("subscribe", f"Q.{contracts[6]}")
    assert over[0]["message"] == ("options Q (quotes) is limited to 3 contracts a connection, 6 over this market's 2 "
                                  "connections; this would hold 7; nothing of this subscribe was applied")


async def test_an_eviction_is_named_counted_and_retried_on_the_long_backoff(nursery, caplog):
    caplog.set_level(logging.ERROR, logger="proxy.net.upstream")
    sim, hose, _ = await start_markets(nursery, ["stocks", "crypto"], firehose=dict(metrics_port=0))
    await all_connected(hose)
    sim.faults.evict_oldest = True
    crypto = hose.markets["crypto"]
    reconnects = crypto.link.reconnects
    intruder = await connect(nursery, sim.port, "/crypto")  # another program with the same key
    assert (await intruder.auth(POLYGON_KEY))[0]["status"] == "auth_success"
    await wait_until(lambda: crypto.link.evictions == 1, what="the eviction")
    assert any("another program is using this key's crypto connection" in record.getMessage()
               for record in caplog.records)
    assert crypto.link.state is LinkState.REFUSED and hose.link.state is LinkState.CONNECTED
    await trio.sleep(0.1)
    assert crypto.link.reconnects == reconnects + 1  # waiting, not fighting
    metrics = await trio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{hose.metrics_port}/metrics", timeout=5).read().decode())
    assert 'proxy_upstream_evictions_total{market="crypto",tier="firehose"} 1.0' in metrics


@pytest.mark.parametrize("variable, value, message", [
    ("MARKETS", "stocks,bonds", "market names"),
    ("POLYGON_CONNECTIONS_OPTIONS", "0", "from 1 to 100"),
    ("POLYGON_CAPS", "options.Q=lots", "MARKET.TYPE=COUNT"),
    ("POLYGON_CAPS", "options.ZZ=5", "options has no event type 'ZZ' (its types: T, Q, A, AM, FMV)"),
    ("POLYGON_FEED", "https://socket.polygon.io", "ws://"),
])
def test_bad_market_settings_name_the_variable(monkeypatch, tmp_path, variable, value, message):
    from proxy.app.config import load_firehose_config
    from proxy.core.errors import ConfigError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_firehose_config()
    assert raised.value.variable == variable and message in str(raised.value)


def test_market_and_markets_must_agree(monkeypatch, tmp_path):
    from proxy.app.config import load_filtered_config
    from proxy.core.errors import ConfigError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARKETS", "options,crypto")
    config = load_filtered_config()
    assert config.market == "options" and [route.path for route in config.routes] == ["options", "crypto"]
    monkeypatch.setenv("MARKET", "stocks")
    with pytest.raises(ConfigError) as raised:
        load_filtered_config()
    assert raised.value.variable == "MARKET"


# --- the cap under any interleaving of subscribes (Hypothesis, stateful) -----------------------------

CAP = 4
CONTRACTS = [f"O:SPY2612{n:02d}C00650000" for n in range(8)]


class _Connection:
    """What the hub touches of a client connection, outside a Trio run."""

    def __init__(self) -> None:
        self.notify = lambda: None
        self.backlogged = False
        self.open = True

    def send_texts(self, texts) -> int:
        return 0


class CappedMarket(RuleBasedStateMachine):
    """Several clients' subscribes to options quotes, each granted by the session at once and applied
    to the registry later (a big subscribe is applied in steps, with others' messages in between),
    unsubscribes, grace expiry: the market's upstream set never holds more than the cap, a refused
    subscribe applies nothing, and a granted one is never refused later."""

    def __init__(self) -> None:
        super().__init__()
        from proxy.core.subscriptions import SubscriptionRegistry
        from proxy.net.server import Hub
        self.now = 0.0
        config = filtered_config(1, market="options", upstream_caps={"options": {"Q": CAP}},
                                 unsubscribe_grace_seconds=1.0)
        self.registry = SubscriptionRegistry(clock=lambda: self.now, grace_seconds=1.0)
        self.hub = Hub(config=config, registry=self.registry)
        self.sessions = []
        for index in range(3):
            session = self.hub.open_session(f"10.0.0.{index}:1", _Connection())  # type: ignore[arg-type]
            self.hub.react_at_once(session, session.state.receive(json.dumps({"action": "auth", "params": CLIENT_KEY})))
            self.sessions.append(session)
        self.waiting: list = []

    @rule(index=st.integers(0, 2), contracts=st.lists(st.sampled_from(CONTRACTS), min_size=1, max_size=3))
    def subscribe(self, index, contracts):
        session = self.sessions[index]
        before = set(session.state.channels)
        reaction = session.state.receive(json.dumps({"action": "subscribe", "params": ",".join(
            f"Q.{contract}" for contract in contracts)}), self.now)
        if reaction.outcome == "error":
            assert session.state.channels == before and "limited to 4 contracts" in reaction.replies[0]
        elif reaction.subscribe:
            self.waiting.append((session, reaction))

    @rule(data=st.data())
    def apply_one(self, data):
        if self.waiting:
            session, reaction = self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1)))
            self.hub.react_at_once(session, reaction)

    @rule(index=st.integers(0, 2), contracts=st.lists(st.sampled_from(CONTRACTS), min_size=1, max_size=3))
    def unsubscribe(self, index, contracts):
        session = self.sessions[index]
        if any(waiting is session for waiting, _ in self.waiting):
            return  # its subscribe is still being applied: a client's messages are handled in order
        reaction = session.state.receive(json.dumps({"action": "unsubscribe", "params": ",".join(
            f"Q.{contract}" for contract in contracts)}), self.now)
        self.hub.react_at_once(session, reaction)

    @rule()
    def grace_passes(self):
        self.now += 2.0
        self.registry.expire()

    @invariant()
    def upstream_within_the_cap(self):
        assert len([c for c in self.registry.upstream if c.ev_type == "Q"]) <= CAP
        granted = set().union(*(session.state.channels for session in self.sessions))
        assert len(granted | set(self.registry.wanted_of_type("Q"))) <= CAP


TestCappedMarket = CappedMarket.TestCase
TestCappedMarket.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.booleans(), st.sampled_from(
    [Channel("Q", f"O:C{n}") for n in range(6)] + [Channel("T", f"O:C{n}") for n in range(4)] + [Channel("T", "*")])),
    max_size=60))
def test_shards_place_each_held_channel_once_within_the_caps_and_report_every_change(steps):
    from proxy.core.shards import ChannelShards
    held: set[Channel] = set()
    changed: list[Channel] = []

    def take():
        taken = list(changed)
        changed.clear()
        return taken

    shards = ChannelShards(2, {"Q": 3}, take_changes=take, held=lambda: held)
    sent = [set(), set()]  # what each connection was told to hold, from the changes it was given
    for add, channel in steps:
        if add and channel.ev_type == "Q" and channel not in held and sum(c.ev_type == "Q" for c in held) >= 6:
            continue  # the hub's screen refuses it: never past cap x connections
        (held.add if add else held.discard)(channel)
        changed.append(channel)
        for index in (0, 1):
            for moved in shards.changes_for(index):
                (sent[index].add if moved in shards.held_by(index) else sent[index].discard)(moved)
    assert sent[0] | sent[1] == held and not sent[0] & sent[1]
    assert sent == [set(shards.held_by(0)), set(shards.held_by(1))]
    assert all(shards.count_on(index, "Q") <= 3 for index in (0, 1))
    assert Channel("T", "*") not in sent[1]


async def test_one_market_s_outage_leaves_the_others_flowing_and_unwarned(nursery):
    sim, hose, _ = await start_markets(nursery, ["stocks", "crypto"],
                                       firehose=dict(static_channels=parse_channel_list("T.*,Q.*,XT.*")))
    await all_connected(hose)
    assert "Q.*" not in sim.subscribed_channels("options")  # (options not served: nothing there)
    stocks = await market_client(nursery, hose.port, "/stocks", FIREHOSE_KEY, "T.*")
    crypto = await market_client(nursery, hose.port, "/crypto", FIREHOSE_KEY, "XT.*")
    await stocks.more_events(5)
    await crypto.more_events(5)
    crypto_part = hose.markets["crypto"]
    reconnects = crypto_part.link.reconnects
    sim.connections_to("crypto")[0].drop.set()
    await crypto.wait_status("upstream_disconnected")
    await wait_until(lambda: crypto_part.link.reconnects > reconnects, what="the crypto reconnect")
    await crypto.wait_status("upstream_connected")
    assert len(await crypto.more_events(5)) >= 5
    assert len(await stocks.more_events(20)) >= 20
    assert not [s for s in stocks.statuses if s["status"].startswith("upstream_")]  # stocks heard of nothing
    assert hose.link.reconnects == 0


async def test_static_channels_polygon_refuses_in_a_market_are_left_out_there(nursery, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.app.tier")
    sim, hose, _ = await start_markets(nursery, ["stocks", "options"],
                                       firehose=dict(static_channels=parse_channel_list("T.*,Q.*")))
    await all_connected(hose)
    await wait_until(lambda: "T.*" in sim.subscribed_channels("options"), what="options' T.*")
    assert "Q.*" in sim.subscribed_channels("stocks") and "Q.*" not in sim.subscribed_channels("options")
    assert any("options: FIREHOSE_SUBSCRIPTIONS' Q.* is not held in this market" in r.getMessage()
               for r in caplog.records)


async def test_the_official_client_reaches_the_delayed_feed_with_feed_host_port_delayed(nursery):
    sim, hose, _ = await start_markets(nursery, ["stocks"], delayed=["stocks"], simulator=dict(max_connections=2),
                                       firehose=dict(upstream_connections={"stocks": 2}))
    await all_connected(hose)
    result = await trio.run_process(
        [sys.executable, str(CLIENTS / "massive_client.py"), f"127.0.0.1:{hose.port}/delayed", FIREHOSE_KEY,
         "T.AAPL", "3", "stocks"], capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.decode().splitlines() if line.startswith("[")]
    assert len(lines) >= 3 and {tuple(line[1:]) for line in lines} == {("AAPL", "EquityTrade")}
    assert Channel("T", "AAPL") in next(c for c in sim.connections_to("stocks") if c.delayed).channels


async def test_each_market_journals_in_its_own_directory_and_the_cli_names_them(nursery, tmp_path):
    import io
    from proxy.app.journal_cli import main as journal_main
    from proxy.net.journal_store import list_segments
    sim, hose, _ = await start_markets(nursery, ["stocks", "crypto"], firehose=dict(
        journal_dir=str(tmp_path), static_channels=parse_channel_list("T.*,XT.*")))
    await all_connected(hose)
    await wait_until(lambda: all((tmp_path / name).is_dir() and list_segments(tmp_path / name)
                                 for name in ("stocks", "crypto")), what="a segment in each market's directory")
    assert hose.markets["crypto"].config.journal_dir == f"{tmp_path}/crypto"
    err = io.StringIO()
    assert journal_main(["ls", str(tmp_path)], stdout=io.StringIO(), stderr=err) == 2
    assert "holds one journal per market (crypto, stocks)" in err.getvalue()
    assert journal_main(["ls", str(tmp_path / "crypto")], stdout=io.StringIO(), stderr=io.StringIO()) == 0


def test_real_time_and_delayed_share_the_market_s_connections(monkeypatch, tmp_path):
    # Polygon counts a market's delayed and real-time connections together: a firehose serving
    # both needs two, and with three the real-time feed gets two (its channels spread over them).
    from proxy.app.config import load_firehose_config
    from proxy.core.errors import ConfigError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    monkeypatch.setenv("MARKETS", "stocks,options")
    monkeypatch.setenv("POLYGON_DELAYED_MARKETS", "stocks")
    with pytest.raises(ConfigError) as raised:
        load_firehose_config()
    assert raised.value.variable == "POLYGON_CONNECTIONS_STOCKS"
    assert "takes 2 connections, and Polygon counts them together; the account has 1" in str(raised.value)
    monkeypatch.setenv("POLYGON_CONNECTIONS_STOCKS", "3")
    config = load_firehose_config()
    shares = {route.path: config.for_route(route).connections_for(route.market) for route in config.routes}
    assert shares == {"stocks": 2, "options": 1, "delayed/stocks": 1}


async def test_a_quiet_market_s_outage_is_counted_from_its_last_answered_ping(nursery):
    # Nobody holds anything in crypto: no frame comes, but pings are answered; the outage that
    # follows a drop is as long as the drop, not as long as the quiet.
    sim, hose, _ = await start_markets(nursery, ["stocks", "crypto"])
    await all_connected(hose)
    crypto = hose.markets["crypto"]
    await trio.sleep(3.0)  # quiet: pings every 0.5 s (the tests' keepalive), answered
    assert crypto.link.last_heard_at is not None and trio.current_time() - crypto.link.last_heard_at < 1.5
    sim.connections_to("crypto")[0].drop.set()
    await wait_until(lambda: crypto.stats.outages == 1 and crypto.link.state is LinkState.CONNECTED,
                     what="the reconnect")
    assert crypto.stats.outage_seconds < 1.5, crypto.stats.outage_seconds


async def test_the_filtered_proxy_passes_on_what_the_firehose_says_of_a_refused_market(nursery):
    sim, hose, proxy = await start_markets(nursery, ["stocks", "options"], simulator=dict(entitled=("stocks",)),
                                           filtered=dict(metrics_port=0))
    await wait_until(lambda: hose.markets["options"].link.state is LinkState.REFUSED, what="the options refusal")
    await all_connected(proxy)
    options = proxy.markets["options"]
    await wait_until(lambda: options.upstream_reports is not None, what="the firehose's report")
    # a client that connects afterwards is told, as a client of the firehose would be
    client = await connect(nursery, proxy.port, "/options")
    answer = await client.auth(CLIENT_KEY)
    notice = next(s for s in answer + await client.next_status() if s["status"] == "upstream_disconnected")
    assert notice["message"].startswith("Polygon options refused us (auth_failed: Your plan doesn't include")
    ready, reason = proxy.readiness()
    assert ready and "options: firehose proxy options connected, and reports: Polygon options refused us" in reason
    # a market merely down at the firehose makes the filtered proxy not ready, as it does the firehose
    options.upstream_reports = {"status": "upstream_disconnected", "message": "Polygon options connection lost"}
    assert proxy.readiness()[0] is False
