"""Hub, without sockets: fan-out, flush, overflow, drop logging, per-key limits and totals, key
reloads, the upstream notice; and a client's reader (pings, pongs, the auth deadline) under a
MockClock. The connection is a :class:`~tests.helpers.FakeConnection`."""

from __future__ import annotations

import gc
import json
import logging
import weakref

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from proxy.core import protocol
from proxy.core.entitlements import KeyBook, KeyEntry, hash_key
from proxy.core.outbox import SlowClientPolicy
from proxy.core.protocol import parse_channel, parse_channel_list
from proxy.core.routing import route_frame
from proxy.core.session import Phase
from proxy.core.subscriptions import SubscriptionRegistry
from proxy.net.beacon import Beacon
from proxy.net.server import DROP_LOG_INTERVAL, UNAUTHENTICATED, UNNAMED_KEY, ClientSession, Hub, _read_loop
from tests.helpers import CLIENT_KEY, FakeConnection, filtered_config

RESEARCH, TRADING = "research-key", "trading-key"
AAPL_TRADE = b'{"ev":"T","sym":"AAPL","p":1,"q":1}'
MSFT_QUOTE = b'{"ev":"Q","sym":"MSFT","bp":1,"q":2}'


class CountingBeacon(Beacon):
    def __init__(self) -> None:
        super().__init__()
        self.pulses = 0

    def pulse(self) -> None:
        self.pulses += 1
        super().pulse()


def make_hub(**config: object) -> Hub:
    settings = filtered_config(1, **config)
    registry = SubscriptionRegistry(clock=trio.current_time, grace_seconds=settings.unsubscribe_grace_seconds,
                                    static=settings.static_channels)
    return Hub(config=settings, registry=registry, key_book=settings.key_book)


def message(action: str, params: str) -> str:
    return json.dumps({"action": action, "params": params})


def join(hub: Hub, *, key: str | None = CLIENT_KEY, subscribe: str | None = None, peer: str = "10.0.0.1:5000",
         connection: FakeConnection | None = None) -> tuple[ClientSession, FakeConnection]:
    """A client that completed the handshake; authenticated with ``key`` and subscribed, if given."""
    connection = connection or FakeConnection()
    session = hub.open_session(peer, connection)  # type: ignore[arg-type]
    if key is not None:
        hub.react_at_once(session, session.state.receive(message("auth", key), trio.current_time()))
    if subscribe is not None:
        hub.react_at_once(session, session.state.receive(message("subscribe", subscribe), trio.current_time()))
    return session, connection


def replies(session: ClientSession) -> list[dict]:
    """The statuses queued for ``session`` (what its writer would send), taken."""
    return [event for frame in session.outbox.take_frames() for event in json.loads(frame)]


def deliver(hub: Hub, *events: bytes, received_at: float = 0.0) -> None:
    hub.deliver(route_frame(b"[" + b",".join(events) + b"]", hub.registry), received_at)


# --- fan-out and flush ---------------------------------------------------------------------------


async def test_deliver_queues_and_flush_writes_each_client_its_events_in_one_frame():
    hub = make_hub()
    star, star_connection = join(hub, subscribe="*")
    aapl, aapl_connection = join(hub, subscribe="T.AAPL")
    idle, idle_connection = join(hub, subscribe="T.GOOGL")
    for session in (star, aapl, idle):
        replies(session)
    deliver(hub, AAPL_TRADE, MSFT_QUOTE, received_at=trio.current_time())
    deliver(hub, AAPL_TRADE)
    assert star_connection.sent == aapl_connection.sent == []  # queued only: flush writes
    hub.flush()
    # `*`: the two frames' events as one array, in order
    assert star_connection.sent == [b"[" + AAPL_TRADE + b"," + MSFT_QUOTE + b"," + AAPL_TRADE + b"]"]
    assert aapl_connection.sent == [b"[" + AAPL_TRADE + b"," + AAPL_TRADE + b"]"]  # its runs, joined
    assert idle_connection.sent == []
    assert (star.events_sent, aapl.events_sent, idle.events_sent) == (3, 2, 0)
    assert hub.stats.events_out == 5 and hub.stats.frames_out == 2
    assert hub.stats.bytes_out == sum(len(frame) for frame in star_connection.sent + aapl_connection.sent)
    assert sum(hub.stats.routing_latency.counts) == 2  # one observation per client written
    hub.flush()  # nothing new: nothing written
    assert len(star_connection.sent) == 1 and len(aapl_connection.sent) == 1


async def test_a_backlogged_connection_gets_nothing_new_and_its_writer_is_woken():
    hub = make_hub()
    session, connection = join(hub, subscribe="T.AAPL")
    replies(session)
    connection.backlogged = True
    deliver(hub, AAPL_TRADE)
    hub.flush()
    assert connection.sent == [] and session.outbox.queued_events == 1  # it waits in the outbox
    assert session.wakeup.is_set()
    connection.backlogged = False
    hub.write_queued(session, trio.current_time())  # what the writer does once drained
    assert connection.sent == [b"[" + AAPL_TRADE + b"]"] and session.outbox.unsent_events == 0


async def test_events_written_into_a_backlog_still_count_toward_the_queue():
    hub = make_hub(client_queue_events=3)
    session, connection = join(hub, subscribe="T.AAPL")
    replies(session)
    deliver(hub, AAPL_TRADE, AAPL_TRADE)
    original_send = connection.send_texts

    def send_and_fill(texts):  # the kernel takes part of it: the rest waits in the backlog
        connection.backlogged = True
        return original_send(texts)

    connection.send_texts = send_and_fill  # type: ignore[method-assign]
    hub.flush()
    assert session.outbox.unsent_events == 2
    deliver(hub, AAPL_TRADE)
    deliver(hub, AAPL_TRADE)  # 2 written but unsent + 2 queued > 3
    assert session.outbox.overflowed and session.close_request == (1008, "slow consumer")


# --- adaptive write coalescing (CLIENT_FLUSH_MS) ----------------------------------------------------


async def test_within_the_flush_interval_a_client_gets_one_write_at_its_end_with_everything_in_order(mock_clock):
    hub = make_hub(client_flush_ms=10)
    star, star_connection = join(hub, subscribe="*")
    aapl, aapl_connection = join(hub, subscribe="T.AAPL")
    for session in (star, aapl):
        replies(session)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run_flusher)
        start = trio.current_time()
        deliver(hub, AAPL_TRADE, received_at=start)
        hub.flush()  # quiet until now: written at once
        assert aapl_connection.sent == [b"[" + AAPL_TRADE + b"]"] and len(star_connection.sent) == 1
        mock_clock.jump(0.002)
        deliver(hub, MSFT_QUOTE, received_at=trio.current_time())
        hub.flush()
        mock_clock.jump(0.002)
        deliver(hub, AAPL_TRADE, MSFT_QUOTE, received_at=trio.current_time())
        hub.flush()
        hub.broadcast(protocol.status_frame("upstream_disconnected", "gone"))  # a status: keeps its place
        mock_clock.jump(start + 0.0099 - trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert len(aapl_connection.sent) == 1 and len(star_connection.sent) == 1  # 9.9 ms: still waiting
        mock_clock.jump(start + 0.010 - trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        status = protocol.status_frame("upstream_disconnected", "gone")
        assert aapl_connection.sent[1:] == [b"[" + AAPL_TRADE + b"]", status]  # the flusher wrote, at 10 ms
        assert star_connection.sent[1:] == [
            b"[" + MSFT_QUOTE + b"," + AAPL_TRADE + b"," + MSFT_QUOTE + b"]",  # two frames, one array
            status]
        # the wait counts as latency: the star's write waited 8 ms for its oldest events, T.AAPL's 6 ms
        assert hub.stats.routing_latency.total_seconds == pytest.approx(0.008 + 0.006)
        mock_clock.jump(0.05)
        deliver(hub, AAPL_TRADE, received_at=trio.current_time())
        hub.flush()  # a lone frame after a quiet spell: at once
        assert aapl_connection.sent[3:] == [b"[" + AAPL_TRADE + b"]"]
        nursery.cancel_scope.cancel()


async def test_a_write_scheduled_before_the_flusher_s_wake_up_wakes_it_earlier(mock_clock):
    hub = make_hub(client_flush_ms=10)
    early, early_connection = join(hub, subscribe="T.AAPL")
    late, late_connection = join(hub, subscribe="Q.MSFT")
    replies(early)
    replies(late)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run_flusher)
        start = trio.current_time()
        deliver(hub, AAPL_TRADE)
        hub.flush()  # early written at 0
        mock_clock.jump(0.008)
        late_written = trio.current_time()
        deliver(hub, MSFT_QUOTE)
        hub.flush()  # late written at 8 ms
        mock_clock.jump(0.001)
        deliver(hub, MSFT_QUOTE)
        hub.flush()  # late due at 18 ms: the flusher sleeps until then
        await trio.testing.wait_all_tasks_blocked()
        deliver(hub, AAPL_TRADE)
        hub.flush()  # early due at 10 ms: before that
        mock_clock.jump(start + 0.010 - trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert len(early_connection.sent) == 2 and len(late_connection.sent) == 1
        mock_clock.jump(late_written + 0.010 - trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert len(late_connection.sent) == 2
        nursery.cancel_scope.cancel()


async def test_the_flusher_holds_no_session_once_it_is_closed(mock_clock):
    hub = make_hub(client_flush_ms=10)
    session, connection = join(hub, subscribe="T.AAPL")
    replies(session)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run_flusher)
        deliver(hub, AAPL_TRADE)
        hub.flush()
        deliver(hub, AAPL_TRADE)
        hub.flush()  # scheduled: the flusher writes it
        mock_clock.jump(0.010)
        await trio.testing.wait_all_tasks_blocked()
        assert len(connection.sent) == 2
        reference = weakref.ref(session)
        hub.close_session(session)
        del session
        gc.collect()
        assert reference() is None  # not kept alive by the sleeping flusher, nor by the pacer
        nursery.cancel_scope.cancel()


# --- `*` holders in step share one run: joined once, written to each ----------------------------------

_raw_events = msgspec.json.Decoder(list[msgspec.Raw]).decode
STATUS = protocol.status_frame("upstream_disconnected", "gone")


def trade(n: int) -> bytes:
    return b'{"ev":"T","sym":"AAPL","p":1,"q":%d}' % n


def received(connection: FakeConnection) -> list[bytes]:
    """What a client received: each data event's bytes, and each status frame whole, in order;
    every frame must be a JSON array (of whole events: msgspec splits it)."""
    got: list[bytes] = []
    for frame in connection.sent:
        data = frame.encode() if isinstance(frame, str) else frame
        if b'"ev":"status"' in data:
            got.append(data)
        else:
            got.extend(bytes(raw).strip() for raw in _raw_events(data))
    return got


def star_clients(hub: Hub, count: int) -> list[tuple[ClientSession, FakeConnection]]:
    """``count`` clients holding ``*``, their answers written: in step with the run."""
    clients = [join(hub, subscribe="*") for _ in range(count)]
    for session, connection in clients:
        hub.write_queued(session, trio.current_time())
        connection.sent.clear()
    return clients


async def test_star_holders_in_step_are_written_the_same_frames_joined_once_and_a_lagging_one_catches_up(
        mock_clock):
    hub = make_hub(client_flush_ms=0)
    (a, a_connection), (b, b_connection), (lagging, lagging_connection) = star_clients(hub, 3)
    assert set(hub.star_run.members) == {a, b, lagging}
    hub.stats.events_out = hub.stats.frames_out = hub.stats.bytes_out = 0
    for session in (a, b, lagging):
        session.events_sent = 0
    deliver(hub, trade(1))
    deliver(hub, trade(2), trade(3))
    hub.flush()
    [written] = a_connection.sent
    assert written == b"[" + trade(1) + b"," + trade(2) + b"," + trade(3) + b"]"
    assert b_connection.sent[0] is written and lagging_connection.sent[0] is written  # built once
    assert (a.events_sent, b.events_sent, lagging.events_sent) == (3, 3, 3)
    assert hub.stats.events_out == 9 and hub.stats.frames_out == 3
    assert hub.stats.bytes_out == 3 * len(written) and sum(hub.stats.routing_latency.counts) == 3

    lagging_connection.backlogged = True  # the kernel takes no more from it
    deliver(hub, trade(4))
    hub.flush()
    deliver(hub, trade(5))
    hub.flush()
    assert set(hub.star_run.members) == {a, b}  # it goes on alone, with its own outbox
    assert a_connection.sent[1:] == [b"[" + trade(4) + b"]", b"[" + trade(5) + b"]"]
    assert all(x is y for x, y in zip(a_connection.sent, b_connection.sent))
    assert len(lagging_connection.sent) == 1 and lagging.outbox.queued_events == 2 and lagging.wakeup.is_set()
    lagging_connection.backlogged = False
    hub.write_queued(lagging, trio.current_time())  # what its writer does once the socket drained
    assert lagging_connection.sent[1:] == [b"[" + trade(4) + b"," + trade(5) + b"]"]  # behind: one array

    hub.broadcast(STATUS)  # a status for everyone: after the data queued before it
    deliver(hub, trade(6))
    hub.flush()
    deliver(hub, trade(7))
    hub.flush()
    deliver(hub, trade(8))
    hub.flush()
    reference = [trade(1), trade(2), trade(3), trade(4), trade(5), STATUS.encode(), trade(6), trade(7), trade(8)]
    for connection in (a_connection, b_connection, lagging_connection):
        assert received(connection) == reference
    assert set(hub.star_run.members) == {a, b, lagging}  # all caught up: in step again
    assert a_connection.sent[-1] is b_connection.sent[-1] is lagging_connection.sent[-1]


async def test_a_member_that_lets_star_go_or_leaves_gets_nothing_more_from_the_run(mock_clock):
    hub = make_hub(client_flush_ms=10)
    (kept, kept_connection), (letting_go, letting_go_connection), (leaving, _) = star_clients(hub, 3)
    deliver(hub, trade(1), received_at=trio.current_time())  # within the interval of their last write: the run waits
    hub.flush()
    assert len(hub.star_run) == 1
    assert kept.outbox.events_waiting == 1 and kept.outbox.oldest_waiting_at == trio.current_time()  # for /clients
    hub.react_at_once(letting_go, letting_go.state.receive(message("unsubscribe", "*"), trio.current_time()))
    await hub.release(leaving)  # a client leaving lets its channels go (no answer: nothing put)
    assert set(hub.star_run.members) == {kept}
    deliver(hub, trade(2))
    hub.write_run(trio.current_time())
    assert received(kept_connection) == [trade(1), trade(2)]
    hub.write_queued(letting_go, trio.current_time())
    assert [event for event in received(letting_go_connection) if b"status" not in event] == [trade(1)]
    assert leaving.outbox.take_frames() == [b"[" + trade(1) + b"]"]  # what was routed while it held `*`
    hub.close_session(leaving)
    deliver(hub, trade(3))
    assert hub.star_run.events == 1 and set(hub.star_run.members) == {kept}


async def test_a_run_past_the_queue_capacity_is_the_slow_consumer_it_would_have_been_alone(mock_clock):
    hub = make_hub(client_flush_ms=10, client_queue_events=3)
    clients = star_clients(hub, 2)
    for n in range(3):
        deliver(hub, trade(n))
        hub.flush()  # within the interval: nothing written
    assert hub.star_run.events == 3
    deliver(hub, trade(3))
    for session, connection in clients:
        assert session.outbox.overflowed and session.outbox.dropped_events == 4
        assert session.close_request == (1008, "slow consumer") and connection.sent == []
    assert not hub.star_run.members and hub.stats.slow_consumer_disconnects == 2


_ops = st.lists(st.one_of(
    st.tuples(st.just("frame"), st.integers(1, 3)),
    st.tuples(st.just("status"), st.just(0)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("tick"), st.integers(1, 12)),  # ms, then a flush (as the flusher's wake-up would)
    st.tuples(st.just("backlog"), st.integers(0, 2)),
    st.tuples(st.just("drain"), st.integers(0, 2)),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, flush_ms=st.sampled_from([0, 5]))
def test_every_star_holder_gets_every_event_in_order_with_statuses_in_place_whoever_lags(ops, flush_ms):
    """Random frames, statuses, flushes, clock ticks and sockets backing up and draining: each of three
    `*` clients receives exactly the reference (every event's bytes in upstream order, each status
    where it was sent), every frame a JSON array, however it fell in and out of step; and once
    every socket is drained, all are in step again and share each write."""

    async def scenario() -> None:
        hub = make_hub(client_flush_ms=flush_ms)
        clients = star_clients(hub, 3)
        reference: list[bytes] = []
        counter = 0

        def drain(session: ClientSession, connection: FakeConnection) -> None:
            connection.backlogged = False
            session.outbox.unsent_events = 0
            hub.write_queued(session, trio.current_time())

        for op, arg in ops:
            if op == "frame":
                events = [trade(counter + i) for i in range(arg)]
                counter += arg
                deliver(hub, *events, received_at=trio.current_time())
                reference.extend(events)
            elif op == "status":
                hub.broadcast(STATUS)
                reference.append(STATUS.encode())
            elif op == "flush":
                hub.flush()
            elif op == "tick":
                clock.jump(arg / 1000)
                hub.flush()
            elif op == "backlog":
                clients[arg][1].backlogged = True
            else:
                drain(*clients[arg])
        for _ in range(3):  # every socket drains; the writers write; frames come, a second apart
            for client in clients:
                drain(*client)
            deliver(hub, trade(counter), received_at=trio.current_time())
            reference.append(trade(counter))
            counter += 1
            clock.jump(1.0)
            hub.flush()
        for session, connection in clients:
            assert received(connection) == reference
        assert set(hub.star_run.members) == {session for session, _ in clients}
        assert clients[0][1].sent[-1] is clients[1][1].sent[-1] is clients[2][1].sent[-1]

    clock = trio.testing.MockClock()
    trio.run(scenario, clock=clock)


# --- slow clients ----------------------------------------------------------------------------------


async def test_overflow_closes_the_client_once_and_cancels_its_wait_for_the_socket(caplog):
    hub = make_hub(client_queue_events=2, client_flush_ms=0)  # every flush writes the neighbour
    session, _ = join(hub, subscribe="T.AAPL")
    neighbour, neighbour_connection = join(hub, subscribe="T.AAPL")
    replies(session)
    replies(neighbour)
    session.drain_scope = trio.CancelScope()
    session.wakeup = trio.Event()
    with caplog.at_level(logging.WARNING):
        deliver(hub, AAPL_TRADE, AAPL_TRADE)
        hub.flush()
        session.connection.backlogged = True  # type: ignore[attr-defined]
        for _ in range(5):
            deliver(hub, AAPL_TRADE)
            hub.flush()
    assert session.close_request == (1008, "slow consumer")
    assert session.drain_scope.cancel_called and session.wakeup.is_set()
    assert hub.stats.slow_consumer_disconnects == 1  # counted once, however many puts failed
    assert len([r for r in caplog.records if "slow consumer" in r.getMessage()]) == 1
    assert neighbour_connection.sent == [b"[" + AAPL_TRADE + b"," + AAPL_TRADE + b"]"] + [b"[" + AAPL_TRADE + b"]"] * 5
    assert hub.stats.events_out == 2 + 2 + 5  # the slow one's first two, and all of the neighbour's
    assert session.outbox.dropped_events == 3  # the two queued and the one that did not fit
    assert hub.dropped(SlowClientPolicy.DISCONNECT) == 3
    hub.close_session(session)
    assert hub.stats.dropped_slow_consumer == 3 and hub.stats.dropped_drop_oldest == 0
    assert hub.dropped(SlowClientPolicy.DISCONNECT) == 3


async def test_drop_oldest_drops_are_logged_at_most_once_per_interval(caplog, autojump_clock):
    hub = make_hub(client_queue_events=2, slow_client_policy=SlowClientPolicy.DROP_OLDEST)
    session, connection = join(hub, subscribe="T.AAPL")
    replies(session)
    connection.backlogged = True

    def drops_logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if "oldest events dropped" in r.getMessage()]

    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            deliver(hub, AAPL_TRADE, AAPL_TRADE)
            hub.flush()
        assert drops_logged() == ["client 1 (10.0.0.1:5000) is not keeping up: 2 oldest events dropped so far "
                                  "(SLOW_CLIENT_POLICY=drop_oldest)"]  # the third round's drops: not yet
        await trio.sleep(DROP_LOG_INTERVAL - 1)
        deliver(hub, AAPL_TRADE, AAPL_TRADE)
        hub.flush()
        assert len(drops_logged()) == 1  # within the interval: counted, not logged
        await trio.sleep(1)
        deliver(hub, AAPL_TRADE, AAPL_TRADE)
        hub.flush()
        assert len(drops_logged()) == 2 and "8 oldest events dropped" in drops_logged()[-1]
    assert session.close_request is None and hub.stats.slow_consumer_disconnects == 0
    assert hub.dropped(SlowClientPolicy.DROP_OLDEST) == 8 and hub.dropped(SlowClientPolicy.DISCONNECT) == 0


# --- sessions, limits, totals ----------------------------------------------------------------


async def test_refusals_count_clients_and_connections_per_address():
    hub = make_hub(max_clients=3, max_connections_per_ip=2)
    first, _ = join(hub, key=None, peer="10.0.0.1:1")
    join(hub, key=None, peer="10.0.0.1:2")
    assert "MAX_CONNECTIONS_PER_IP" in hub.refusal("10.0.0.1:3")
    assert hub.refusal("10.0.0.2:1") is None
    join(hub, key=None, peer="10.0.0.2:1")
    assert "MAX_CLIENTS" in hub.refusal("10.0.0.3:1")
    assert (hub.stats.refused_per_ip, hub.stats.refused_max_clients) == (1, 1)
    hub.close_session(first)
    assert hub.refusal("10.0.0.1:3") is None and dict(hub.connections_per_ip) == {"10.0.0.1": 1, "10.0.0.2": 1}


async def test_closing_a_session_releases_its_channels_and_its_connection_and_keeps_its_totals():
    hub = make_hub()
    session, connection = join(hub, subscribe="T.AAPL,Q.*")
    stranger, _ = join(hub, key=None, peer="10.0.0.9:1")
    replies(session)
    assert hub.registry.upstream == frozenset(parse_channel_list("T.AAPL,Q.*"))
    deliver(hub, AAPL_TRADE, MSFT_QUOTE)
    hub.flush()
    assert hub.key_totals() == {UNNAMED_KEY: (1, 2, 0), UNAUTHENTICATED: (1, 0, 0)}
    hub.demand_changed = CountingBeacon()
    hub.close_session(session)
    hub.close_session(stranger)
    assert hub.demand_changed.pulses == 2  # the grace task and the link hear of each
    assert hub.registry.channels_of(session) == frozenset() and session not in hub.sessions
    assert set(hub.registry.in_grace()) == set(parse_channel_list("T.AAPL,Q.*"))  # unsubscribed after the grace
    assert connection.notify.__name__ == "_ignore"  # no cycle session ↔ connection keeps either alive
    assert hub.key_totals() == {UNNAMED_KEY: (0, 2, 0), UNAUTHENTICATED: (0, 0, 0)}
    assert not hub.connections_per_ip


async def test_a_named_key_over_its_connection_limit_is_refused_at_auth():
    book = KeyBook((KeyEntry("research", hash_key(RESEARCH), max_connections=2),))
    hub = make_hub(key_book=book)
    first, _ = join(hub, key=RESEARCH)
    second, _ = join(hub, key=RESEARCH)
    third, _ = join(hub, key=RESEARCH)
    assert [s["status"] for s in replies(first)] == [s["status"] for s in replies(second)] == ["auth_success"]
    refusal = replies(third)
    assert [s["status"] for s in refusal] == ["max_connections"]  # as Polygon answers one too many
    assert refusal[0]["message"] == "key 'research' may hold at most 2 connections (API_KEYS_FILE)"
    assert third.close_request == (1013, "key connection limit") and third.state.phase is Phase.CLOSED
    assert hub.stats.refused_per_key == 1
    second.close_request = (1000, "leaving")  # one on its way out no longer counts
    fourth, _ = join(hub, key=RESEARCH)
    assert [s["status"] for s in replies(fourth)] == ["auth_success"] and fourth.close_request is None
    assert hub.key_totals()["research"][0] == 4  # connected until their sessions end


async def test_a_client_authenticating_while_the_upstream_is_down_is_told_after_its_auth_success():
    hub = make_hub()
    notice = protocol.status_frame("upstream_disconnected", "firehose proxy not connected yet")
    hub.upstream_notice = lambda: notice
    told, _ = join(hub)
    assert [s["status"] for s in replies(told)] == ["auth_success", "upstream_disconnected"]
    hub.upstream_notice = lambda: None
    untold, _ = join(hub)
    assert [s["status"] for s in replies(untold)] == ["auth_success"]
    refused, _ = join(hub, key="wrong")
    assert [s["status"] for s in replies(refused)] == ["auth_failed"]  # no notice for a refused key
    assert hub.stats.auth_failures == 1


async def test_a_key_reload_closes_removed_keys_narrows_channels_and_leaves_the_rest():
    book = KeyBook((KeyEntry("research", hash_key(RESEARCH), channels=tuple(parse_channel_list("T.*,Q.AAPL"))),
                    KeyEntry("trading", hash_key(TRADING))))
    hub = make_hub(key_book=book)
    research, _ = join(hub, key=RESEARCH, subscribe="T.*,Q.AAPL")
    trading, _ = join(hub, key=TRADING, subscribe="Q.*")
    unnamed, _ = join(hub, subscribe="T.MSFT")
    for session in (research, trading, unnamed):
        replies(session)
    hub.reload_keys(KeyBook((KeyEntry("research", hash_key(RESEARCH), channels=(parse_channel("Q.AAPL"),)),)))
    revoked = replies(trading)
    assert revoked[0]["status"] == "auth_revoked" and "'trading' was removed" in revoked[0]["message"]
    assert trading.close_request == (1008, "key revoked")
    narrowed = replies(research)
    assert narrowed[0]["status"] == "error" and "lost T.*" in narrowed[0]["message"]
    assert hub.registry.channels_of(research) == {parse_channel("Q.AAPL")}
    assert research.close_request is None
    assert replies(unnamed) == [] and unnamed.close_request is None
    assert hub.registry.channels_of(unnamed) == {parse_channel("T.MSFT")}
    # a later client with the removed key is refused; the kept one gets in under its new entitlements
    assert [s["status"] for s in replies(join(hub, key=TRADING)[0])] == ["auth_failed"]
    again, _ = join(hub, key=RESEARCH, subscribe="T.AAPL")
    assert "may not subscribe T.AAPL" in replies(again)[1]["message"]


async def test_broadcast_reaches_only_authenticated_clients():
    hub = make_hub()
    authenticated, _ = join(hub)
    waiting, _ = join(hub, key=None)
    replies(authenticated)
    hub.broadcast(protocol.status_frame("upstream_connected", "restored"))
    assert [s["status"] for s in replies(authenticated)] == ["upstream_connected"]
    assert replies(waiting) == []


@pytest.mark.parametrize("sent, outcome, counter", [
    ("not json", "error", "control_errors"),
    (message("auth", "wrong"), "auth_failed", "auth_failures"),
])
async def test_reactions_are_counted_by_outcome(sent, outcome, counter):
    hub = make_hub()
    session, _ = join(hub, key=None)
    reaction = session.state.receive(sent, 0.0)
    assert reaction.outcome == outcome
    hub.react_at_once(session, reaction)
    assert getattr(hub.stats, counter) == 1


async def test_rate_limited_control_messages_are_counted():
    hub = make_hub(control_messages_per_second=1)
    session, _ = join(hub)  # the burst is 2: the auth took one
    for _ in range(3):
        hub.react_at_once(session, session.state.receive(message("subscribe", "T.AAPL"), trio.current_time()))
    assert hub.stats.control_rate_limited == 2
    answers = [s["message"].split(":")[0] for s in replies(session)]
    assert answers == ["authenticated", "subscribed to", "rate limited", "rate limited"]


# --- the reader: auth deadline, pings, dead peers (MockClock) ------------------------------------


async def read_until_done(hub: Hub, session: ClientSession, seconds: float) -> float:
    """Run the session's reader for at most ``seconds``; returns when it ended (or the limit)."""
    with trio.move_on_after(seconds):
        await _read_loop(hub, session)
    return trio.current_time()


async def test_a_silent_client_is_pinged_after_ping_seconds_and_closed_1011_after_the_timeout(autojump_clock):
    hub = make_hub(client_ping_seconds=30, client_pong_timeout_seconds=20)
    connection = FakeConnection(pong_after=None)  # a vanished laptop: nothing ever comes back
    session, _ = join(hub, connection=connection)
    start = trio.current_time()
    ended = await read_until_done(hub, session, 3600)
    assert connection.pings == [pytest.approx(start + 30)]
    assert ended == pytest.approx(start + 50)
    assert session.close_request == (1011, "no answer to ping")
    assert hub.stats.dead_clients_closed == 1


async def test_a_client_that_answers_pings_stays_however_long_it_is_quiet(autojump_clock):
    hub = make_hub(client_ping_seconds=30, client_pong_timeout_seconds=20)
    connection = FakeConnection(pong_after=19.9)  # slow, but within the timeout
    session, _ = join(hub, connection=connection)
    start = trio.current_time()
    ended = await read_until_done(hub, session, 3600)
    assert ended == pytest.approx(start + 3600) and session.close_request is None
    # the next ping comes ping_seconds after the last pong, never while one is awaited
    gaps = [later - earlier for earlier, later in zip(connection.pings, connection.pings[1:])]
    assert len(connection.pings) == 72 and all(gap == pytest.approx(49.9) for gap in gaps)
    assert hub.stats.dead_clients_closed == 0


async def test_control_messages_and_partial_frames_put_the_ping_off(autojump_clock):
    hub = make_hub(client_ping_seconds=30, client_pong_timeout_seconds=20)
    connection = FakeConnection(pong_after=None)
    session, _ = join(hub, connection=connection)
    start = trio.current_time()

    async def client() -> None:
        await trio.sleep(25)
        connection.client_sends(message("subscribe", "T.AAPL"))
        await trio.sleep(25)
        connection._received_at = trio.current_time()  # bytes of a message not yet whole

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        ended = await read_until_done(hub, session, 3600)
    assert connection.pings == [pytest.approx(start + 80)]  # 30 s after the last bytes, not after the last message
    assert ended == pytest.approx(start + 100) and session.close_request[0] == 1011
    assert session.last_control_at == pytest.approx(start + 25)


async def test_no_auth_in_time_is_answered_auth_timeout_and_no_ping_is_sent(autojump_clock):
    hub = make_hub(auth_timeout_seconds=10, client_ping_seconds=1)
    connection = FakeConnection(pong_after=None)
    session, _ = join(hub, key=None, connection=connection)
    start = trio.current_time()
    assert await read_until_done(hub, session, 60) == pytest.approx(start + 10)
    assert [s["status"] for s in replies(session)] == ["auth_timeout"]
    assert session.close_request == (1008, "authentication timeout") and connection.pings == []


async def test_the_reader_applies_each_message_and_ends_when_the_client_leaves(autojump_clock):
    hub = make_hub()
    connection = FakeConnection()
    session, _ = join(hub, key=None, connection=connection)
    for sent in (message("auth", CLIENT_KEY), message("subscribe", "T.AAPL"), message("unsubscribe", "T.AAPL")):
        connection.client_sends(sent)
    connection.client_leaves()
    await read_until_done(hub, session, 60)
    assert [s["message"] for s in replies(session)] == [
        "authenticated", "subscribed to: T.AAPL", "unsubscribed to: T.AAPL"]
    assert session.close_request is None and hub.registry.channels_of(session) == frozenset()
