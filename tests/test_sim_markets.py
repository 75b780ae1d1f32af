"""The simulator speaks every market: each at its path, with its event types and symbol fields,
its own connection limit, the options contract cap and wildcard refusal, and the entitlement
switch. Socket-free tests check the feeds' formats; the others connect on 127.0.0.1."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio
import trio_websocket

from proxy.core.markets import MARKET_NAMES, OPTIONS_QUOTE_CAP, market
from proxy.core.protocol import EventKey, event_symbol, refused_channels
from proxy.sim.feeds import feed_model, option_contracts
from proxy.sim.market import MarketModel, frame_of, synthetic_symbols
from proxy.sim.simulator import NOT_ENTITLED
from tests.helpers import (
    FIREHOSE_KEY, LIVENESS_SECONDS, POLYGON_KEY, connect, firehose_config, start_simulator, start_tier, wait_until,
)

#: The types each market's simulated feed sends (the table's, less FMV where only business plans have it).
SIMULATED = {
    "stocks": {"T", "Q", "A", "AM", "LULD", "FMV", "NOI"},
    "options": {"T", "Q", "A", "AM", "FMV"},
    "forex": {"C", "CA", "CAS"},
    "crypto": {"XT", "XQ", "XA", "XAS", "XL2"},
    "indices": {"V", "A", "AM"},
    "futures": {"T", "Q", "A", "AM"},
}
#: What comes once a minute only (the socket-free tests check those).
PER_MINUTE = {"AM", "CA", "XA", "NOI"}
_read_key = msgspec.json.Decoder(EventKey).decode


def everything_of(name, seed=5):
    model = feed_model(name, seed=seed, stock_symbols=synthetic_symbols(30))
    events = model.stream_events(3000, 1_700_000_000_000)
    events += model.second_aggregates(1_700_000_000_000) + model.minute_aggregates(1_700_000_000_000)
    if isinstance(model, MarketModel):
        events += model.imbalances(1_700_000_000_000)
    return model, events


@pytest.mark.parametrize("name", MARKET_NAMES)
def test_each_feed_sends_its_market_s_types_with_the_symbol_where_routing_reads_it(name):
    _, events = everything_of(name)
    assert {event.ev for event in events} == SIMULATED[name]
    assert SIMULATED[name] <= set(market(name).codes)
    for event in events:
        decoded = json.loads(event.raw)
        field = market(name).event_type(event.ev).symbol_field
        assert decoded["ev"] == event.ev and decoded[field] == event.sym
        assert event_symbol(_read_key(event.raw)) == event.sym  # routing finds the channel's symbol


def test_symbols_are_written_as_each_market_writes_them():
    symbols = {name: {event.sym for event in everything_of(name)[1]} for name in MARKET_NAMES}
    assert all(re.fullmatch(r"O:[A-Z]+\d{6}[CP]\d{8}", s) for s in symbols["options"])
    assert all("/" in s and len(s) == 7 for s in symbols["forex"])
    assert all("-" in s and not s.startswith("X:") for s in symbols["crypto"])
    assert all(s.startswith("I:") for s in symbols["indices"])
    assert len(option_contracts()) > 100


@pytest.mark.parametrize("name", MARKET_NAMES)
def test_feeds_are_deterministic_per_seed(name):
    first, second, other = (frame_of(everything_of(name, seed)[1]) for seed in (3, 3, 4))
    assert first == second and first != other


def test_noi_leaves_the_seeded_stock_stream_as_it_was():
    symbols = synthetic_symbols(50)
    plain, with_noi = MarketModel(symbols, seed=9), MarketModel(symbols, seed=9)
    with_noi.imbalances(0)
    assert frame_of(plain.stream_events(500, 1)) == frame_of(with_noi.stream_events(500, 1))


@pytest.mark.parametrize("name", MARKET_NAMES)
def test_the_official_client_parses_every_feed_without_warnings(name, caplog):
    from massive.websocket.models import Market, parse

    _, events = everything_of(name)
    messages = json.loads(frame_of(events))
    logger = logging.getLogger("massive-test")
    with caplog.at_level(logging.DEBUG, logger="massive-test"):
        parsed = parse(messages, logger, Market(name))
    assert len(parsed) == len(messages)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


# --- through sockets ---------------------------------------------------------------------------


async def collect_types(client, wanted, *, limit=LIVENESS_SECONDS):
    """Events until every type in ``wanted`` came (aggregates come each second)."""
    with trio.fail_after(limit):
        while not wanted <= {event["ev"] for event in client.events}:
            await client.receive()
    return client.events


async def market_client(nursery, port, name, key=POLYGON_KEY):
    client = await connect(nursery, port, f"/{name}")
    status = (await client.auth(key))[0]
    assert status["status"] == "auth_success", (name, status)
    return client


async def test_each_market_at_its_path_sends_only_its_own_events(nursery):
    # One key, one connection in every market at once: Polygon's limit is per market.
    sim = await start_simulator(nursery, events_per_second=600)
    for name in MARKET_NAMES:
        client = await market_client(nursery, sim.port, name)
        wanted = SIMULATED[name] - PER_MINUTE  # each second's aggregates come, not each minute's
        if name == "options":  # no Q.* there: the busiest contracts by name
            channels = "T.*,A.*,FMV.*," + ",".join(f"Q.{c}" for c in sim.feeds["options"].symbols[:40])
        else:
            channels = ",".join(f"{code}.*" for code in wanted)
        assert all(s["status"] == "success" for s in await client.request("subscribe", channels))
        events = await collect_types(client, wanted)
        for event in events:
            event_type = market(name).event_type(event["ev"])
            assert event_type is not None and event["ev"] in wanted, (name, event)
            assert isinstance(event[event_type.symbol_field], str), (name, event)
    assert {connection.market for connection in sim.connections} == set(MARKET_NAMES)


async def test_a_named_symbol_brings_only_that_symbol(nursery):
    sim = await start_simulator(nursery, events_per_second=600)
    for name, channel, field in (("forex", "C.EUR/USD", "p"), ("crypto", "XT.BTC-USD", "pair"),
                                 ("indices", "V.I:SPX", "T"), ("futures", "T.ESZ5", "sym")):
        client = await market_client(nursery, sim.port, name)
        await client.request("subscribe", channel)
        events = await client.wait_events(20)
        ev_type, symbol = channel.split(".", 1)
        assert all(event["ev"] == ev_type and event[field] == symbol for event in events), (name, events[:3])


async def test_root_path_is_stocks_and_an_unserved_market_is_not_found(nursery):
    sim = await start_simulator(nursery, markets=("stocks", "options"), max_connections=3)
    for path in ("/", "/stocks/", "/delayed/stocks/"):  # a trailing slash too, as the proxy takes it
        client = await connect(nursery, sim.port, path)
        assert (await client.auth(POLYGON_KEY))[0]["status"] == "auth_success", path
    for port, path in ((sim.port, "/crypto"), (sim.port, "/stocks/extra"), (sim.port, "/bonds")):
        assert await rejection(port, path) == (404, b"not found: this simulator serves /stocks, /options (and each under /delayed/)\n")
    without_stocks = await start_simulator(nursery, markets=("crypto",))
    assert await rejection(without_stocks.port, "/") == (404, b"not found: this simulator serves /crypto (and each under /delayed/)\n")
    assert await rejection(sim.port, "/delayed/crypto") == (404, b"not found: this simulator serves /stocks, /options (and each under /delayed/)\n")


async def rejection(port, path):
    """The HTTP status and body that refuse a WebSocket at ``path``."""
    try:
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}{path}"):
            pass
    except trio_websocket.ConnectionRejected as rejected:
        return rejected.status_code, rejected.body
    raise AssertionError(f"{path} was accepted")


async def test_an_unentitled_market_answers_auth_failed_as_polygon_does(nursery):
    sim = await start_simulator(nursery, entitled=("stocks",))
    client = await connect(nursery, sim.port, "/crypto")
    assert await client.auth(POLYGON_KEY) == json.loads(NOT_ENTITLED) == [
        {"ev": "status", "status": "auth_failed", "message": "Your plan doesn't include websocket access."}]
    assert await client.close_code() == 1008
    wrong_key = await connect(nursery, sim.port, "/crypto")  # a bad key is told so first
    assert (await wrong_key.auth("wrong"))[0]["message"] == "authentication failed"
    await market_client(nursery, sim.port, "stocks")  # the entitled market serves as usual


async def test_the_connection_limit_is_per_market(nursery):
    sim = await start_simulator(nursery, max_connections=1)
    await market_client(nursery, sim.port, "stocks")
    await market_client(nursery, sim.port, "options")
    second = await connect(nursery, sim.port, "/options")
    assert (await second.auth(POLYGON_KEY))[0]["status"] == "max_connections"
    assert await second.close_code() == 1008
    await market_client(nursery, sim.port, "crypto")


async def test_options_quotes_have_no_wildcard_and_stop_at_the_contract_cap(nursery):
    sim = await start_simulator(nursery, events_per_second=50)
    client = await market_client(nursery, sim.port, "options")
    answer = await client.request("subscribe", "Q.*,T.*")
    assert answer == [
        {"ev": "status", "status": "error", "message": "refused Q.*: Q.* is not allowed on options: Polygon has no "
         "wildcard for options quotes; name contracts, at most 1,000 a connection"},
        {"ev": "status", "status": "success", "message": "subscribed to: T.*"},
    ]
    contracts = [f"O:SPY2612{n:04d}C00650000" for n in range(OPTIONS_QUOTE_CAP + 2)]
    answer = await client.request("subscribe", ",".join(f"Q.{c}" for c in contracts))
    assert [s["status"] for s in answer] == ["success"] * OPTIONS_QUOTE_CAP + ["error"] * 2
    assert answer[-1]["message"] == (f"refused Q.{contracts[-1]}: options Q (quotes) is limited to 1,000 "
                                     "contracts a connection; this would hold 1,001")
    held = sim.subscribed_channels("options")
    assert sum(1 for c in held if c.startswith("Q.")) == OPTIONS_QUOTE_CAP and "Q.*" not in held
    # a held contract again is no new one; an unsubscribe makes room for one more
    assert (await client.request("subscribe", f"Q.{contracts[0]}"))[0]["status"] == "success"
    await client.request("unsubscribe", f"Q.{contracts[0]}")
    assert (await client.request("subscribe", f"Q.{contracts[-1]}"))[0]["status"] == "success"
    assert (await client.request("subscribe", f"Q.{contracts[0]}"))[0]["status"] == "error"
    # a cap lowered while connected applies to the next subscribe
    sim.caps["options"] = {"Q": 1000}
    assert (await client.request("subscribe", f"Q.{contracts[0]}"))[0]["status"] == "error"
    sim.caps["options"] = {"Q": 1001}
    assert (await client.request("subscribe", f"Q.{contracts[0]}"))[0]["status"] == "success"
    # the cap is per connection, and other markets have none
    stocks = await market_client(nursery, sim.port, "stocks")
    answer = await stocks.request("subscribe", ",".join(f"Q.S{n}" for n in range(OPTIONS_QUOTE_CAP + 5)) + ",Q.*")
    assert {s["status"] for s in answer} == {"success"}


async def test_a_tier_above_the_simulator_relays_polygon_s_options_refusals(nursery):
    # The refusals are statuses a tier's link understands: its client hears `upstream refused`.
    # (The tier refuses Q.* and subscribes past its own cap itself; here Polygon's cap is lower
    # than the one the tier knows, so Polygon's refusal is what the client hears.)
    sim = await start_simulator(nursery, events_per_second=200)
    sim.caps["options"] = {"Q": 2}
    firehose = await start_tier(nursery, firehose_config(
        sim, market="options", upstream_url=f"ws://127.0.0.1:{sim.port}/options"))
    client = await connect(nursery, firehose.port, "/options")
    assert (await client.auth(FIREHOSE_KEY))[0]["status"] == "auth_success"
    contracts = sim.feeds["options"].symbols[:3]
    answer = await client.request("subscribe", ",".join(f"Q.{c}" for c in contracts))
    assert answer[0]["status"] == "success"
    refused: set[str] = set()
    with trio.fail_after(LIVENESS_SECONDS):  # the contract past Polygon's cap
        while not refused:
            for status in await client.next_status():
                named = refused_channels(status["message"]) if status["status"] == "error" else None
                refused |= {channel.text for channel in named or ()}
    assert len(refused & {f"Q.{c}" for c in contracts}) == 1, refused
    await wait_until(lambda: {c for c in sim.subscribed_channels("options") if c.startswith("Q.")}
                     == {f"Q.{c}" for c in contracts} - refused, what="the contracts within the cap")


async def test_a_market_nobody_is_connected_to_generates_nothing(nursery):
    sim = await start_simulator(nursery, events_per_second=2000)
    stocks = await market_client(nursery, sim.port, "stocks")
    await stocks.request("subscribe", "T.*")
    await stocks.wait_events(200)
    assert sim.generated_by_market["stocks"] > 0 and sim.generated_by_market["crypto"] == 0
    crypto = await market_client(nursery, sim.port, "crypto")
    await crypto.request("subscribe", "XT.*")
    await crypto.wait_events(20)
    assert sim.generated_by_market["crypto"] > 0


async def test_the_official_client_reads_every_market_from_the_simulator(nursery):
    # WebSocketClient(feed="host:port", market=M, secure=False) for each market, all at once: its
    # path, its auth, and its models for each market's events.
    sim = await start_simulator(nursery, events_per_second=1000)
    script = Path(__file__).parent / "clients" / "massive_client.py"
    contract = sim.feeds["options"].symbols[0]
    expected = {"stocks": ("T.AAPL", "EquityTrade", "AAPL"), "options": (f"T.{contract}", "EquityTrade", contract),
                "forex": ("C.EUR/USD", "ForexQuote", "EUR/USD"), "crypto": ("XT.BTC-USD", "CryptoTrade", "BTC-USD"),
                "indices": ("V.I:SPX", "IndexValue", "I:SPX"), "futures": ("T.ESZ5", "FuturesTrade", "ESZ5")}
    results = {}

    async def run(name: str, channel: str) -> None:
        results[name] = await trio.run_process(
            [sys.executable, str(script), f"127.0.0.1:{sim.port}", POLYGON_KEY, channel, "5", name],
            capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL)

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for name, (channel, _, _) in expected.items():
                clients.start_soon(run, name, channel)
    for name, (_, model, symbol) in expected.items():
        result = results[name]
        assert result.returncode == 0, result.stderr.decode()
        lines = [json.loads(line) for line in result.stdout.decode().splitlines() if line.startswith("[")]
        assert len(lines) >= 5 and {(line[1], line[2]) for line in lines} == {(symbol, model)}, (name, lines)
