"""The downstream side of a tier: accept clients, one reader and one sender each, fan-out.

:class:`Hub` owns the sessions and the registry; the router hands it routed
frames and it queues them into each client's :class:`~proxy.outbox.Outbox`
without ever waiting. :func:`serve_clients` runs the accept loop; each
:class:`ClientSession` lives in its own nursery with a reader (control
messages through :class:`~proxy.session.SessionState`) and a sender (drains
the outbox, one frame per run of events). Closing that nursery ends both.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import ssl
from typing import Callable
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from . import protocol
from .beacon import Beacon
from .config import TierConfig
from .metrics import TierStats
from .outbox import Outbox, SlowClientPolicy
from .routing import RoutedFrame
from .session import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    Phase,
    Reaction,
    SessionState,
)
from .subscriptions import SubscriptionRegistry

log = logging.getLogger("proxy.server")
DROP_LOG_INTERVAL = 10.0
SLOW_CONSUMER = protocol.status_frame(
    "slow_consumer", "Slow consumer: events queued faster than this client read them"
)


@attrs.define(eq=False)
class ClientSession:
    """One connected client: its id for logs, its outbox, and what wakes its sender."""

    id: int
    peer: str
    outbox: Outbox
    state: SessionState
    wakeup: trio.Event = attrs.field(factory=trio.Event)
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
    #: Called with seconds from upstream arrival to socket, once per batch a sender writes.
    observe_latency: Callable[[float], None] = lambda seconds: None
    demand_changed: Beacon = attrs.field(factory=Beacon)
    sessions: set[ClientSession] = attrs.field(factory=set)
    connections_per_ip: collections.Counter = attrs.field(factory=collections.Counter)
    _ids: itertools.count = attrs.field(factory=lambda: itertools.count(1))

    def open_session(self, peer: str) -> ClientSession:
        session = ClientSession(
            id=next(self._ids),
            peer=peer,
            outbox=Outbox(self.config.client_queue_events, self.config.slow_client_policy),
            state=SessionState(
                accepted_keys=self.config.api_keys,
                allow_any_key=self.config.allow_any_key,
                max_channels_per_message=self.config.max_channels_per_message,
                max_channels_per_client=self.config.max_channels_per_client,
                control_rate=self.config.control_messages_per_second,
                control_burst=2 * self.config.control_messages_per_second,
            ),
        )
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

    def react(self, session: ClientSession, reaction: Reaction) -> None:
        """Apply what the session state decided: demand changes first, then answers."""
        if reaction.outcome == "error":
            self.stats.control_errors += 1
        elif reaction.outcome == "auth_failed":
            self.stats.auth_failures += 1
        elif reaction.outcome in ("rate_limited", "flood"):
            self.stats.control_rate_limited += 1
        if reaction.subscribe:
            self._apply_demand(self.registry.subscribe(session, reaction.subscribe))
        if reaction.unsubscribe:
            self._apply_demand(self.registry.unsubscribe(session, reaction.unsubscribe))
        for reply in reaction.replies:
            session.outbox.put_frame(reply)
        if reaction.close_code is not None:
            session.close_request = (reaction.close_code, reaction.close_reason)
        session.notify()

    def _apply_demand(self, delta: object) -> None:
        # Pulse even for an empty delta: an unsubscribe that only starts a grace
        # period changes the registry's next deadline, which the grace task must see.
        if delta:
            log.debug("upstream demand changed: %s", delta)
        self.demand_changed.pulse()

    def deliver(self, routed: RoutedFrame, received_at: float) -> None:
        """Queue a routed frame for every selected session; never waits on any of them."""
        touched: list[ClientSession] = []
        if routed.whole is not None:
            for session in self.registry.everything_subscribers:
                if session.outbox.put_frame(routed.whole, routed.event_count, received_at):
                    touched.append(session)
                else:
                    self._overflowed(session)
        for session, (joined, count) in routed.batches.items():
            if session.outbox.put_events(joined, count, received_at):
                touched.append(session)
            else:
                self._overflowed(session)
        for session in touched:
            session.wakeup.set()
            if session.outbox.dropped_events != session.drops_logged:
                self._log_drops(session, received_at)

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
            session.notify()


async def serve_clients(
    hub: Hub, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Accept clients on the tier's host and port; reports the bound port when listening."""
    config = hub.config
    allowed_paths = {"/", f"/{config.market}"}

    async def handle(request: WebSocketRequest) -> None:
        peer = _peer(request.remote)
        path = urlsplit(request.path).path or "/"
        if path not in allowed_paths:
            log.info("refused %s: path %r is not served here", peer, path)
            body = f"this proxy serves the {config.market} market at / and /{config.market}\n"
            await request.reject(404, body=body.encode())
            return
        ws = await request.accept()
        refusal = hub.refusal(peer)
        if refusal is not None:
            log.warning("refused %s: %s", peer, refusal)
            with trio.move_on_after(2):
                # As Polygon does: `connected` first, always, then the refusal.
                await ws.send_message(protocol.CONNECTED)
                await ws.send_message(protocol.status_frame("max_connections", refusal))
                await ws.aclose(CLOSE_TRY_AGAIN_LATER, "connection limit")
            return
        try:
            await _run_session(hub, ws, peer)
        except Exception:  # a bug in one session must not end the server for everyone
            log.exception("client session from %s failed; other clients are unaffected", peer)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                serve_websocket, handle, config.host, config.port, _tls_context(config),
                max_message_size=config.max_message_bytes,
                # a peer that never completes the opening handshake is dropped as one that never
                # authenticates would be, not after trio-websocket's default minute
                connect_timeout=config.auth_timeout_seconds,
                disconnect_timeout=max(config.shutdown_close_seconds, 0.1),
            )
        )
        task_status.started(server.port)


def _tls_context(config: TierConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def _ip(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


def _peer(remote: object) -> str:
    address = getattr(remote, "address", None)
    port = getattr(remote, "port", None)
    return f"{address}:{port}" if address is not None else str(remote)


async def _run_session(hub: Hub, ws: WebSocketConnection, peer: str) -> None:
    session = hub.open_session(peer)
    log.info("%s connected", session.label)
    code: object = None
    try:
        await ws.send_message(protocol.CONNECTED)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_loop, hub, ws, session, nursery.cancel_scope.cancel)
            await _read_loop(hub, ws, session)
            if session.close_request is None:
                nursery.cancel_scope.cancel()
    except ConnectionClosed:
        pass
    finally:
        if trio.current_effective_deadline() == -math.inf:
            # The tier is shutting down: tell the client so (1001), briefly, then go on cancelling.
            with trio.CancelScope(shield=True), trio.move_on_after(hub.config.shutdown_close_seconds):
                await ws.aclose(CLOSE_GOING_AWAY, "proxy shutting down")
        hub.close_session(session)
        code = ws.closed.code if ws.closed else None
        log.info("%s disconnected (close code %s), %d events sent, %d dropped",
                 session.label, code, session.events_sent, session.outbox.dropped_events)


async def _read_loop(hub: Hub, ws: WebSocketConnection, session: ClientSession) -> None:
    deadline = trio.current_time() + hub.config.auth_timeout_seconds
    while session.close_request is None:
        waiting_for_auth = session.state.phase is Phase.AWAITING_AUTH
        with trio.move_on_at(deadline if waiting_for_auth else math.inf) as scope:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
        if scope.cancelled_caught:
            log.info("%s sent no auth within %ss", session.label, hub.config.auth_timeout_seconds)
            hub.react(session, session.state.timed_out())
            return
        reaction = session.state.receive(message, trio.current_time())
        if reaction.close_code is not None:
            log.info("%s: %s", session.label, reaction.close_reason)
        hub.react(session, reaction)


async def _send_loop(
    hub: Hub, ws: WebSocketConnection, session: ClientSession, stop: Callable[[], None]
) -> None:
    stats, outbox = hub.stats, session.outbox
    try:
        while True:
            if not len(outbox) and session.close_request is None and not outbox.overflowed:
                await session.wakeup.wait()
            session.wakeup = trio.Event()
            events, received_at = outbox.queued_events, outbox.oldest_received_at
            for frame in outbox.take_frames():
                if outbox.overflowed:
                    break  # overflowed while we were blocked sending: stop at once
                text = frame if isinstance(frame, str) else frame.decode()
                await ws.send_message(text)
                stats.frames_out += 1
                stats.bytes_out += len(text)
            else:
                session.events_sent += events
                stats.events_out += events
                if received_at is not None:
                    hub.observe_latency(trio.current_time() - received_at)
            if outbox.overflowed:
                await ws.send_message(SLOW_CONSUMER)
                await ws.aclose(CLOSE_POLICY_VIOLATION, "slow consumer")
                return
            if session.close_request is not None and not len(outbox):
                await ws.aclose(*session.close_request)  # only once everything queued was sent
                return
    except ConnectionClosed:
        pass
    finally:
        stop()
