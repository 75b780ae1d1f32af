"""The downstream side of a tier: accept clients, one reader and one writer each, fan-out.

:class:`Hub` owns the sessions and the registry; the router hands it routed
frames and it queues them into each client's :class:`~proxy.outbox.Outbox`
without ever waiting, then, once per pass over the frames queued from upstream,
:meth:`Hub.flush` writes every touched client's queue to its socket at once
(one frame per run of events) wherever the kernel has room
(:mod:`proxy.net.connection`); with ``CLIENT_FLUSH_MS``, a client written to
within the interval is written at its end instead, by :meth:`Hub.run_flusher`
(:mod:`proxy.core.pacing` decides when). :func:`serve_clients` runs the accept loop; each
:class:`ClientSession` lives in its own nursery with a reader (control
messages through :class:`~proxy.session.SessionState`) and a writer, which
sends what could not be written at once: a backlog, control replies,
statuses, the close. Closing that nursery ends both. A downstream proxy's link holding
``*`` gets a ``journal_seq`` mark after each write (:meth:`Hub.journal_mark`), by which it
resumes after an outage (docs/protocol.md, "Between the tiers"). The ``*`` holders in step
share one :class:`~proxy.core.outbox.SharedRun`: each frame for them is queued once, and each
write of the run is joined once and handed to every one of them; a holder that is behind, or
has anything else queued, goes on with its own outbox.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import time
import ssl
from typing import Callable, Mapping, Sequence
from urllib.parse import urlsplit

import attrs
import trio

from ..core import markets, protocol
from ..core.journal import format_ns
from .accepting import PendingConnections, open_socket_listeners
from .beacon import Beacon
from ..core.settings import TierConfig
from ..core.stats import TierStats
from ..core.entitlements import KeyBook
from ..core.outbox import Outbox, SharedRun, SlowClientPolicy
from ..core.pacing import FlushPacer
from ..core.protocol import Channel
from ..core.routing import RoutedFrame
from ..core.session import (
    CHANNELS_PER_STEP,
    Outcome,
    Phase,
    ProxyLimits,
    Reaction,
    SessionState,
)
from ..core.subscriptions import SubscriptionRegistry
from ..core.errors import CloseReason, WebSocketClosed
from ..core.replay import ReplayRequest, Stitch, journal_seq_frame
from ..core.routes import Route, route_of_path, unserved_message
from .connection import WsConnection
from .listener import accept_connections
from .replay import JournalSource

__all__ = ["DROP_LOG_INTERVAL", "SLOW_CONSUMER", "UNAUTHENTICATED", "UNNAMED_KEY", "ClientSession", "Hub", "serve_clients"]

log = logging.getLogger(__name__)
#: Sent to a client that answered no ping: the peer is gone (what websockets sends on a keepalive timeout).
#: How /clients and per-key metrics name a key from the *_API_KEYS lists, and a client not yet authenticated.
UNNAMED_KEY = "unnamed"
UNAUTHENTICATED = "(not authenticated)"
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
    #: The path the client connected at (its market), and when, in ms since the epoch.
    path: str = "/"
    connected_at_ms: int = 0
    #: The name of the key it authenticated with ("" before auth; "unnamed" for a key from
    #: the *_API_KEYS lists), for logs, metrics and /clients: never the key.
    key_name: str = ""
    #: When it last sent a control message (trio.current_time()), or None.
    last_control_at: float | None = None
    drops_logged: int = 0  # dropped_events when a drop was last logged (drop_oldest policy)
    drops_logged_at: float = -math.inf
    #: The replay being served (a subscribe with "from"), or None; and what was queued before it
    #: but not yet written (the subscribe's answer), which goes first.
    replay: Stitch | None = None
    replay_before: list[str | bytes] = attrs.field(factory=list)

    def notify(self) -> None:
        """Wake the client's writer: something was queued, or the session must close."""
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
    registry: SubscriptionRegistry[ClientSession]
    stats: TierStats = attrs.field(factory=TierStats)
    demand_changed: Beacon = attrs.field(factory=Beacon)
    sessions: set[ClientSession] = attrs.field(factory=set)
    connections_per_ip: collections.Counter = attrs.field(factory=collections.Counter)
    #: Connections not yet authenticated, oldest first: closed to make room when descriptors run out.
    pending: PendingConnections = attrs.field(factory=PendingConnections)
    _ids: itertools.count = attrs.field(factory=lambda: itertools.count(1))
    #: A status frame for a client that has just authenticated, or None: the tier says
    #: here whether its upstream is down, so that nobody subscribes into silence unwarned.
    upstream_notice: Callable[[], str | None] = lambda: None
    #: Named keys (API_KEYS_FILE); replaced on reload.
    key_book: KeyBook = attrs.field(factory=KeyBook)
    #: Events sent and dropped by clients that have left, per key name.
    closed_key_totals: dict[str, list[int]] = attrs.field(factory=dict)
    #: Sessions given events since the last flush, in the order they were first touched.
    _touched: dict[ClientSession, None] = attrs.field(factory=dict)
    #: Held for each step of heavy control work (a big subscribe, unsubscribe or leave, grace
    #: expiry): readers and the router share one thread, and a step is about a millisecond,
    #: so with one step at a time the router waits at most one step, however many clients
    #: send 10,000-channel subscribes at once. Small messages do not take it.
    heavy_control: trio.Lock = attrs.field(factory=trio.Lock)
    #: The tier's journal, which resuming clients' replays read; None: the tier keeps none.
    journal_source: JournalSource | None = None
    #: Sessions whose replay is being served: the router holds their live frames back (Stitch).
    _replaying: dict[ClientSession, Stitch] = attrs.field(factory=dict)
    #: When each client is written (CLIENT_FLUSH_MS): at once after a quiet spell, otherwise once at
    #: the end of the interval since its last write; :meth:`run_flusher` makes the scheduled writes.
    #: (The shared run is paced as one client: its members are written together.)
    pacer: FlushPacer[ClientSession | SharedRun[ClientSession]] = attrs.field(
        default=attrs.Factory(lambda self: FlushPacer(self.config.client_flush_ms / 1000), takes_self=True))
    #: The ``*`` frames of the holders in step (its members), queued once for all of them.
    star_run: SharedRun[ClientSession] = attrs.field(
        default=attrs.Factory(lambda self: SharedRun(self.config.client_queue_events), takes_self=True))
    #: Set to wake :meth:`run_flusher` when a write is scheduled before the time it sleeps until.
    _flusher_wakeup: trio.Event = attrs.field(factory=trio.Event)
    _flusher_until: float = math.inf
    #: Channels of capped types that a client's subscribe was granted and the registry does not
    #: hold yet: counted against the caps, so that subscribes applied at once cannot pass a cap together.
    _reserved: collections.Counter[Channel] = attrs.field(factory=collections.Counter)

    def screen_subscribe(self, channels: Sequence[Channel]) -> str | None:
        """Whether a subscribe's new ``channels`` keep this market's upstream within Polygon's rules
        (no ``TYPE.*`` it refuses, no cap passed); None lets them in and reserves their room
        until :meth:`react` applies them, else the sentence naming the limit."""
        market = markets.market(self.config.market)
        caps = self.config.market_caps(self.config.market)
        codes = {channel.ev_type for channel in channels}
        capped = codes & caps.keys()
        if not capped and all(market.wildcard_allowed(code) for code in codes):
            return None
        held: set[Channel] = set(channel for channel in self._reserved if channel.ev_type in capped)
        for code in capped:
            held.update(self.registry.wanted_of_type(code))
        refusal = markets.change_refusal(market, held, channels, caps=self.config.upstream_caps.get(self.config.market),
                                         connections=self.config.connections_for(self.config.market))
        if refusal is None:
            self._reserved.update(channel for channel in channels if channel.ev_type in capped)
        else:
            self.stats.cap_refusals += 1
            log.info("refused a subscribe on %s: %s", self.config.market, refusal)
        return refusal

    def _release_reserved(self, channels: Sequence[Channel]) -> None:
        """The registry holds these now (or never will): they no longer need reserved room."""
        reserved = self._reserved
        if not reserved:
            return
        for channel in channels:
            if channel in reserved:
                reserved[channel] -= 1
                if reserved[channel] <= 0:
                    del reserved[channel]

    def open_session(self, peer: str, connection: WsConnection, path: str = "/") -> ClientSession:
        """Register a client that completed the WebSocket handshake; it starts unauthenticated."""
        session = ClientSession(
            id=next(self._ids),
            peer=peer,
            path=path,
            connected_at_ms=int(time.time() * 1000),
            connection=connection,
            outbox=Outbox(self.config.client_queue_events, self.config.slow_client_policy),
            state=SessionState(
                accepted_keys=self.config.api_keys,
                allow_any_key=self.config.allow_any_key,
                max_channels_per_message=self.config.max_channels_per_message,
                max_channels_per_client=self.config.max_channels_per_client,
                control_rate=self.config.control_messages_per_second,
                control_burst=2 * self.config.control_messages_per_second,
                key_book=self.key_book,
                market=self.config.market,
                upstream_screen=self.screen_subscribe,
                proxy_limits=ProxyLimits(
                    max_channels=self.config.downstream_proxy_max_channels,
                    control_rate=self.config.downstream_proxy_control_messages_per_second,
                ),
                replay_max_seconds=0.0 if self.journal_source is None else self.journal_source.replay_max_seconds,
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
        """Forget a client that left: its channels are released and its totals kept per key."""
        totals = self.closed_key_totals.setdefault(session.key_name or UNAUTHENTICATED, [0, 0])
        totals[0] += session.events_sent
        totals[1] += session.outbox.dropped_events
        # The connection's notify is the session's: a reference cycle, which would keep both, and every
        # byte they hold, until the cycle collector happened to run.
        session.connection.notify = _ignore
        self.sessions.discard(session)
        self._touched.pop(session, None)
        self._replaying.pop(session, None)
        self.star_run.leave(session)
        self.pacer.forget(session)
        ip = _ip(session.peer)
        self.connections_per_ip[ip] -= 1
        if self.connections_per_ip[ip] <= 0:
            del self.connections_per_ip[ip]
        self._apply_demand(self.registry.remove_subscriber(session))
        if session.outbox.overflowed:
            self.stats.dropped_slow_consumer += session.outbox.dropped_events
        else:
            self.stats.dropped_drop_oldest += session.outbox.dropped_events

    def _over_key_limit(self, session: ClientSession) -> str | None:
        """Why ``session`` may not stay under its named key's ``max_connections``, or None."""
        key = session.state.key
        if key is None or key.max_connections is None:
            return None
        holding = sum(1 for other in self.sessions if other is not session and other.state.key is not None
                      and other.state.key.sha256 == key.sha256 and other.close_request is None)
        if holding < key.max_connections:
            return None
        return f"key {key.name!r} may hold at most {key.max_connections} connections (API_KEYS_FILE)"

    def reload_keys(self, book: KeyBook) -> None:
        """Use the key file's new contents: sessions of a removed key are closed, channels no longer
        entitled are unsubscribed, and everyone else carries on unnoticed."""
        self.key_book = book
        for session in list(self.sessions):
            reaction = session.state.revoke(book)
            if reaction is not None:
                log.info("%s: key file reloaded: %s", session.label,
                         reaction.close_reason or "channels no longer entitled unsubscribed")
                self.react_at_once(session, reaction)

    def key_totals(self) -> dict[str, tuple[int, int, int]]:
        """Per key name: (clients connected, events sent, events dropped), those who left included."""
        totals = {name: [0, sent, dropped] for name, (sent, dropped) in self.closed_key_totals.items()}
        for session in self.sessions:
            entry = totals.setdefault(session.key_name or UNAUTHENTICATED, [0, 0, 0])
            entry[0] += 1
            entry[1] += session.events_sent
            entry[2] += session.outbox.dropped_events
        return {name: (clients, sent, dropped) for name, (clients, sent, dropped) in totals.items()}

    def dropped(self, policy: SlowClientPolicy) -> int:
        """Events lost under one policy: closed sessions' counts plus those still connected."""
        disconnect = policy is SlowClientPolicy.DISCONNECT
        closed = self.stats.dropped_slow_consumer if disconnect else self.stats.dropped_drop_oldest
        return closed + sum(s.outbox.dropped_events for s in self.sessions if s.outbox.overflowed == disconnect)

    async def receive(self, session: ClientSession, message: str | bytes, now: float) -> Reaction:
        """What ``session`` makes of one message; a heavy message's steps take turns (heavy_control)."""
        steps = session.state.receive_in_steps(message, now, step=CHANNELS_PER_STEP, wall_ns=time.time_ns())
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
        reaction = self._answer(session, reaction)
        stitch = None if reaction.replay is None else self._begin_replay(session, reaction.replay)
        held = session.state.channels
        try:
            for start in range(0, len(reaction.subscribe), CHANNELS_PER_STEP):
                part = reaction.subscribe[start:start + CHANNELS_PER_STEP]
                async with self._step(len(reaction.subscribe)):
                    # Only what the session still holds: upstream may have refused some meanwhile.
                    self._apply_demand(self.registry.subscribe(session, [c for c in part if c in held]))
        finally:
            self._release_reserved(reaction.subscribe)
        for start in range(0, len(reaction.unsubscribe), CHANNELS_PER_STEP):
            part = reaction.unsubscribe[start:start + CHANNELS_PER_STEP]
            async with self._step(len(reaction.unsubscribe)):
                self._apply_demand(self.registry.unsubscribe(session, part))
        if stitch is not None and self.journal_source is not None:
            # Every frame journaled so far was routed with the registry as it was: the replay
            # serves them all, and live takes over with the next one.
            stitch.close_at(self.journal_source.journal.next_seq - 1, session.state.channels)
            session.notify()

    def _begin_replay(self, session: ClientSession, request: ReplayRequest) -> Stitch:
        """From now on the router holds back the session's live frames (the Stitch says which);
        its writer serves the replay once the subscribe is wholly applied."""
        assert self.journal_source is not None  # the session refuses "from" without a journal
        # Not from the shared run from here on (its answer's put released it already, if it was in it):
        # what the run held for it goes first, before the replay.
        self.star_run.release(session)
        # the answer goes before the replay; no journal_seq mark: the replay's own marks say how far it got
        self.write_queued(session, trio.current_time(), mark=False)
        if len(session.outbox):  # the socket is backed up: the writer sends these first
            events = session.outbox.queued_events
            session.replay_before = session.outbox.take_frames()
            self.stats.events_out += events
            session.events_sent += events
        stitch = Stitch(request, hold_from=self.journal_source.journal.next_seq)
        session.replay = self._replaying[session] = stitch
        session.state.replaying = True
        self.stats.replays += 1
        log.info("%s: replaying %d channels from %s", session.label, len(request.channels),
                 format_ns(request.from_ns))
        return stitch

    def end_replay(self, session: ClientSession) -> None:
        """The session's replay was served (or abandoned): live frames go to it again."""
        stitch = session.replay
        if stitch is None:
            return
        session.replay = None
        session.replay_before = []
        self._replaying.pop(session, None)
        session.state.replaying = False
        self.stats.replay_events += stitch.events
        self.stats.events_out += stitch.events
        session.events_sent += stitch.events
        session.notify()

    def react_at_once(self, session: ClientSession, reaction: Reaction) -> None:
        """:meth:`react` in one go, for callers that cannot wait (a reload of the key file)."""
        reaction = self._answer(session, reaction)
        if reaction.subscribe:
            self._apply_demand(self.registry.subscribe(session, reaction.subscribe))
            self._release_reserved(reaction.subscribe)
        if reaction.unsubscribe:
            self._apply_demand(self.registry.unsubscribe(session, reaction.unsubscribe))

    def _answer(self, session: ClientSession, reaction: Reaction) -> Reaction:
        """Count the outcome and queue the answers and any close; returns the reaction to apply."""
        if reaction.outcome is Outcome.AUTHENTICATED:
            reaction = self._authenticated(session, reaction)
        if reaction.outcome is Outcome.ERROR:
            self.stats.control_errors += 1
        elif reaction.outcome is Outcome.REPLAY_REFUSED:
            self.stats.control_errors += 1
            self.stats.replays_refused += 1
        elif reaction.outcome is Outcome.AUTH_FAILED:
            self.stats.auth_failures += 1
        elif reaction.outcome in (Outcome.RATE_LIMITED, Outcome.FLOOD):
            self.stats.control_rate_limited += 1
        for reply in reaction.replies:
            session.outbox.put_frame(reply)  # its writer sends it, after anything queued before
        if reaction.close_code is not None:
            session.close_request = (reaction.close_code, reaction.close_reason)
        session.notify()
        return reaction

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

    def _authenticated(self, session: ClientSession, reaction: Reaction) -> Reaction:
        """Name the session's key; refuse it over its key's connection limit, as Polygon refuses
        one connection too many; else tell it now if the upstream is down."""
        key = session.state.key
        session.key_name = UNNAMED_KEY if key is None else key.name
        over = self._over_key_limit(session)
        if over is not None:
            log.warning("refused %s: %s", session.label, over)
            self.stats.refused_per_key += 1
            session.state.phase = Phase.CLOSED
            return Reaction(replies=(protocol.status_frame("max_connections", over),),
                            close_code=CloseReason.TRY_AGAIN_LATER, close_reason="key connection limit",
                            outcome=Outcome.REFUSED)
        notice = self.upstream_notice()
        return reaction if notice is None else attrs.evolve(reaction, replies=(*reaction.replies, notice))

    def _apply_demand(self, delta: object) -> None:
        # Pulse even for an empty delta: an unsubscribe that only starts a grace
        # period changes the registry's next deadline, which the grace task must see.
        if delta:
            log.debug("upstream demand changed: %s", delta)
        run = self.star_run
        if run.members:
            holders = self.registry.everything_holders
            for session in [member for member in run.members if member not in holders]:
                run.release(session)  # it let `*` go: what the run held for it is still its own
        self.demand_changed.pulse()

    def deliver(self, routed: RoutedFrame[ClientSession], received_at: float, seq: int | None = None) -> None:
        """Queue a routed frame (journaled as ``seq``) for every selected session; never waits on any.

        Nothing is written yet: :meth:`flush` does, once the router has queued
        every frame waiting, so a client behind by several frames gets them in one.
        A session whose replay serves this frame does not get it live.
        """
        if self._replaying and any(not stitch.live(seq) for stitch in self._replaying.values()):
            self._deliver_sparing(routed, received_at, seq)
            return
        touched = self._touched
        whole = routed.whole
        if whole is not None:
            run = self.star_run
            members = run.members
            if members:
                run.add(whole, routed.event_count, received_at)  # once for all (or, over the capacity, none)
            holders = self.registry.everything_holders
            if len(holders) != len(members):  # some go alone: each its own put, as before the run
                for session in holders:
                    if session in members:
                        continue
                    if session.outbox.put_array(whole, routed.event_count, received_at):
                        touched[session] = None
                    else:
                        self._overflowed(session)
        for session, (joined, count) in routed.batches.items():
            if session.outbox.put_events(joined, count, received_at):
                touched[session] = None
            else:
                self._overflowed(session)

    def _deliver_sparing(self, routed: RoutedFrame[ClientSession], received_at: float, seq: int | None) -> None:
        """:meth:`deliver`, sparing the sessions whose replay serves this frame (kept apart so
        that the usual path pays nothing for replays)."""
        replaying, touched = self._replaying, self._touched
        targets: list[tuple[ClientSession, str | bytes, int, bool]] = []
        if routed.whole is not None:
            run = self.star_run
            if run.members:  # never replaying: a replay releases its session
                run.add(routed.whole, routed.event_count, received_at)
            targets += [(session, routed.whole, routed.event_count, True)
                        for session in self.registry.everything_holders if session not in run.members]
        targets += [(session, joined, count, False) for session, (joined, count) in routed.batches.items()]
        for session, payload, count, whole in targets:
            stitch = replaying.get(session)
            if stitch is not None and not stitch.live(seq):
                continue
            outbox = session.outbox
            put = outbox.put_array(payload, count, received_at) if whole else outbox.put_events(
                payload, count, received_at)  # type: ignore[arg-type]
            if put:
                touched[session] = None
            else:
                self._overflowed(session)

    def flush(self) -> None:
        """Write every touched session's queue to its socket now, as far as the kernel takes it;
        with CLIENT_FLUSH_MS, only those not written to within the interval, the others when
        it ends (:meth:`run_flusher`), along with whatever reaches them meanwhile."""
        touched, self._touched = self._touched, {}
        now = trio.current_time()
        pacer = self.pacer
        paced = pacer.interval > 0
        run = self.star_run
        for released in run.take_released():
            touched[released] = None
        for session in touched:
            if not paced or pacer.ready(session, now):
                self.write_queued(session, now)
            if session.outbox.dropped_events != session.drops_logged:
                self._log_drops(session, now)
        if len(run) and (not paced or pacer.ready(run, now)):
            self.write_run(now)
        if paced and len(pacer):
            self._write_due(now)
            due = pacer.next_due()
            if due is not None and due < self._flusher_until:
                self._flusher_wakeup.set()

    async def run_flusher(self) -> None:
        """Make the writes the pacer scheduled (CLIENT_FLUSH_MS), each when it is due; runs
        until cancelled. One wake-up writes every client due by then."""
        pacer = self.pacer
        while True:
            self._flusher_wakeup = trio.Event()
            due = pacer.next_due()
            self._flusher_until = math.inf if due is None else due
            with trio.move_on_at(self._flusher_until):
                await self._flusher_wakeup.wait()
            self._write_due(trio.current_time())

    def _write_due(self, now: float) -> None:
        # A function of its own: a loop variable in run_flusher's frame would keep the last
        # session written alive, closed or not, for as long as the flusher sleeps.
        for due in self.pacer.due(now):
            if isinstance(due, SharedRun):
                self.write_run(now)
            else:
                self.write_queued(due, now)

    def write_queued(self, session: ClientSession, now: float, *, mark: bool = True) -> None:
        """Frame what ``session`` has queued and write it, unless bytes before it still wait.

        Whatever the socket does not take waits in the connection's backlog, and
        the session's writer is woken to drain it; while it waits, new events
        stay in the outbox, where the slow-client policy bounds them. A downstream
        proxy's link holding ``*`` gets a ``journal_seq`` mark after what was written
        (:meth:`journal_mark`), unless ``mark`` is False.
        """
        outbox, connection = session.outbox, session.connection
        if connection.backlogged or outbox.overflowed:
            session.notify()
            return
        if session.replay is not None:
            return  # its writer is serving a replay; what is queued follows it
        if not len(outbox):
            if mark and outbox.shared is None and self.registry.holds_everything(session):
                self._join_run(session)
            return
        events, received_at = outbox.queued_events, outbox.oldest_received_at
        frames = outbox.take_frames()
        data_frames = len(frames)
        if session.state.downstream_proxy and mark:
            journal_mark = self.journal_mark(session)
            if journal_mark is not None:
                frames.append(journal_mark)
        self._send_written(session, frames, data_frames, events, received_at, now)
        if not connection.backlogged and mark and self.registry.holds_everything(session):
            self._join_run(session)

    def write_run(self, now: float) -> None:
        """Write the shared run to all its members: joined once, the same frames for each, as
        :meth:`write_queued` would have written each its own (a journal mark after them for a
        downstream proxy's link). A member whose socket is backed up is released first (its writer
        sends the run's frames once the socket drains), and one left with a backlog after its write
        is released after; then the ``*`` holders that caught up join."""
        run = self.star_run
        for released in run.take_released():  # written at the run's time, as the run would have been
            if self.pacer.ready(released, now):
                self.write_queued(released, now)
        members = run.members
        for session in [member for member in members if member.connection.backlogged]:
            run.release(session)
            session.notify()
            self._touched[session] = None
        if len(run):
            events, received_at = run.events, run.oldest_received_at
            frames = run.take_frames()
            self.pacer.written(run, now)
            marked: list[str | bytes] | None = None
            behind: list[ClientSession] = []
            for session in members:
                texts = frames
                if session.state.downstream_proxy:
                    if marked is None:
                        journal_mark = self.journal_mark(session)
                        marked = frames if journal_mark is None else [*frames, journal_mark]
                    texts = marked
                self._send_written(session, texts, len(frames), events, received_at, now)
                if session.connection.backlogged:
                    behind.append(session)
            for session in behind:
                run.release(session)  # nothing of the run left to copy: it goes on alone until drained
        holders = self.registry.everything_holders
        if len(holders) != len(members):
            for session in holders:
                if session not in members:
                    self._join_run(session)

    def _send_written(self, session: ClientSession, texts: list[str | bytes], data_frames: int, events: int,
                      received_at: float | None, now: float) -> None:
        """Send ``texts`` (``data_frames`` of them data, then a journal mark, if any) to ``session``
        and count the write: what the socket did not take waits in its backlog, and the events
        stay counted as unsent until its writer drains it."""
        stats, connection = self.stats, session.connection
        stats.frames_out += data_frames
        stats.bytes_out += connection.send_texts(texts)
        session.outbox.unsent_events = events if connection.backlogged else 0  # the writer clears it once drained
        stats.events_out += events
        session.events_sent += events
        self.pacer.written(session, now)
        if received_at is not None:
            stats.routing_latency.observe(now - received_at)

    def _join_run(self, session: ClientSession) -> None:
        """Make a ``*`` holder that is in step a member of the shared run, when the run allows it
        (empty) and its writes stay paced (CLIENT_FLUSH_MS): the run's last write must be no
        earlier than the holder's, so that it is never written twice within an interval (nor
        waits longer than one), or the run has no members and takes the holder's time."""
        run = self.star_run
        if (len(run) or session.replay is not None or session.close_request is not None
                or session.connection.backlogged or not run.can_join(session.outbox)):
            return
        pacer = self.pacer
        last = pacer.last_written(session)
        if run.members and pacer.interval > 0:
            run_last = pacer.last_written(run)
            if last is not None and (run_last is None or run_last < last):
                return
        elif last is None:
            pacer.forget(run)
        else:
            pacer.written(run, last)
        run.join(session, session.outbox)

    def journal_mark(self, session: ClientSession, seq: int | None = None) -> str | None:
        """The ``journal_seq`` mark for a downstream proxy's link holding ``*`` (None for anyone
        else, or without a journal): ``seq`` (the journal's last, by default) and the journal's id.

        Written right after a write, the journal's last seq is exact: the router journals and
        queues each frame (and each outage status) in one step, so every record journaled so
        far that was meant for the link was in its queue, and the queue was just written whole.
        A link whose queue overflows under SLOW_CLIENT_POLICY=disconnect gets no mark for what was
        dropped (it is closed as a slow consumer, and resumes from its last mark); under
        drop_oldest the dropped events are lost to it, as they are to any client."""
        source = self.journal_source
        if source is None or not self.registry.holds_everything(session):
            return None
        return journal_seq_frame(source.journal.next_seq - 1 if seq is None else seq, source.journal_id)

    def _log_drops(self, session: ClientSession, now: float) -> None:
        """drop_oldest: say so, at most once per DROP_LOG_INTERVAL per client."""
        if now - session.drops_logged_at < DROP_LOG_INTERVAL:
            return
        log.warning("%s is not keeping up: %d oldest events dropped so far (SLOW_CLIENT_POLICY=drop_oldest)",
                    session.label, session.outbox.dropped_events)
        session.drops_logged, session.drops_logged_at = session.outbox.dropped_events, now

    def broadcast(self, frame: str, seq: int | None = None) -> None:
        """A status every client should see (upstream outage and recovery), journaled as ``seq``
        (a client whose replay serves that record gets it there)."""
        replaying = self._replaying
        for session in self.sessions:
            if replaying and session in replaying and not replaying[session].live(seq):
                continue
            if session.state.phase is Phase.AUTHENTICATED:
                session.outbox.put_frame(frame)
                session.notify()

    def _overflowed(self, session: ClientSession) -> None:
        if session.close_request is None:
            session.close_request = (CloseReason.POLICY_VIOLATION, "slow consumer")
            self.stats.slow_consumer_disconnects += 1
            log.warning(
                "%s is a slow consumer: %d events dropped, disconnecting (SLOW_CLIENT_POLICY=disconnect)",
                session.label, session.outbox.dropped_events,
            )
            if session.drain_scope is not None:
                session.drain_scope.cancel()
            session.notify()


async def serve_clients(
    hubs: Mapping[Route, Hub], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Accept clients on the tier's host and port, each market's at its path (``/stocks``,
    ``/delayed/stocks``; ``/`` is the first's), handed to that market's hub; reports the bound
    port when listening. A path no market is served at is answered as Polygon answers a key
    without the market: ``connected``, then ``auth_failed`` naming the paths served, then a
    close (1008), so a client written for Polygon stops with that message instead of retrying."""
    routes = tuple(hubs)
    first = hubs[routes[0]]
    config = first.config
    served = ", ".join(f"/{route.path}" for route in routes)
    names = ", ".join(route.label for route in routes)
    plain_http_body = (f"this is the {config.tier} tier's WebSocket port for the {names} market"
                       f"{'s' if len(routes) > 1 else ''}: connect a WebSocket client to {served}; "
                       "health and metrics are on its metrics port\n").encode()

    async def handle(connection: WsConnection, peer: str) -> None:
        connection.plain_http_body = plain_http_body
        # A peer that never completes the opening handshake is dropped as one that never authenticates is.
        with trio.move_on_after(config.auth_timeout_seconds) as handshake:
            try:
                request = await connection.read_request()
            except WebSocketClosed as closed:
                log.info("refused %s: %s", peer, closed.reason)
                await connection.aclose(timeout=config.shutdown_close_seconds)
                return
        if handshake.cancelled_caught:
            log.info("dropped %s: no WebSocket handshake within %ss", peer, config.auth_timeout_seconds)
            return
        path = urlsplit(request.target).path or "/"
        route = route_of_path(path, routes)
        if route is None:
            await _refuse_unserved(connection, peer, path, routes, config)
            return
        hub = hubs[route]
        connection.accept()
        refusal = hub.refusal(peer)
        if refusal is not None:
            log.warning("refused %s: %s", peer, refusal)
            # As Polygon does: `connected` first, always, then the refusal.
            connection.send_texts([protocol.CONNECTED, protocol.status_frame("max_connections", refusal)])
            await connection.aclose(CloseReason.TRY_AGAIN_LATER, "connection limit", config.shutdown_close_seconds)
            return
        try:
            await _run_session(hub, connection, peer, path)
        except Exception:  # a bug in one session must not end the server for everyone
            log.exception("client session from %s failed; other clients are unaffected", peer)

    listeners = await open_socket_listeners(config.host, config.port, reuse_port=config.reuse_port)
    tls = _tls_context(config)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(functools.partial(
                accept_connections, listener, handle, max_message_bytes=config.max_message_bytes, tls_context=tls,
                pending=first.pending,
            ))
        task_status.started(listeners[0].getsockname()[1])


async def _refuse_unserved(connection: WsConnection, peer: str, path: str, routes: Sequence[Route],
                           config: TierConfig) -> None:
    """A market this tier does not serve: the refusal Polygon gives a key without the market."""
    message = unserved_message(path, routes)
    log.info("refused %s: %s", peer, message)
    connection.accept()
    connection.send_texts([protocol.CONNECTED])
    with trio.move_on_after(config.auth_timeout_seconds):
        try:
            await connection.get_message()  # its auth, most likely: answered as a refused one
        except WebSocketClosed:
            return
    connection.send_texts([protocol.status_frame("auth_failed", message)])
    await connection.aclose(CloseReason.POLICY_VIOLATION, "market not served", config.shutdown_close_seconds)


def _tls_context(config: TierConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def _ignore() -> None:
    pass


def _tier_is_stopping() -> bool:
    """True when the current task is cancelled from outside: the tier is shutting down (a
    session's own end never cancels the scope its close runs in)."""
    return trio.current_effective_deadline() == -math.inf


def _ip(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


async def _run_session(hub: Hub, connection: WsConnection, peer: str, path: str) -> None:
    session = hub.open_session(peer, connection, path)
    log.info("%s connected", session.label)
    try:
        connection.send_texts([protocol.CONNECTED])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_loop, hub, session, nursery.cancel_scope.cancel)
            await _read_loop(hub, session)
            if session.close_request is None or session.close_request[0] == CloseReason.INTERNAL_ERROR:
                nursery.cancel_scope.cancel()  # the client left, or is gone: nothing more to write
    finally:
        if trio.current_effective_deadline() != -math.inf:  # not shutting down: leave in steps
            with trio.CancelScope(shield=True):  # bounded work, and the registry must not be left half done
                await hub.release(session)
        hub.close_session(session)
        code, reason = session.close_request or (1000, "")
        timeout = hub.config.shutdown_close_seconds
        if hub.pending.was_shed(connection):  # its descriptor is needed now: no close handshake to wait for
            code, reason, timeout = CloseReason.TRY_AGAIN_LATER, "server overloaded: out of connections", 0
        elif _tier_is_stopping():
            code, reason = CloseReason.GOING_AWAY, "proxy shutting down"  # the tier is shutting down: say so
        elif session.outbox.overflowed:
            timeout = hub.config.slow_client_close_seconds  # it is slow by definition: give it time, not forever
        with trio.CancelScope(shield=True):
            await connection.aclose(code, reason, timeout)
        log.info("%s disconnected (close code %s), %d events sent, %d dropped",
                 session.label, connection.close_code, session.events_sent, session.outbox.dropped_events)


async def _read_loop(hub: Hub, session: ClientSession) -> None:
    """Read control messages until the client leaves or must go.

    Besides the auth deadline, it watches for a dead peer: a client that has sent
    nothing for ``client_ping_seconds`` is pinged, and one that answers nothing within
    ``client_pong_timeout_seconds`` more (a laptop that vanished, a half-open TCP
    connection) is closed with 1011, its channels released like any leaving client's.
    Every WebSocket library answers pings, so live clients never notice.
    """
    config, connection = hub.config, session.connection
    auth_deadline = trio.current_time() + config.auth_timeout_seconds
    pinged_at: float | None = None
    while session.close_request is None:
        waiting_for_auth = session.state.phase is Phase.AWAITING_AUTH
        if pinged_at is not None and connection.last_received_at > pinged_at:
            pinged_at = None  # it answered (a pong, or anything else)
        if waiting_for_auth:
            deadline = auth_deadline
        elif pinged_at is None:
            deadline = connection.last_received_at + config.client_ping_seconds
        else:
            deadline = pinged_at + config.client_pong_timeout_seconds
        with trio.move_on_at(deadline) as scope:
            try:
                message = await connection.get_message()
            except WebSocketClosed:
                return
        if scope.cancelled_caught:
            if waiting_for_auth:
                log.info("%s sent no auth within %ss", session.label, config.auth_timeout_seconds)
                await hub.react(session, session.state.timed_out())
                return
            if pinged_at is None:
                if connection.last_received_at + config.client_ping_seconds > trio.current_time():
                    continue  # bytes came meanwhile (part of a message): not silent
                pinged_at = trio.current_time()
                connection.ping(b"proxy keepalive")
                continue
            if connection.last_received_at > pinged_at:
                continue  # answered just now
            log.info("%s answered no ping within %ss: closing it as gone (1011)",
                     session.label, config.client_pong_timeout_seconds)
            hub.stats.dead_clients_closed += 1
            session.close_request = (CloseReason.INTERNAL_ERROR, "no answer to ping")
            return
        session.last_control_at = trio.current_time()
        reaction = await hub.receive(session, message, session.last_control_at)
        if reaction.close_code is not None:
            log.info("%s: %s", session.label, reaction.close_reason)
        await hub.react(session, reaction)
        if waiting_for_auth and session.state.phase is Phase.AUTHENTICATED:
            hub.pending.discard(session.connection)  # never shed for descriptors from now on
        if reaction.subscribe or reaction.unsubscribe:
            # One change of channels per step: a burst of messages already read (a proxy link
            # sends hundreds of 500-channel subscribes) must not be handled in one go.
            await trio.lowlevel.checkpoint()


async def _write_loop(hub: Hub, session: ClientSession, stop: Callable[[], None]) -> None:
    """Send what the router could not write at once: backlogs, replies, statuses, a replay; then
    the close."""
    outbox, connection = session.outbox, session.connection
    try:
        while True:
            replay = session.replay
            if replay is not None:
                if session.close_request is not None or outbox.overflowed:
                    hub.end_replay(session)  # abandoned: the session is closing
                elif replay.ready:
                    await _serve_replay(hub, session, replay)
                    continue
                else:
                    await session.wakeup.wait()  # the subscribe is still being applied
                    session.wakeup = trio.Event()
                    continue
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
    except WebSocketClosed:
        pass
    finally:
        stop()


async def _serve_replay(hub: Hub, session: ClientSession, stitch: Stitch) -> None:
    """Write the session's replay at its socket's pace (what was queued before it first), then
    hand it back to live delivery; the events that came live meanwhile wait in its outbox."""
    connection, stats = session.connection, hub.stats

    resume = stitch.request.from_seq is not None  # a downstream proxy's: marked as it goes

    async def send(frames: Sequence[str | bytes]) -> bool:
        if frames:
            stats.frames_out += len(frames)
            cursor = stitch.cursor
            if resume and cursor is not None:
                # every record before the cursor is in these frames or before them: a link that
                # drops during the replay resumes after what it got
                journal_mark = hub.journal_mark(session, cursor - 1)
                if journal_mark is not None:
                    frames = [*frames, journal_mark]
            stats.bytes_out += connection.send_texts(frames)
        await _drain_unless_overflowed(session)
        return session.close_request is None and not session.outbox.overflowed and connection.open

    assert hub.journal_source is not None
    try:
        before, session.replay_before = session.replay_before, []
        if await send(before):
            await hub.journal_source.replay(stitch, send)
    finally:
        hub.end_replay(session)


async def _drain_unless_overflowed(session: ClientSession) -> None:
    """Wait for the socket to take the backlog, but stop waiting if the client overflows meanwhile:
    one that stopped reading altogether would otherwise hold its writer here forever."""
    if session.outbox.overflowed:
        return
    with trio.CancelScope() as session.drain_scope:
        await session.connection.drain()
        session.outbox.unsent_events = 0  # the kernel took every byte written
    session.drain_scope = None
