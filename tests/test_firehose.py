"""The firehose tier against the simulator, over real sockets on 127.0.0.1."""

import json

import trio

from proxy.core.outbox import SlowClientPolicy
from tests.helpers import (
    FAST_KEEPALIVE,
    FIREHOSE_KEY,
    POLYGON_KEY,
    authed_client,
    connect,
    firehose_config,
    start_simulator,
    start_tier,
    wait_until,
)


def subscribed_at_polygon(sim):
    return [params for _, verb, params in sim.control_log if verb == "subscribe"]


async def test_demand_reaches_polygon_and_overlaps_cause_one_subscription(nursery):
    sim = await start_simulator(nursery, events_per_second=3000)
    firehose = await start_tier(nursery, firehose_config(sim))
    a = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.AAPL")
    b = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.AAPL,Q.MSFT")
    await wait_until(lambda: sim.subscribed_channels() == {"T.AAPL", "Q.MSFT"}, what="demand at Polygon")
    assert sorted(",".join(subscribed_at_polygon(sim)).split(",")) == ["Q.MSFT", "T.AAPL"]
    events_a = await a.collect(1.0)
    events_b = await b.collect(0.2)
    assert events_a and all((e["ev"], e["sym"]) == ("T", "AAPL") for e in events_a)
    assert {(e["ev"], e["sym"]) for e in events_b} == {("T", "AAPL"), ("Q", "MSFT")}


async def test_star_downstream_gets_every_frame_byte_for_byte(nursery):
    sim = await start_simulator(nursery, events_per_second=3000)
    sim.record_frames = True
    firehose = await start_tier(nursery, firehose_config(sim, static_channels=_channels("T.*,Q.*")))
    star = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
    await star.collect(1.0)
    sent = sim.sent_frames[1]
    received = [f for f in star.frames if '"ev":"status"' not in f]
    assert len(received) > 20
    start = sent.index(received[0])
    assert received == sent[start:start + len(received)]


async def test_one_upstream_connection_whatever_the_downstreams(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))
    clients = [await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe=f"T.{s}")
               for s in ("AAPL", "MSFT", "GOOGL", "AMZN", "TSLA")]
    await wait_until(lambda: len(sim.subscribed_channels()) == 5)
    assert sim.connections_total == 1 and len(sim.connections) == 1
    assert len(clients) == 5


async def test_unsubscribe_reaches_polygon_after_the_grace_not_before(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim, unsubscribe_grace_seconds=0.6))
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.AAPL")
    await wait_until(lambda: "T.AAPL" in sim.subscribed_channels())
    await client.send("unsubscribe", "T.AAPL")
    start = trio.current_time()
    await trio.sleep(0.4)
    assert "T.AAPL" in sim.subscribed_channels()
    await wait_until(lambda: "T.AAPL" not in sim.subscribed_channels(), what="the unsubscribe")
    assert trio.current_time() - start >= 0.6


async def test_status_answers_from_polygon_are_not_forwarded_as_data(nursery):
    sim = await start_simulator(nursery, events_per_second=500)
    firehose = await start_tier(nursery, firehose_config(sim))
    await wait_until(lambda: firehose.link.state.value == "connected")  # else clients hear of the wait
    star = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
    other = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*")
    await star.collect(1.0)
    assert star.events and all(e["ev"] == "T" for e in star.events)
    assert [s["message"] for s in star.statuses] == [
        "Connected Successfully", "authenticated", "subscribed to: *"]
    assert other is not None


async def _drop_and_recover(nursery, sim, firehose, fault):
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*,Q.*")
    await client.wait_events(20)
    fault()
    with trio.fail_after(10):
        while not any(s["status"] == "upstream_connected" for s in client.statuses):
            await client.receive()
    statuses = [s["status"] for s in client.statuses]
    assert statuses.index("upstream_disconnected") < statuses.index("upstream_connected")
    count = len(client.events)
    await client.wait_events(count + 20)  # data flows again on the same client connection
    await wait_until(lambda: sim.subscribed_channels() == {"T.*", "Q.*"}, what="re-subscription")
    return client


async def test_upstream_drop_with_close_frame_recovers(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))
    await _drop_and_recover(nursery, sim, firehose, lambda: sim.drop_all())
    assert firehose.link.reconnects >= 1


async def test_upstream_abrupt_close_recovers(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))
    await _drop_and_recover(nursery, sim, firehose, lambda: sim.drop_all(abrupt=True))


async def test_silent_upstream_is_noticed_by_the_keepalive(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim, **FAST_KEEPALIVE))
    await _drop_and_recover(nursery, sim, firehose, lambda: sim.faults.stall(3.0))
    assert "upstream is silent" in firehose.link.last_error  # the keepalive, nothing else, noticed


async def test_auth_failed_retries_only_after_the_long_backoff(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*")
    await client.wait_events(5)
    sim.faults.refuse_auth = 2
    attempts_before = sim.auth_attempts
    start = trio.current_time()
    await _drop_and_recover(nursery, sim, firehose, lambda: sim.drop_all())
    # two refusals, each followed by refused_seconds (0.3 s in tests) of waiting, never a tight loop
    assert sim.auth_attempts - attempts_before == 3
    assert trio.current_time() - start >= 0.6


async def test_max_connections_is_survived(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))

    def fault():
        sim.faults.force_max_connections = True
        sim.drop_all()

    async def lift():
        await trio.sleep(0.5)
        sim.faults.force_max_connections = False

    nursery.start_soon(lift)
    await _drop_and_recover(nursery, sim, firehose, fault)
    assert "max_connections" in firehose.link.last_error


async def test_malformed_upstream_frame_is_dropped_and_counted(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*,Q.*")
    await client.wait_events(5)
    sim.faults.malformed_next = 1
    await wait_until(lambda: firehose.stats.bad_frames == 1)
    count = len(client.events)
    await client.wait_events(count + 10)


async def test_slow_downstream_is_disconnected_and_others_miss_nothing(nursery):
    sim = await start_simulator(nursery, events_per_second=20000)
    firehose = await start_tier(
        nursery, firehose_config(sim, client_queue_events=2000,
                                 static_channels=_channels("T.*,Q.*,LULD.*,FMV.*"))
    )
    healthy = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
    slow = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
    # `slow` never reads again: its socket fills, then its outbox, then the policy acts.
    await healthy.collect(0.3)
    await wait_until(lambda: firehose.stats.slow_consumer_disconnects == 1, timeout=15, what="slow consumer")
    await healthy.collect(0.5)
    sequence = [e["q"] for e in healthy.events if "q" in e]
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence))), "gap for the healthy client"
    tail = []
    try:
        with trio.fail_after(10):
            while True:
                tail.append(await slow.ws.get_message())
    except Exception as closed:  # ConnectionClosed
        assert closed.reason.code == 1008
    assert any('"status":"slow_consumer"' in frame for frame in tail)


async def test_drop_oldest_policy_keeps_the_client_and_counts(nursery, caplog):
    sim = await start_simulator(nursery, events_per_second=20000)
    firehose = await start_tier(nursery, firehose_config(
        sim, client_queue_events=2000, slow_client_policy=SlowClientPolicy.DROP_OLDEST,
        static_channels=_channels("T.*,Q.*"),
    ))
    slow = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
    session = next(iter(firehose.hub.sessions))
    await wait_until(lambda: session.outbox.dropped_events > 0, timeout=15, what="drops")
    assert firehose.stats.slow_consumer_disconnects == 0
    events = await slow.collect(0.5)
    assert events  # still connected and served, newest data first
    assert any("oldest events dropped" in r.getMessage() for r in caplog.records)
    # visible in /metrics while the client is still connected
    from prometheus_client import generate_latest

    exposition = generate_latest(firehose.metrics).decode()
    line = next(l for l in exposition.splitlines() if l.startswith('proxy_events_dropped_total{reason="drop_oldest"'))
    assert float(line.rsplit(" ", 1)[1]) >= session.outbox.dropped_events > 0


async def test_downstream_auth_uses_firehose_keys(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))
    client = await connect(nursery, firehose.port)
    assert (await client.auth(POLYGON_KEY))[0]["status"] == "auth_failed"
    assert await client.close_code() == 1008


def _channels(text):
    from proxy.core.protocol import parse_channel_list

    return parse_channel_list(text)


def test_json_helper_is_strict():
    assert json.loads('[{"ev":"T"}]')
