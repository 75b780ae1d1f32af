"""The simulator behaves like Polygon: handshake, statuses, filtering, rate, faults, determinism."""

import json
import logging
import math

import pytest
import trio

from proxy.core.protocol import parse_channel_list
from proxy.sim import simulator as simulator_module
from proxy.sim.market import MarketModel, frame_of, synthetic_symbols
from proxy.sim.simulator import TICK_SECONDS, Faults, SimConnection, Simulator
from tests.helpers import (
    LIVENESS_SECONDS,
    POLYGON_KEY,
    Client,
    authed_client,
    connect,
    simulator_config,
    start_simulator,
    wait_until,
)


def data_types(events):
    return {event["ev"] for event in events}


async def test_handshake_and_subscription_statuses_are_exact(nursery):
    sim = await start_simulator(nursery, events_per_second=50)
    client = await connect(nursery, sim.port)
    assert await client.auth(POLYGON_KEY) == [
        {"ev": "status", "status": "auth_success", "message": "authenticated"}
    ]
    await client.send("subscribe", "T.AAPL,Q.MSFT")
    while client.frames[-1].find("subscribed to") < 0:
        await client.receive()
    assert client.frames[-1] == (
        '[{"ev":"status","status":"success","message":"subscribed to: T.AAPL"},'
        '{"ev":"status","status":"success","message":"subscribed to: Q.MSFT"}]'
    )
    await client.send("unsubscribe", "T.AAPL")
    while client.frames[-1].find("unsubscribed to") < 0:
        await client.receive()
    assert client.frames[-1] == '[{"ev":"status","status":"success","message":"unsubscribed to: T.AAPL"}]'
    assert sim.control_log == [(1, "subscribe", "T.AAPL,Q.MSFT"), (1, "unsubscribe", "T.AAPL")]


async def test_wrong_key_gets_auth_failed_and_close(nursery):
    sim = await start_simulator(nursery)
    client = await connect(nursery, sim.port)
    assert (await client.auth("wrong"))[0]["status"] == "auth_failed"
    assert await client.close_code() == 1008


async def test_no_auth_in_time_gets_auth_timeout_and_close(nursery):
    sim = await start_simulator(nursery, auth_timeout_seconds=0.2)
    client = await connect(nursery, sim.port)
    assert (await client.next_status())[0] == {
        "ev": "status", "status": "auth_timeout", "message": "No authentication request received."
    }
    assert await client.close_code() == 1008


async def test_second_connection_for_a_key_gets_max_connections(nursery):
    sim = await start_simulator(nursery)
    await authed_client(nursery, sim.port, POLYGON_KEY)
    second = await connect(nursery, sim.port)
    assert (await second.auth(POLYGON_KEY))[0]["status"] == "max_connections"
    assert await second.close_code() == 1008


async def test_bare_star_is_refused_unless_allowed(nursery):
    sim = await start_simulator(nursery, events_per_second=20)
    client = await authed_client(nursery, sim.port, POLYGON_KEY)
    assert (await client.request("subscribe", "*"))[0]["status"] == "error"
    allowing = await start_simulator(nursery, allow_star=True, events_per_second=500)
    client = await authed_client(nursery, allowing.port, POLYGON_KEY, subscribe="*")
    events = await client.wait_events(200)
    assert {"T", "Q"} <= data_types(events)


async def test_each_connection_gets_only_what_its_channels_select(nursery):
    sim = await start_simulator(nursery, events_per_second=3000, max_connections=2)
    trades = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="T.*,Q.AAPL")
    events = await trades.wait_events(300)
    assert events and all(e["ev"] == "T" or (e["ev"] == "Q" and e["sym"] == "AAPL") for e in events)
    assert data_types(events) == {"T", "Q"}


def generator(**overrides) -> tuple[Simulator, trio.MemoryReceiveChannel[str]]:
    """A simulator without sockets and one connection holding every stream type: its frames
    come out of the channel returned, for running ``_generate`` under a MockClock."""
    config = simulator_config(**overrides)
    sim = Simulator(config=config, model=MarketModel(synthetic_symbols(config.symbols), seed=config.seed),
                    faults=Faults())
    connection = SimConnection(id=1, channels=set(parse_channel_list("T.*,Q.*,LULD.*,FMV.*")))
    connection.reindex()
    connection.frames, frames = trio.open_memory_channel[str](math.inf)
    sim.connections.add(connection)
    return sim, frames


async def generated(sim: Simulator, frames: trio.MemoryReceiveChannel[str], seconds: float) -> list[list[dict]]:
    with trio.move_on_after(seconds):
        await simulator_module._generate(sim)
    received = []
    while True:
        try:
            received.append(json.loads(frames.receive_nowait()))
        except trio.WouldBlock:
            return received


async def test_the_event_rate_is_the_configured_one_in_one_frame_a_tick(autojump_clock):
    rate = 4000
    sim, frames = generator(events_per_second=rate)
    received = await generated(sim, frames, 3.0)
    events = [event for frame in received for event in frame]
    assert rate * 3 - rate * TICK_SECONDS <= len(events) <= rate * 3  # within the last tick's events
    assert len(received) == pytest.approx(3.0 / TICK_SECONDS, abs=1)  # a frame a tick, not lumps
    assert data_types(events) == {"T", "Q", "LULD", "FMV"}


async def test_a_low_rate_is_sent_event_by_event_at_its_time(autojump_clock):
    sim, frames = generator(events_per_second=20)
    received = await generated(sim, frames, 2.0)
    assert {len(frame) for frame in received} == {1} and 39 <= len(received) <= 40  # not lumps of a tick


async def test_prebuilt_frames_carry_the_send_time_and_keep_the_rate(autojump_clock):
    import time as wall

    rate = 2000
    sim, frames = generator(events_per_second=rate, prebuilt_events=5000)
    before_ms = int(wall.time() * 1000)
    received = await generated(sim, frames, 2.0)
    after_ms = int(wall.time() * 1000)
    events = [event for frame in received for event in frame]
    assert rate * 2 - rate * TICK_SECONDS <= len(events) <= rate * 2
    assert len(received) == pytest.approx(2.0 / TICK_SECONDS, abs=1)  # pre-built frames are whole ticks
    stamps = [event["t"] for event in events if event["ev"] in ("T", "Q")]
    assert stamps and all(before_ms <= t <= after_ms for t in stamps)  # stamped when sent, not when built


async def test_aggregates_come_every_second(nursery):
    sim = await start_simulator(nursery, events_per_second=1000)
    client = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="A.*")
    with trio.fail_after(LIVENESS_SECONDS):
        while len({event["s"] for event in client.events}) < 2:
            await client.receive()
    assert data_types(client.events) == {"A"}
    seconds = sorted({event["s"] for event in client.events})
    assert seconds[1] - seconds[0] == 1000  # one second's aggregates, then the next one's
    for event in client.events:
        assert event["e"] - event["s"] == 1000 and event["l"] <= event["c"] <= event["h"]


def test_market_model_is_deterministic_per_seed_and_quotes_are_consistent():
    symbols = synthetic_symbols(100)
    first, second = MarketModel(symbols, seed=42), MarketModel(symbols, seed=42)
    frames_a = [frame_of(first.stream_events(500, 1_700_000_000_000 + n)) for n in range(5)]
    frames_b = [frame_of(second.stream_events(500, 1_700_000_000_000 + n)) for n in range(5)]
    assert frames_a == frames_b
    assert first.second_aggregates(0) == second.second_aggregates(0)
    other = MarketModel(symbols, seed=43)
    assert frame_of(other.stream_events(500, 1_700_000_000_000)) != frames_a[0]
    events = [e for frame in frames_a for e in json.loads(frame)]
    quotes = [e for e in events if e["ev"] == "Q"]
    assert quotes and all(q["bp"] < q["ap"] for q in quotes)


def test_activity_is_zipf_like():
    model = MarketModel(synthetic_symbols(1000), seed=1)
    events = model.stream_events(20_000, 0)
    counts = {}
    for event in events:
        counts[event.sym] = counts.get(event.sym, 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] > 20 * (sorted(counts.values())[len(ranked) // 2])  # a busy head, a quiet tail
    assert max(counts, key=counts.get) == "AAPL"  # the well-known names lead the ranking


def test_official_client_models_parse_simulator_frames_without_warnings(caplog):
    from massive.websocket.models import Market, parse

    model = MarketModel(synthetic_symbols(20), seed=3)
    events = model.stream_events(3000, 1_700_000_000_000)
    events += model.second_aggregates(1_700_000_000_000) + model.minute_aggregates(1_700_000_000_000)
    messages = json.loads(frame_of(events))
    assert {m["ev"] for m in messages} == {"T", "Q", "LULD", "FMV", "A", "AM"}
    logger = logging.getLogger("massive-test")
    with caplog.at_level(logging.DEBUG, logger="massive-test"):
        parsed = parse(messages, logger, Market.Stocks)
    assert len(parsed) == len(messages)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    trade = next(p for p in parsed if type(p).__name__ == "EquityTrade")
    assert trade.symbol and trade.price > 0


# --- faults ------------------------------------------------------------------------------


async def test_fault_drop_after_seconds(nursery):
    sim = await start_simulator(nursery, drop_after_seconds=0.5)
    client = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="T.*")
    opened_at = next(iter(sim.connections)).opened_at
    assert await client.close_code() == 1001
    assert trio.current_time() - opened_at >= 0.5  # not before its time


async def test_fault_drop_after_frames(nursery):
    sim = await start_simulator(nursery, drop_after_frames=5, events_per_second=2000)
    client = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="T.*,Q.*")
    assert await client.close_code() == 1001
    data_frames = [f for f in client.frames if '"ev":"status"' not in f]
    assert len(data_frames) == 5


async def test_fault_abrupt_close_sends_no_close_frame(nursery):
    sim = await start_simulator(nursery)
    client = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="T.*")
    await client.wait_events(5)
    sim.drop_all(abrupt=True)
    assert await client.close_code() == 1006  # abnormal closure: no close frame arrived


async def test_fault_malformed_frame(nursery):
    sim = await start_simulator(nursery, events_per_second=500)
    client = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="T.*,Q.*")
    sim.faults.malformed_next = 1
    with trio.fail_after(LIVENESS_SECONDS):
        while True:
            message = await client.ws.get_message()
            try:
                json.loads(message)
            except ValueError:
                break
    await client.wait_events(len(client.events) + 5)  # and the stream goes on


async def answered_only_after_the_stall(client: Client, faults: Faults) -> None:
    """A ping sent during a stall is answered, but not before the stall ends; then data flows again."""
    pinged_at = trio.current_time()
    assert pinged_at < faults.stall_until, "the stall ended before the test could ping"
    with trio.fail_after(LIVENESS_SECONDS):
        await client.ws.ping()
    assert trio.current_time() >= faults.stall_until  # not even a pong while stalled
    await client.more_events(5)  # data flows again once the stall ends


async def test_fault_stall_answers_not_even_pings(nursery):
    sim = await start_simulator(nursery, events_per_second=500)
    client = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="T.*")
    # keep reading: a trio-websocket client that stops reading stops handling pongs too
    nursery.start_soon(client.collect, 60)
    with trio.fail_after(LIVENESS_SECONDS):
        await client.ws.ping()  # answered while healthy
    sim.faults.stall(1.0)
    await answered_only_after_the_stall(client, sim.faults)
    with trio.fail_after(LIVENESS_SECONDS):
        await client.ws.ping()  # and pings are answered again


async def test_fault_refuse_next_auths_then_accept(nursery):
    sim = await start_simulator(nursery, refuse_auth=2)
    for _ in range(2):
        client = await connect(nursery, sim.port)
        assert (await client.auth(POLYGON_KEY))[0]["status"] == "auth_failed"
    client = await connect(nursery, sim.port)
    assert (await client.auth(POLYGON_KEY))[0]["status"] == "auth_success"


async def test_fault_forced_max_connections(nursery):
    sim = await start_simulator(nursery)
    sim.faults.force_max_connections = True
    client = await connect(nursery, sim.port)
    assert (await client.auth(POLYGON_KEY))[0]["status"] == "max_connections"
    sim.faults.force_max_connections = False
    client = await connect(nursery, sim.port)
    assert (await client.auth(POLYGON_KEY))[0]["status"] == "auth_success"


async def test_marks_delimit_a_window_counted_by_channel(nursery):
    sim = await start_simulator(nursery, events_per_second=2000, prebuilt_events=5000)
    client = await authed_client(nursery, sim.port, POLYGON_KEY, subscribe="T.*,Q.AAPL,BENCH.MARK")
    sim.mark()
    await client.more_events(500)  # the window's length only sets how many events it holds
    sim.mark()
    with trio.fail_after(LIVENESS_SECONDS):
        while not any(e["ev"] == "BENCH" and e["n"] == 2 for e in client.events):
            await client.receive()
    marks = [i for i, e in enumerate(client.events) if e["ev"] == "BENCH"]
    assert len(marks) == 2
    inside = client.events[marks[0] + 1:marks[1]]
    counted = sum(n for channel, n in sim.window_counts.items() if channel.startswith("T.") or channel == "Q.AAPL")
    assert inside and len(inside) == counted == sim.window_events


async def test_faults_are_switchable_by_configuration(nursery):
    abrupt = await start_simulator(nursery, drop_after_frames=3, drop_abrupt=True, events_per_second=1000)
    client = await authed_client(nursery, abrupt.port, POLYGON_KEY, subscribe="T.*,Q.*")
    assert await client.close_code() == 1006

    broken = await start_simulator(nursery, malformed_frames=1, events_per_second=1000)
    client = await authed_client(nursery, broken.port, POLYGON_KEY, subscribe="T.*,Q.*")
    with trio.fail_after(LIVENESS_SECONDS):
        first_data = await client.ws.get_message()
    try:
        json.loads(first_data)
        raise AssertionError("the first data frame was not broken")
    except ValueError:
        pass

    refusing = await start_simulator(nursery, force_max_connections=True)
    client = await connect(nursery, refusing.port)
    assert (await client.auth(POLYGON_KEY))[0]["status"] == "max_connections"

    stalling = await start_simulator(nursery, stall_after_seconds=0.3, stall_seconds=1.0, events_per_second=500)
    client = await authed_client(nursery, stalling.port, POLYGON_KEY, subscribe="T.*")
    nursery.start_soon(client.collect, 60)  # keep reading, so the client handles pongs
    await wait_until(lambda: stalling.faults.stall_until > 0, what="the configured stall")
    await answered_only_after_the_stall(client, stalling.faults)
