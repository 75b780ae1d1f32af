"""The downstream side of a tier: accept clients, one reader and one writer each, fan-out.

:class:`Hub` owns the sessions and the registry; the router hands it routed
frames and it queues them into each client's :class:`~proxy.outbox.Outbox`
without ever waiting, then, once per pass over the frames queued from upstream,
:meth:`Hub.flush` writes every touched client's queue to its socket at once
(one frame per run of events) wherever the kernel has room
(:mod:`proxy.wsserver`). :func:`serve_clients` runs the accept loop; each
:class:`ClientSession` lives in its own nursery with a reader (control
messages through :class:`~proxy.session.SessionState`) and a writer, which
sends what could not be written at once: a backlog, control replies,
statuses, the close. Closing that nursery ends both.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import ssl
from typing import Callable
from urllib.parse import urlsplit

import attrs
import trio

from . import protocol
from .beacon import Beacon
from .config import TierConfig
from .metrics import TierStats
from .outbox import Outbox, SlowClientPolicy
from .protocol import Channel
from .routing import RoutedFrame
from .session import (
    CHANNELS_PER_STEP,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    Phase,
    ProxyLimits,
    Reaction,
    SessionState,
)
from .subscriptions import SubscriptionRegistry
from .wsserver import ConnectionClosed, WsConnection, accept_connections, open_socket_listeners

log = logging.getLogger("proxy.server")
DROP_LOG_INTERVAL = 10.0
#: A control message longer than this (about 350 channels) is heavy: its work is done in steps
#: of CHANNELS_PER_STEP channels, one heavy step at a time across the tier (Hub.heavy_control).
HEAVY_MESSAGE_BYTES = 4096
_NO_TURN = contextlib.nullcontext()
SLOW_CONSUMER = protocol.status_frame(
    "slow_consumer", "Slow consumer: events queued faster than this client read them"
)


@attrs.define(eq=False)
class ClientSession:
    """One connected client: its id for logs, its outbox, its connection, and what wakes its writer."""

    id: int
    peer: str
    outbox: Outbox
    state: SessionState
    connection: WsConnection
    wakeup: trio.Event = attrs.field(factory=trio.Event)
    #: Set while the writer waits for the socket to take a backlog; cancelled when the client
    #: overflows, so that a client that stopped reading altogether is still closed.
    drain_scope: trio.CancelScope | None = None
    close_request: tuple[int, str] | None = None
    events_sent: int = 0
    drops_logged: int = 0  # dropped_events when a drop was last logged (drop_oldest policy)
    drops_logged_at: float = -math.inf

    def notify(self) -> None:
        self.wakeup.set()

    @property
    def label(self) -> str:
        """How logs name this client. A string, so that no log record (a buffering handler
        may keep records a long time) holds the session and its queued events alive."""
        return f"client {self.id} ({self.peer})"

    def __repr__(self) -> str:
        return self.label


@attrs.define(eq=False)
class Hub:
    """Sessions, the registry they subscribe through, and the fan-out that never blocks."""

    config: TierConfig
    registry: SubscriptionRegistry
    stats: TierStats = attrs.field(factory=TierStats)
    demand_changed: Beacon = attrs.field(factory=Beacon)
    sessions: set[ClientSession] = attrs.field(factory=set)
    connections_per_ip: collections.Counter = attrs.field(factory=collections.Counter)
    _ids: itertools.count = attrs.field(factory=lambda: itertools.count(1))
    #: Sessions given events since the last flush, in the order they were first touched.
    _touched: dict[ClientSession, None] = attrs.field(factory=dict)
    #: Held for each step of heavy control work (a big subscribe, unsubscribe or leave, grace
    #: expiry): readers and the router share one thread, and a step is about a millisecond,
    #: so with one step at a time the router waits at most one step, however many clients
    #: send 10,000-channel subscribes at once. Small messages do not take it.
    heavy_control: trio.Lock = attrs.field(factory=trio.Lock)

    def open_session(self, peer: str, connection: WsConnection) -> ClientSession:
        session = ClientSession(
            id=next(self._ids),
            peer=peer,
            connection=connection,
            outbox=Outbox(self.config.client_queue_events, self.config.slow_client_policy),
            state=SessionState(
                accepted_keys=self.config.api_keys,
                allow_any_key=self.config.allow_any_key,
                max_channels_per_message=self.config.max_channels_per_message,
                max_channels_per_client=self.config.max_channels_per_client,
                control_rate=self.config.control_messages_per_second,
                control_burst=2 * self.config.control_messages_per_second,
                proxy_limits=ProxyLimits(
                    max_channels=self.config.downstream_proxy_max_channels,
                    control_rate=self.config.downstream_proxy_control_messages_per_second,
                ),
            ),
        )
        connection.notify = session.notify
        self.sessions.add(session)
        self.connections_per_ip[_ip(peer)] += 1
        self.registry.add_subscriber(session)
        self.stats.clients_total += 1
        return session

    def refusal(self, peer: str) -> str | None:
        """Why a new connection from ``peer`` must be refused now, or None to accept it."""
        if len(self.sessions) >= self.config.max_clients:
            self.stats.refused_max_clients += 1
            return f"this proxy serves at most {self.config.max_clients} clients (MAX_CLIENTS)"
        if self.connections_per_ip[_ip(peer)] >= self.config.max_connections_per_ip:
            self.stats.refused_per_ip += 1
            return (f"at most {self.config.max_connections_per_ip} connections per address "
                    "(MAX_CONNECTIONS_PER_IP)")
        return None

    def close_session(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self._touched.pop(session, None)
        ip = _ip(session.peer)
        self.connections_per_ip[ip] -= 1
        if self.connections_per_ip[ip] <= 0:
            del self.connections_per_ip[ip]
        self._apply_demand(self.registry.remove_subscriber(session))
        if session.outbox.overflowed:
            self.stats.dropped_slow_consumer += session.outbox.dropped_events
        else:
            self.stats.dropped_drop_oldest += session.outbox.dropped_events

    def dropped(self, policy: SlowClientPolicy) -> int:
        """Events lost under one policy: closed sessions' counts plus those still connected."""
        disconnect = policy is SlowClientPolicy.DISCONNECT
        closed = self.stats.dropped_slow_consumer if disconnect else self.stats.dropped_drop_oldest
        return closed + sum(s.outbox.dropped_events for s in self.sessions if s.outbox.overflowed == disconnect)

    async def receive(self, session: ClientSession, message: str | bytes) -> Reaction:
        """What ``session`` makes of one message; a heavy message's steps take turns (heavy_control)."""
        steps = session.state.receive_in_steps(message, trio.current_time(), step=CHANNELS_PER_STEP)
        heavy = len(message) > HEAVY_MESSAGE_BYTES
        while True:
            try:
                if heavy:
                    async with self.heavy_control:
                        next(steps)
                else:
                    next(steps)
            except StopIteration as done:
                return done.value
            heavy = True  # more than one step: the rest is heavy whatever the message's size

    async def react(self, session: ClientSession, reaction: Reaction) -> None:
        """Apply what the session state decided: the answer is queued first, so that it comes
        before any event of the new channels; then the registry changes, in steps."""
        if reaction.outcome == "error":
            self.stats.control_errors += 1
        elif reaction.outcome == "auth_failed":
            self.stats.auth_failures += 1
        elif reaction.outcome in ("rate_limited", "flood"):
            self.stats.control_rate_limited += 1
        for reply in reaction.replies:
            session.outbox.put_frame(reply)  # its writer sends it, after anything queued before
        if reaction.close_code is not None:
            session.close_request = (reaction.close_code, reaction.close_reason)
        session.notify()
        held = session.state.channels
        for start in range(0, len(reaction.subscribe), CHANNELS_PER_STEP):
            part = reaction.subscribe[start:start + CHANNELS_PER_STEP]
            async with self._step(len(reaction.subscribe)):
                # Only what the session still holds: upstream may have refused some meanwhile.
                self._apply_demand(self.registry.subscribe(session, [c for c in part if c in held]))
        for start in range(0, len(reaction.unsubscribe), CHANNELS_PER_STEP):
            part = reaction.unsubscribe[start:start + CHANNELS_PER_STEP]
            async with self._step(len(reaction.unsubscribe)):
                self._apply_demand(self.registry.unsubscribe(session, part))

    async def release(self, session: ClientSession) -> None:
        """Drop a leaving session's channels in steps (a client holding 10,000 channels
        leaving must not hold the router); :meth:`close_session` does the rest."""
        held = list(self.registry.channels_of(session))
        for start in range(0, len(held), CHANNELS_PER_STEP):
            async with self._step(len(held)):
                self._apply_demand(self.registry.unsubscribe(session, held[start:start + CHANNELS_PER_STEP]))

    def _step(self, channels: int) -> trio.Lock | contextlib.nullcontext:
        """The turn one step of registry work takes: heavy_control when the work spans steps."""
        return self.heavy_control if channels > CHANNELS_PER_STEP else _NO_TURN

    def refuse(self, channels: tuple[Channel, ...], reason: str) -> int:
        """Upstream refused ``channels``: tell every client holding one, and drop it from its set.

        The tier acknowledges a subscribe at once, before upstream answers (waiting would add
        a round trip to every subscribe); so when upstream refuses, the clients that were told
        ``subscribed to`` are told otherwise, with upstream's reason. Returns how many were told.
        """
        losers, delta = self.registry.refuse(channels)
        self._apply_demand(delta)
        for session, lost in losers.items():
            session.state.drop(lost)
            session.outbox.put_frame(protocol.refusal_frame(lost, reason))
            session.notify()
            log.warning("%s: upstream refused %d of its channels (%s): %s", session.label, len(lost),
                        reason, protocol.format_channel_list(lost[:5]) + (" ..." if len(lost) > 5 else ""))
        return len(losers)

    def _apply_demand(self, delta: object) -> None:
        # Pulse even for an empty delta: an unsubscribe that only starts a grace
        # period changes the registry's next deadline, which the grace task must see.
        if delta:
            log.debug("upstream demand changed: %s", delta)
        self.demand_changed.pulse()

    def deliver(self, routed: RoutedFrame, received_at: float) -> None:
        """Queue a routed frame for every selected session; never waits on any of them.

        Nothing is written yet: :meth:`flush` does, once the router has queued
        every frame waiting, so a client behind by several frames gets them in one.
        """
        touched = self._touched
        if routed.whole is not None:
            for session in self.registry.everything_subscribers:
                if session.outbox.put_frame(routed.whole, routed.event_count, received_at):
                    touched[session] = None
                else:
                    self._overflowed(session)
        for session, (joined, count) in routed.batches.items():
            if session.outbox.put_events(joined, count, received_at):
                touched[session] = None
            else:
                self._overflowed(session)

    def flush(self) -> None:
        """Write every touched session's queue to its socket now, as far as the kernel takes it."""
        touched, self._touched = self._touched, {}
        now = trio.current_time()
        for session in touched:
            self.write_queued(session, now)
            if session.outbox.dropped_events != session.drops_logged:
                self._log_drops(session, now)

    def write_queued(self, session: ClientSession, now: float) -> None:
        """Frame what ``session`` has queued and write it, unless bytes before it still wait.

        Whatever the socket does not take waits in the connection's backlog, and
        the session's writer is woken to drain it; while it waits, new events
        stay in the outbox, where the slow-client policy bounds them.
        """
        outbox, connection = session.outbox, session.connection
        if connection.backlogged or outbox.overflowed:
            session.notify()
            return
        if not len(outbox):
            return
        events, received_at = outbox.queued_events, outbox.oldest_received_at
        frames = outbox.take_frames()
        stats = self.stats
        stats.bytes_out += connection.send_texts(frames)
        stats.frames_out += len(frames)
        stats.events_out += events
        session.events_sent += events
        if received_at is not None:
            stats.routing_latency.observe(now - received_at)

    def _log_drops(self, session: ClientSession, now: float) -> None:
        """drop_oldest: say so, at most once per DROP_LOG_INTERVAL per client."""
        if now - session.drops_logged_at < DROP_LOG_INTERVAL:
            return
        log.warning("%s is not keeping up: %d oldest events dropped so far (SLOW_CLIENT_POLICY=drop_oldest)",
                    session.label, session.outbox.dropped_events)
        session.drops_logged, session.drops_logged_at = session.outbox.dropped_events, now

    def broadcast(self, frame: str) -> None:
        """A status every client should see (upstream outage and recovery)."""
        for session in self.sessions:
            if session.state.phase is Phase.AUTHENTICATED:
                session.outbox.put_frame(frame)
                session.notify()

    def _overflowed(self, session: ClientSession) -> None:
        if session.close_request is None:
            session.close_request = (CLOSE_POLICY_VIOLATION, "slow consumer")
            self.stats.slow_consumer_disconnects += 1
            log.warning(
                "%s is a slow consumer: %d events dropped, disconnecting (SLOW_CLIENT_POLICY=disconnect)",
                session.label, session.outbox.dropped_events,
            )
            if session.drain_scope is not None:
                session.drain_scope.cancel()
            session.notify()


async def serve_clients(
    hub: Hub, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Accept clients on the tier's host and port; reports the bound port when listening."""
    config = hub.config
    allowed_paths = {"/", f"/{config.market}"}

    async def handle(connection: WsConnection, peer: str) -> None:
        # A peer that never completes the opening handshake is dropped as one that never authenticates is.
        with trio.move_on_after(config.auth_timeout_seconds) as handshake:
            try:
                request = await connection.read_request()
            except ConnectionClosed as closed:
                log.info("refused %s: %s", peer, closed.reason)
                await connection.aclose(timeout=config.shutdown_close_seconds)
                return
        if handshake.cancelled_caught:
            log.info("dropped %s: no WebSocket handshake within %ss", peer, config.auth_timeout_seconds)
            return
        path = urlsplit(request.target).path or "/"
        if path not in allowed_paths:
            log.info("refused %s: path %r is not served here", peer, path)
            connection.reject(404, f"this proxy serves the {config.market} market at / and /{config.market}\n".encode())
            with trio.move_on_after(config.shutdown_close_seconds):
                await connection.drain()
            return
        connection.accept()
        refusal = hub.refusal(peer)
        if refusal is not None:
            log.warning("refused %s: %s", peer, refusal)
            # As Polygon does: `connected` first, always, then the refusal.
            connection.send_texts([protocol.CONNECTED, protocol.status_frame("max_connections", refusal)])
            await connection.aclose(CLOSE_TRY_AGAIN_LATER, "connection limit", config.shutdown_close_seconds)
            return
        try:
            await _run_session(hub, connection, peer)
        except Exception:  # a bug in one session must not end the server for everyone
            log.exception("client session from %s failed; other clients are unaffected", peer)

    listeners = await open_socket_listeners(config.host, config.port)
    tls = _tls_context(config)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(functools.partial(
                accept_connections, listener, handle, max_message_bytes=config.max_message_bytes, tls_context=tls,
            ))
        task_status.started(listeners[0].getsockname()[1])


def _tls_context(config: TierConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def _ip(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


async def _run_session(hub: Hub, connection: WsConnection, peer: str) -> None:
    session = hub.open_session(peer, connection)
    log.info("%s connected", session.label)
    try:
        connection.send_texts([protocol.CONNECTED])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_loop, hub, session, nursery.cancel_scope.cancel)
            await _read_loop(hub, session)
            if session.close_request is None:
                nursery.cancel_scope.cancel()  # the client left: nothing more to write
    finally:
        if trio.current_effective_deadline() != -math.inf:  # not shutting down: leave in steps
            with trio.CancelScope(shield=True):  # bounded work, and the registry must not be left half done
                await hub.release(session)
        hub.close_session(session)
        code, reason = session.close_request or (1000, "")
        timeout = hub.config.shutdown_close_seconds
        if trio.current_effective_deadline() == -math.inf:
            code, reason = CLOSE_GOING_AWAY, "proxy shutting down"  # the tier is shutting down: say so
        elif session.outbox.overflowed:
            timeout = hub.config.slow_client_close_seconds  # it is slow by definition: give it time, not forever
        with trio.CancelScope(shield=True):
            await connection.aclose(code, reason, timeout)
        log.info("%s disconnected (close code %s), %d events sent, %d dropped",
                 session.label, connection.close_code, session.events_sent, session.outbox.dropped_events)


async def _read_loop(hub: Hub, session: ClientSession) -> None:
    deadline = trio.current_time() + hub.config.auth_timeout_seconds
    while session.close_request is None:
        waiting_for_auth = session.state.phase is Phase.AWAITING_AUTH
        with trio.move_on_at(deadline if waiting_for_auth else math.inf) as scope:
            try:
                message = await session.connection.get_message()
            except ConnectionClosed:
                return
        if scope.cancelled_caught:
            log.info("%s sent no auth within %ss", session.label, hub.config.auth_timeout_seconds)
            await hub.react(session, session.state.timed_out())
            return
        reaction = await hub.receive(session, message)
        if reaction.close_code is not None:
            log.info("%s: %s", session.label, reaction.close_reason)
        await hub.react(session, reaction)
        if reaction.subscribe or reaction.unsubscribe:
            # One change of channels per step: a burst of messages already read (a proxy link
            # sends hundreds of 500-channel subscribes) must not be handled in one go.
            await trio.lowlevel.checkpoint()


async def _write_loop(hub: Hub, session: ClientSession, stop: Callable[[], None]) -> None:
    """Send what the router could not write at once: backlogs, replies, statuses; then the close."""
    outbox, connection = session.outbox, session.connection
    try:
        while True:
            if not (len(outbox) or connection.backlogged or session.close_request or outbox.overflowed):
                await session.wakeup.wait()
            session.wakeup = trio.Event()
            await _drain_unless_overflowed(session)
            if outbox.overflowed:
                connection.send_texts([SLOW_CONSUMER])  # after what the client already has, then 1008
                return
            hub.write_queued(session, trio.current_time())
            await _drain_unless_overflowed(session)
            if session.close_request is not None and not len(outbox) and not outbox.overflowed:
                return  # everything queued is written; the session's end sends the close
    except ConnectionClosed:
        pass
    finally:
        stop()


async def _drain_unless_overflowed(session: ClientSession) -> None:
    """Wait for the socket to take the backlog, but stop waiting if the client overflows meanwhile:
    one that stopped reading altogether would otherwise hold its writer here forever."""
    if session.outbox.overflowed:
        return
    with trio.CancelScope() as session.drain_scope:
        await session.connection.drain()
    session.drain_scope = None
