"""The firehose tier against the simulator, over real sockets on 127.0.0.1."""

import json

import pytest
import trio

from prometheus_client import generate_latest

from proxy.core.outbox import SlowClientPolicy
from proxy.core.protocol import parse_channel, parse_channel_list
from tests.helpers import (
    ALL_STREAM,
    FAST_KEEPALIVE,
    FIREHOSE_KEY,
    LIVENESS_SECONDS,
    POLYGON_KEY,
    SlowReader,
    authed_client,
    connect,
    firehose_config,
    raw_events,
    start_firehose,
    start_simulator,
    start_tier,
    wait_until,
)

#: The rate of the slow-consumer tests: enough to fill a client's small socket buffer and its
#: queue in a second or two; 20,000 a second starved a busy machine of the CPU to route them.
SLOW_CONSUMER_RATE = 5000
#: How long a client that stopped reading may take to fill its socket and its queue: a second or
#: two unloaded, far more on a busy machine.
SLOW_CONSUMER_SECONDS = 60


def subscribed_at_polygon(sim):
    return [params for _, verb, params in sim.control_log if verb == "subscribe"]


async def test_demand_reaches_polygon_and_overlaps_cause_one_subscription(nursery):
    sim, firehose = await start_firehose(nursery, simulator=dict(events_per_second=3000))
    a = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.AAPL")
    b = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.AAPL,Q.MSFT")
    await wait_until(lambda: sim.subscribed_channels() == {"T.AAPL", "Q.MSFT"}, what="demand at Polygon")
    assert sorted(",".join(subscribed_at_polygon(sim)).split(",")) == ["Q.MSFT", "T.AAPL"]
    events_a = await a.wait_events(20)
    assert all((e["ev"], e["sym"]) == ("T", "AAPL") for e in events_a)
    both = {("T", "AAPL"), ("Q", "MSFT")}
    with trio.fail_after(LIVENESS_SECONDS):  # b gets both, whatever their mix
        while not both <= {(e["ev"], e["sym"]) for e in b.events}:
            await b.receive()
    assert {(e["ev"], e["sym"]) for e in b.events} == both  # and nothing else


@pytest.mark.parametrize("flush_ms", [0, 20])
async def test_star_downstream_gets_every_event_byte_for_byte_in_order(nursery, flush_ms):
    """One event per upstream frame, as Polygon sends in normal flow. With CLIENT_FLUSH_MS the `*`
    downstream gets fewer, larger frames: JSON arrays of the very bytes upstream sent, in order."""
    sim = await start_simulator(nursery, events_per_second=1000, frame_events=1)
    sim.record_frames = True
    firehose = await start_tier(nursery, firehose_config(
        sim, static_channels=parse_channel_list("T.*,Q.*"), client_flush_ms=flush_ms))
    star = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")

    with trio.fail_after(LIVENESS_SECONDS):
        while len(raw_events(star.frames)) <= 300:
            await star.receive()
    data_frames = [frame for frame in star.frames if '"ev":"status"' not in frame]
    assert all(isinstance(json.loads(frame), list) for frame in data_frames)
    sent, received = raw_events(sim.sent_frames[1]), raw_events(star.frames)
    start = sent.index(received[0])
    assert received == sent[start:start + len(received)]
    if flush_ms:  # 20 ms of one-event frames: writes carry many each
        assert len(data_frames) < len(received) / 2


async def test_one_upstream_connection_whatever_the_downstreams(nursery):
    sim, firehose = await start_firehose(nursery)
    symbols = ("AAPL", "MSFT", "GOOGL", "AMZN", "TSLA")
    clients = [await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe=f"T.{s}") for s in symbols]
    await wait_until(lambda: sim.subscribed_channels() == {f"T.{s}" for s in symbols})
    for client, symbol in zip(clients, symbols):  # each is served, all through the one connection
        assert {event["sym"] for event in await client.wait_events(3)} == {symbol}
    assert sim.connections_total == 1 and len(sim.connections) == 1


async def test_an_unsubscribe_reaches_polygon_once_its_grace_has_passed(nursery):
    """Over sockets: held through its grace, then unsubscribed at Polygon. That nothing is sent
    before the deadline, to the instant, is tested under a MockClock in test_tier."""
    sim, firehose = await start_firehose(nursery, unsubscribe_grace_seconds=0.6)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.AAPL")
    await wait_until(lambda: "T.AAPL" in sim.subscribed_channels())
    await client.send("unsubscribe", "T.AAPL")
    await wait_until(lambda: parse_channel("T.AAPL") in firehose.registry.in_grace(), what="the grace to begin")
    deadline = firehose.registry.in_grace()[parse_channel("T.AAPL")]
    await wait_until(lambda: "T.AAPL" not in sim.subscribed_channels(), what="the unsubscribe")
    assert trio.current_time() >= deadline
    assert [verb for _, verb, params in sim.control_log if params == "T.AAPL"] == ["subscribe", "unsubscribe"]


async def test_status_answers_from_polygon_are_not_forwarded_as_data(nursery):
    sim, firehose = await start_firehose(nursery, simulator=dict(events_per_second=500))  # connected, so
    # that no client hears of a wait
    star = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
    # T.* is asked of Polygon for this client: Polygon answers "subscribed to: T.*" on the data link
    await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*")
    await wait_until(lambda: sim.subscribed_channels() == {"T.*"}, what="Polygon's subscription")
    await star.wait_events(50)  # data that came after Polygon's answer
    assert all(e["ev"] == "T" for e in star.events)
    assert [s["message"] for s in star.statuses] == [
        "Connected Successfully", "authenticated", "subscribed to: *"]


async def _drop_and_recover(nursery, sim, firehose, fault):
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*,Q.*")
    await client.wait_events(20)
    fault()
    await client.wait_status("upstream_connected")
    statuses = [s["status"] for s in client.statuses]
    assert statuses.index("upstream_disconnected") < statuses.index("upstream_connected")
    await client.more_events(20)  # data flows again on the same client connection
    await wait_until(lambda: sim.subscribed_channels() == {"T.*", "Q.*"}, what="re-subscription")
    return client


async def test_upstream_drop_with_close_frame_recovers(nursery):
    sim, firehose = await start_firehose(nursery)
    await _drop_and_recover(nursery, sim, firehose, lambda: sim.drop_all())
    assert firehose.link.reconnects >= 1


async def test_upstream_abrupt_close_recovers(nursery):
    sim, firehose = await start_firehose(nursery)
    await _drop_and_recover(nursery, sim, firehose, lambda: sim.drop_all(abrupt=True))


async def test_silent_upstream_is_noticed_by_the_keepalive(nursery):
    sim, firehose = await start_firehose(nursery, **FAST_KEEPALIVE)
    await _drop_and_recover(nursery, sim, firehose, lambda: sim.faults.stall(3.0))
    # The keepalive, nothing else, noticed. (Not link.last_error: a reconnect's auth may reach the
    # simulator as it wakes, before it noticed the old connection gone, and get max_connections.)
    assert "upstream is silent" in firehose.history.outages[0].reason


async def test_auth_failed_retries_only_after_the_long_backoff(nursery):
    sim, firehose = await start_firehose(nursery)
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
    sim, firehose = await start_firehose(nursery)

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
    sim, firehose = await start_firehose(nursery)
    client = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*,Q.*")
    await client.wait_events(5)
    sim.faults.malformed_next = 1
    await wait_until(lambda: firehose.stats.bad_frames == 1)
    await client.more_events(10)  # the stream goes on, on the same connection
    assert firehose.stats.bad_frames == 1 and firehose.stats.outages == 0


async def test_slow_downstream_is_disconnected_and_others_miss_nothing(nursery):
    # the slow client is read only after the healthy one is checked, which can take more than the
    # default 5 s grace for reading the close on a loaded machine: the grace is not what is tested
    sim, firehose = await start_firehose(nursery, simulator=dict(events_per_second=SLOW_CONSUMER_RATE),
                                         client_queue_events=2000, static_channels=ALL_STREAM,
                                         slow_client_close_seconds=120)
    healthy = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
    # `slow` reads nothing: its socket fills, then its outbox, then the policy acts.
    slow = await SlowReader.subscribe(firehose.port, FIREHOSE_KEY, "*")
    with trio.move_on_after(SLOW_CONSUMER_SECONDS):
        while firehose.stats.slow_consumer_disconnects == 0:
            await healthy.receive()
    assert firehose.stats.slow_consumer_disconnects == 1, "the client that stopped reading was never disconnected"
    await healthy.more_events(1000)
    sequence = [e["q"] for e in healthy.events if "q" in e]
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence))), "gap for the healthy client"
    slow.fast = True  # what it was sent before the overflow, then the status, then the close
    with trio.fail_after(SLOW_CONSUMER_SECONDS):
        await slow.run()
    assert slow.close_code == 1008 and slow.statuses[-1] == "slow_consumer"
    assert slow.sequence == list(range(slow.sequence[0], slow.sequence[0] + len(slow.sequence)))


async def test_drop_oldest_policy_keeps_the_client_and_counts(nursery, caplog):
    sim, firehose = await start_firehose(
        nursery, simulator=dict(events_per_second=SLOW_CONSUMER_RATE), client_queue_events=2000,
        slow_client_policy=SlowClientPolicy.DROP_OLDEST, static_channels=parse_channel_list("T.*,Q.*"))
    slow = await SlowReader.subscribe(firehose.port, FIREHOSE_KEY, "*")
    await wait_until(lambda: firehose.hub.sessions, what="the client")
    (session,) = firehose.hub.sessions
    await wait_until(lambda: session.outbox.dropped_events > 0, timeout=SLOW_CONSUMER_SECONDS, what="drops")
    assert firehose.stats.slow_consumer_disconnects == 0
    slow.fast = True
    nursery.start_soon(slow.run)
    received = len(slow.sequence)
    await wait_until(lambda: len(slow.sequence) > received + 1000, what="events after the drops")  # still served
    assert slow.close_code is None and session in firehose.hub.sessions
    assert any("oldest events dropped" in r.getMessage() for r in caplog.records)
    # visible in /metrics while the client is still connected
    exposition = generate_latest(firehose.metrics).decode()
    line = next(l for l in exposition.splitlines() if l.startswith('proxy_events_dropped_total{market="stocks",reason="drop_oldest"'))
    assert float(line.rsplit(" ", 1)[1]) >= session.outbox.dropped_events > 0


async def test_downstream_auth_uses_firehose_keys(nursery):
    _, firehose = await start_firehose(nursery)
    client = await connect(nursery, firehose.port)
    assert (await client.auth(POLYGON_KEY))[0]["status"] == "auth_failed"
    assert await client.close_code() == 1008

