"""A Polygon-compatible server with synthetic data and fault injection (``trio-run proxy.simulator``).

It speaks the protocol as Polygon does (``connected`` first, auth against
``SIMULATOR_API_KEYS``, ``auth_timeout``, ``max_connections`` per key and market,
one status per channel, a bare ``*`` refused unless ``SIMULATOR_ALLOW_STAR``) and
sends each connection only the events its channels select, in frames cut and
paced as ``SIMULATOR_FRAME_EVENTS`` says (:mod:`proxy.sim.framing`). Every
market of :mod:`proxy.core.markets` is served at its path on the one port
(``SIMULATOR_MARKETS``; ``/`` is stocks), each with its own feed
(:mod:`proxy.sim.feeds`), connection limit and channel rules (options quotes:
no ``Q.*``, 1,000 contracts a connection); a market outside
``SIMULATOR_ENTITLED`` answers ``auth_failed`` as Polygon does for a plan
without it. A market other than stocks generates only while someone is
connected to it, so that an unused market costs nothing. The
WebSocket server is the tiers' own (:mod:`proxy.net.listener`,
:class:`~proxy.net.connection.WsConnection`), whose writes go to the socket at
once: so faults can be real (an abrupt close sends no close frame, a stall
answers not even pings) and a write can tell whether the kernel took it at once,
which is what the adaptive framing batches on. :class:`Faults` switches each
fault by configuration or from a test at run time; :class:`FaultyConnection`
applies them to one connection.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import socket
import time
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import attrs
import msgspec
import trio

from ..core.errors import ClientMessageError, WebSocketClosed
from ..core import protocol
from ..core.markets import MARKET_TABLE, screen
from ..core.routes import DELAYED_PREFIX, Route
from ..app.config import bind_error, load_simulator_config, setup_logging
from ..core.keys import redact
from ..core.settings import FRAME_ADAPTIVE, SimulatorConfig
from ..net.accepting import PendingConnections, open_socket_listeners
from ..net.connection import WsConnection
from ..net.listener import accept_connections
from ..net.transport import SocketTransport
from .framing import Pacer, Unit, events_per_frame, take_frame
from .feeds import FeedModel, feed_model
from .market import Event, MarketModel, frame_of, prebuild, stamp, synthetic_symbols
from ..core.protocol import Auth, Channel, Subscribe

__all__ = [
    "CONNECTION_QUEUE_EVENTS",
    "MAX_MESSAGE_BYTES",
    "MALFORMED_FRAME",
    "CLOSE_SECONDS",
    "NOT_ENTITLED",
    "Faults",
    "FaultyConnection",
    "SimConnection",
    "Simulator",
    "run_simulator",
    "main",
]

log = logging.getLogger(__name__)
#: Events queued for one connection beyond which it is dropped as a slow consumer: counted in
#: events, not frames, so that the bound means the same at every framing (10 s at 25,000/s).
CONNECTION_QUEUE_EVENTS = 250_000
#: The largest message a client may send (subscribe lists included); a longer one is closed 1009.
MAX_MESSAGE_BYTES = 262_144
#: A connection's writer checks in with the scheduler at least this often while frames go out
#: at once, so that a catch-up burst does not hold up the other connections.
_FRAMES_BETWEEN_CHECKPOINTS = 64
MALFORMED_FRAME = '[{"ev":"T","sym":"AAPL","p":'
#: How long a close handshake of ours waits for the client's answer.
CLOSE_SECONDS = 1.0
#: Polygon's answer to a key whose plan does not include the market connected to.
NOT_ENTITLED = protocol.status_frame("auth_failed", "Your plan doesn't include websocket access.")

T = TypeVar("T")


@attrs.define
class Faults:
    """Fault switches; tests flip them at run time, ``SIMULATOR_*`` variables set them at start."""

    drop_after_seconds: float | None = None
    drop_after_frames: int | None = None
    abrupt: bool = False  # drops close the TCP stream without a WebSocket close frame
    malformed_next: int = 0  # this many next data frames are sent broken
    stall_until: float = 0.0  # trio time until which connections neither read nor send
    refuse_auth: int = 0  # this many next auth attempts get auth_failed
    force_max_connections: bool = False
    #: The scopes of the reads and drains under way: a stall cancels them, so it starts at once.
    _interruptible: set[trio.CancelScope] = attrs.field(factory=set, init=False, repr=False)
    #: Channels (texts) a subscribe is refused, with an `error` status per channel (tests set it).
    refused_channels: frozenset[str] = frozenset()
    #: A connection over SIMULATOR_MAX_CONNECTIONS evicts the key's oldest one (``max_connections``,
    #: then close 1008) instead of being refused, as Polygon has been seen to do (tests set it).
    evict_oldest: bool = False

    def stall(self, seconds: float) -> None:
        """Stop sending and reading for ``seconds`` from now (interrupting what waits)."""
        self.stall_until = trio.current_time() + seconds
        for scope in self._interruptible:
            scope.cancel()

    def stalled(self) -> bool:
        """Whether a stall is going on."""
        return self.stall_until > trio.current_time()

    async def wait_out_stall(self) -> None:
        """Return when no stall is going on."""
        if self.stalled():
            await trio.sleep_until(self.stall_until)

    async def unless_stalled(self, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``, run only while no stall is on: one that starts cancels it, and it runs
        again once the stall is over (so the operation must be safe to cancel and repeat)."""
        while True:
            await self.wait_out_stall()
            with trio.CancelScope() as scope:
                self._interruptible.add(scope)
                try:
                    return await operation()
                finally:
                    self._interruptible.discard(scope)


class FaultyConnection:
    """The simulator's faults around one :class:`~proxy.net.connection.WsConnection`, the tiers' server.

    The WebSocket is the tiers' (handshake, reassembly, pings, close
    handshake); this adds only what the faults need. A stall stops reading
    and writing: :meth:`receive` and :meth:`drain` neither start nor go on
    while one is on (WsConnection answers pings only inside ``get_message``,
    so a stalled connection answers none), and the writer waits it out before
    each frame. :meth:`abort` closes the TCP stream without a close frame.
    """

    def __init__(self, connection: WsConnection, faults: Faults) -> None:
        self.connection = connection
        self.faults = faults
        self._drain_lock = trio.Lock()  # the reader (its replies) and the writer may both drain

    async def receive(self) -> str | bytes:
        """The next whole message; WebSocketClosed at the end."""
        return await self.faults.unless_stalled(self.connection.get_message)

    async def drain(self) -> None:
        """Wait until the kernel took everything written so far (a stall holds it back)."""
        if self.connection.backlogged:
            async with self._drain_lock:
                await self.faults.unless_stalled(self.connection.drain)

    async def send_text(self, text: str) -> None:
        """One message (a status, a reply), after any stall; WebSocketClosed if the connection is gone."""
        await self.faults.wait_out_stall()
        if not self.connection.open:
            raise WebSocketClosed(self.connection.close_code, "connection closed")
        self.connection.send_texts([text])
        await self.drain()

    async def close(self, code: int, reason: str, timeout: float = 1.0) -> None:
        """The close handshake (after a stall, within ``timeout`` in all), then the TCP close."""
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline):
            await self.faults.wait_out_stall()
        await self.connection.aclose(code, reason, max(0.0, deadline - trio.current_time()))

    async def abort(self) -> None:
        """Close the TCP stream without a close frame, as a crashed server would."""
        await self.connection.transport.aclose()


@attrs.define(eq=False)
class SimConnection:
    """One client of the simulator: its key, its subscriptions (indexed for the per-event
    filter) and the frames published to it that its writer has not sent yet."""

    id: int
    api_key: str = ""
    #: The market connected to (its path), which its events come from and its limits apply to.
    market: str = "stocks"
    #: Connected at ``/delayed/<market>``: the delayed feed's connection (counted in the same limit).
    delayed: bool = False
    channels: set[Channel] = attrs.field(factory=set)
    # Indexes of `channels` for the per-event filter: type wildcards, exact channel texts, `*`.
    wild_types: set[str] = attrs.field(factory=set)
    exact: set[str] = attrs.field(factory=set)
    star: bool = False
    #: The held channels of each type its market caps (options: ``Q``), so that a subscribe is
    #: checked against the cap without a look at the rest (set up by the server at auth).
    capped: dict[str, set[Channel]] = attrs.field(factory=dict)
    #: Frames published to this connection and not yet written, in order (see framing.take_frame).
    pending: collections.deque[Unit] = attrs.field(factory=collections.deque)
    pending_events: int = 0
    #: Set when something is queued; the writer replaces it before it waits again.
    wake: trio.Event = attrs.field(factory=trio.Event)
    frames_sent: int = 0
    #: Whether the writer waits for the kernel to take a frame (the socket is backed up): what
    #: is published meanwhile piles up in ``pending``, and the adaptive framing joins it.
    backed_up: bool = False
    opened_at: float = 0.0
    drop: trio.Event = attrs.field(factory=trio.Event)
    dropped: bool = False
    evicted: bool = False
    #: Counts changes to ``channels``: what depends on them (the replay's selectors) rebuilds when it moves.
    revision: int = 0

    def add(self, channel: Channel) -> None:
        """Hold ``channel``, and index it (one channel at a time: a tier may hold 100,000)."""
        self.revision += 1
        self.channels.add(channel)
        if channel.is_everything:
            self.star = True
        elif channel.is_type_wildcard:
            self.wild_types.add(channel.ev_type)
        else:
            self.exact.add(channel.text)
            if self.capped:
                bucket = self.capped.get(channel.ev_type)
                if bucket is not None:
                    bucket.add(channel)

    def discard(self, channel: Channel) -> None:
        """Unsubscribe ``channel`` (its index entries too)."""
        self.revision += 1
        self.channels.discard(channel)
        if channel.is_everything:
            self.star = False
        elif channel.is_type_wildcard:
            self.wild_types.discard(channel.ev_type)
        else:
            self.exact.discard(channel.text)
            if self.capped:
                bucket = self.capped.get(channel.ev_type)
                if bucket is not None:
                    bucket.discard(channel)

    def selects(self, event: Event) -> bool:
        """Whether this connection subscribed to ``event``."""
        return self.star or event.ev in self.wild_types or event.channel in self.exact

    def enqueue(self, events: int, payload: bytes) -> None:
        """Queue one frame for the writer; a connection that lets too much pile up is dropped."""
        self.pending.append((events, payload))
        self.pending_events += events
        self.wake.set()
        if self.pending_events > CONNECTION_QUEUE_EVENTS and not self.drop.is_set():
            log.warning("connection %d is a slow consumer (%d events queued); disconnecting it",
                        self.id, self.pending_events)
            self.drop.set()


@attrs.define(eq=False)
class Simulator:
    """A running simulator: its port, connections and fault switches, for tests."""

    config: SimulatorConfig
    model: MarketModel
    faults: Faults
    port: int = 0
    #: Each market served, with its feed (stocks: :attr:`model`).
    feeds: dict[str, FeedModel] = attrs.field(factory=dict)
    #: Per market, caps replacing Polygon's (``{"options": {"Q": 5}}``; tests set them).
    caps: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: Per market, set when a connection arrives there (an idle market's generator waits on it).
    arrivals: dict[str, trio.Event] = attrs.field(factory=dict)
    #: Per market, stream events its generator skipped (see :attr:`events_skipped`), and events
    #: it generated (of :attr:`events_generated`).
    skipped_by_market: dict[str, int] = attrs.field(factory=dict)
    generated_by_market: collections.Counter = attrs.field(factory=collections.Counter)
    connections: set[SimConnection] = attrs.field(factory=set)
    connections_total: int = 0
    auth_attempts: int = 0
    events_generated: int = 0
    #: Every subscribe / unsubscribe received, in order: (connection id, action, params).
    control_log: list[tuple[int, str, str]] = attrs.field(factory=list)
    #: When set, every data frame sent is kept here, by connection id (tests compare bytes).
    record_frames: bool = False
    sent_frames: dict[int, list[str]] = attrs.field(factory=dict)
    #: Benchmark window: between two marks, events sent are counted by channel text.
    counting: bool = False
    marks: int = 0
    window_counts: collections.Counter = attrs.field(factory=collections.Counter)
    window_events: int = 0
    #: Data frames written in the window, over all connections, and the stream events in them
    #: (counted when written, not when published, so their ratio is the framing the peer got
    #: even when the writer lags; frames holding only a mark are not counted).
    window_frames: int = 0
    window_frame_events: int = 0
    #: Stream events not sent because the generator fell more than half a second behind its rate.
    events_skipped: int = 0

    def mark(self) -> None:
        """Send every connection a ``BENCH.MARK`` event and open or close the counting window.

        Clients see the marks in their stream, in order with the data, so each can count
        exactly the events between them; :attr:`window_counts` says what was sent.
        """
        self.marks += 1
        self.counting = not self.counting
        marker = Event("BENCH", "MARK", msgspec.json.encode({"ev": "BENCH", "sym": "MARK", "n": self.marks}))
        for connection in self.connections:
            connection.enqueue(0, frame_of([marker]))  # 0: not a stream event, for the counts of frames

    def drop_all(self, *, abrupt: bool = False) -> None:
        """Drop every connection (``abrupt``: without a close frame), as a fault."""
        self.faults.abrupt = abrupt
        for connection in self.connections:
            connection.drop.set()

    def subscribed_channels(self, market: str | None = None) -> set[str]:
        """The channels held by the connections (to ``market`` only, when given), as texts."""
        return {channel.text for connection in self.connections for channel in connection.channels
                if market is None or connection.market == market}

    def connections_to(self, market: str) -> list[SimConnection]:
        """The authenticated connections to ``market``."""
        return [connection for connection in self.connections if connection.market == market]

    def arrived(self, market: str) -> None:
        """Wake ``market``'s generator if it idles: a connection arrived there."""
        event = self.arrivals.pop(market, None)
        if event is not None:
            event.set()

    async def wait_for_arrival(self, market: str) -> None:
        """Return once a connection to ``market`` arrives (at once if one is there)."""
        while not self.connections_to(market):
            await self.arrivals.setdefault(market, trio.Event()).wait()


def _symbols(config: SimulatorConfig) -> tuple[str, ...]:
    if isinstance(config.symbols, int):
        return synthetic_symbols(config.symbols)
    return config.symbols


async def run_simulator(
    config: SimulatorConfig,
    *,
    source: Callable[[Simulator], Awaitable[object]] | None = None,
    port_setting: str = "SIMULATOR_PORT",
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Polygon's protocol until cancelled; hands the running :class:`Simulator` to
    ``task_status`` once it listens. ``source`` feeds the connections instead of the synthetic
    markets (the journal replay, :mod:`proxy.sim.replay`); it runs beside the server. Raises
    ConfigError (naming ``port_setting``) when the port cannot be opened."""
    stocks = MarketModel(_symbols(config), seed=config.seed)
    simulator = Simulator(
        config=config,
        model=stocks,
        feeds={market: stocks if market == "stocks" else feed_model(market, seed=config.seed)
               for market in config.markets},
        faults=Faults(drop_after_seconds=config.drop_after_seconds,
                      drop_after_frames=config.drop_after_frames,
                      refuse_auth=config.refuse_auth,
                      abrupt=config.drop_abrupt,
                      malformed_next=config.malformed_frames,
                      force_max_connections=config.force_max_connections),
    )
    try:
        listeners = await open_socket_listeners(config.host, config.port)
    except OSError as error:
        raise bind_error(port_setting, config.host, config.port, error) from None
    pending = PendingConnections()
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(functools.partial(
                accept_connections, listener, functools.partial(_serve_connection, simulator, pending),
                max_message_bytes=MAX_MESSAGE_BYTES, pending=pending,
            ))
        simulator.port = listeners[0].getsockname()[1]
        if source is None:
            for market in simulator.feeds:
                nursery.start_soon(_generate, simulator, market)
        else:
            nursery.start_soon(source, simulator)
        if config.stall_after_seconds is not None and config.stall_seconds > 0:
            nursery.start_soon(_stall_later, simulator.faults, config.stall_after_seconds, config.stall_seconds)
        if source is None:
            log.info("Polygon simulator listening on ws://%s:%d/<market> for %s (%d stock symbols, %.0f events/s "
                     "a market, frames: %s%s)", config.host, simulator.port, ", ".join(config.markets),
                     len(simulator.model.symbols), config.events_per_second, _describe_framing(config),
                     "" if set(config.entitled) >= set(config.markets)
                     else f"; entitled: {', '.join(config.entitled) or 'none'}")
        task_status.started(simulator)


async def _stall_later(faults: Faults, after: float, seconds: float) -> None:
    await trio.sleep(after)
    log.info("stalling every connection for %.1fs (fault injection)", seconds)
    faults.stall(seconds)


def _describe_framing(config: SimulatorConfig) -> str:
    per_frame = events_per_frame(config.frame_events, config.events_per_second)
    if config.frame_events == FRAME_ADAPTIVE:
        return "adaptive (1 event each, batched while a socket is backed up)"
    return f"{config.frame_events} ({per_frame} events each, {config.events_per_second / per_frame:,.1f} a second)"


async def _generate(simulator: Simulator, market: str = "stocks") -> None:
    """Emit ``market``'s stream at the configured rate, plus its aggregates each second and
    each minute (and for stocks, NOI each minute).

    Frames are paced by deadline (:class:`~proxy.sim.framing.Pacer`): each wake-up
    publishes every frame due by then, each of the configured size, and sleeps until
    the next is due; Trio's sleep is too coarse to wake once per frame at high rates.
    Stocks generate all the time, as before there were other markets; another market
    only while a connection to it is open (nobody would see the rest), its pacing
    starting afresh when one arrives.
    """
    model, config = simulator.feeds[market], simulator.config
    idles = market != "stocks"
    rate = config.events_per_second
    per_frame = events_per_frame(config.frame_events, rate)
    prebuilt: list[list[Event]] = []
    if config.prebuilt_events and isinstance(model, MarketModel):  # its placeholder times are stocks'

        # whole frames only, so that the cycle's last frame is as full as the others
        prebuilt = prebuild(model, math.ceil(config.prebuilt_events / per_frame) * per_frame, per_frame)
    cursor = 0
    pacer = Pacer(frames_per_second=rate / per_frame, start=trio.current_time())
    second = int(time.time())
    minute = second // 60
    skipped_reported, warned_ms, skipped_before = 0, 0, 0
    while True:
        if idles and not simulator.connections_to(market):
            await simulator.wait_for_arrival(market)
            skipped_before += pacer.skipped
            pacer = Pacer(frames_per_second=rate / per_frame, start=trio.current_time())
        due = pacer.due(trio.current_time())
        wall_ms = int(time.time() * 1000)
        frames: list[list[Event]] = []
        if prebuilt:
            for _ in range(due):
                frames.append(prebuilt[cursor])
                cursor = (cursor + 1) % len(prebuilt)
        elif due:
            events = model.stream_events(due * per_frame, wall_ms)  # one call: cheaper than one per frame
            frames = [events[offset:offset + per_frame] for offset in range(0, len(events), per_frame)]
        for events in frames:
            simulator.events_generated += len(events)
            simulator.generated_by_market[market] += len(events)
            _publish(simulator, events, wall_ms if prebuilt else None, market)
        # Aggregates are cut like the stream: N to a frame, or one each when adaptive.
        if wall_ms // 1000 != second:
            _publish_cut(simulator, model.second_aggregates(second * 1000), per_frame, market)
            second = wall_ms // 1000
        if wall_ms // 60_000 != minute:
            _publish_cut(simulator, model.minute_aggregates(minute * 60_000), per_frame, market)
            if isinstance(model, MarketModel):
                _publish_cut(simulator, model.imbalances(wall_ms), per_frame, market)
            minute = wall_ms // 60_000
        simulator.skipped_by_market[market] = (skipped_before + pacer.skipped) * per_frame
        simulator.events_skipped = sum(simulator.skipped_by_market.values())
        if simulator.events_skipped > skipped_reported and wall_ms - warned_ms >= 5000:
            log.warning("the generator cannot keep %.0f events/s in frames of %d: %d events skipped so far",
                        rate, per_frame, simulator.events_skipped)
            skipped_reported, warned_ms = simulator.events_skipped, wall_ms
        # Wake at least once a second, for the aggregates, even when frames are further apart.
        await trio.sleep_until(min(pacer.next_at(), trio.current_time() + 1.0))


def _publish_cut(simulator: Simulator, events: list[Event], per_frame: int, market: str = "stocks") -> None:
    for offset in range(0, len(events), per_frame):
        chunk = events[offset:offset + per_frame]
        simulator.events_generated += len(chunk)
        simulator.generated_by_market[market] += len(chunk)
        _publish(simulator, chunk, None, market)


def _publish(simulator: Simulator, events: list[Event], stamp_ms: int | None, market: str = "stocks") -> None:
    """Queue each connection to ``market`` the events its channels select, as one frame."""
    whole: bytes | None = None
    for connection in simulator.connections:
        if connection.market != market:
            continue
        if connection.star:
            selected = events
            if whole is None:
                whole = _payload(events, stamp_ms)
            payload = whole
        else:
            selected = [event for event in events if connection.selects(event)]
            if not selected:
                continue
            payload = _payload(selected, stamp_ms)
        if simulator.counting:
            simulator.window_events += len(selected)
            simulator.window_counts.update(event.channel for event in selected)
        connection.enqueue(len(selected), payload)


def _payload(events: list[Event], stamp_ms: int | None) -> bytes:
    frame = frame_of(events)
    return stamp(frame, stamp_ms) if stamp_ms is not None else frame


async def _serve_connection(
    simulator: Simulator, pending: PendingConnections, connection: WsConnection, address: str
) -> None:
    """One client, from its handshake to its close; the listener closes the socket after."""
    markets = simulator.config.markets
    connection.plain_http_body = (f"this is the Polygon simulator's WebSocket port (markets at /<market>: "
                                  f"{', '.join(markets)}): connect a WebSocket client to /{markets[0]}\n").encode()
    faults = simulator.faults
    if isinstance(connection.transport, SocketTransport):
        _limit_unsent(connection.transport.sock)
    with trio.move_on_after(simulator.config.auth_timeout_seconds) as handshake:
        try:
            request = await connection.read_request()
        except WebSocketClosed as closed:
            log.info("refused %s: %s", address, closed.reason)
            await connection.aclose(timeout=CLOSE_SECONDS)  # after the refusal, if one was written
            return
    if handshake.cancelled_caught:
        return
    route = _route_at(urlsplit(request.target).path, markets)
    if route is None:
        log.info("refused %s: path %r is not served here", address, request.target)
        connection.reject(404, (f"not found: this simulator serves "
                                f"{', '.join('/' + name for name in markets)} (and each under /delayed/)\n").encode())
        with trio.move_on_after(CLOSE_SECONDS):
            await connection.drain()
        return
    connection.accept()
    peer = FaultyConnection(connection, faults)
    simulator.connections_total += 1
    market = route.market
    sim_connection = SimConnection(id=simulator.connections_total, market=market, opened_at=trio.current_time(),
                                   delayed=route.delayed)
    close: tuple[int, str] | None = (1000, "")  # None: drop the TCP stream without a close frame
    try:
        await peer.send_text(protocol.CONNECTED)
        close = await _authenticate(simulator, peer, sim_connection)
        if close is not None:
            return
        pending.discard(connection)  # authenticated: never shed for descriptors
        simulator.connections.add(sim_connection)
        simulator.arrived(market)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_control, simulator, peer, sim_connection)
                nursery.start_soon(_send_frames, simulator, peer, sim_connection)
                nursery.start_soon(_drop_when_told, simulator, sim_connection, nursery.cancel_scope)
        finally:
            simulator.connections.discard(sim_connection)
        if sim_connection.evicted:
            await peer.send_text(protocol.MAX_CONNECTIONS)
            close = (1008, "max connections")
        elif sim_connection.dropped:
            close = None if faults.abrupt else (1001, "simulated drop")
    except* WebSocketClosed:
        pass  # the peer went away, or closed: this ends this connection and nothing else
    finally:
        if trio.current_effective_deadline() == -math.inf:
            close = None  # the simulator is stopping (or the listener shed this one): no close handshake
        with trio.CancelScope(shield=True):
            if close is None:
                await peer.abort()
            else:
                await peer.close(*close, timeout=CLOSE_SECONDS)


def _route_at(path: str, served: tuple[str, ...]) -> Route | None:
    """The market (and feed) a request's path names, if served: ``/stocks``, ...; ``/`` is stocks
    (as before there were markets); ``/delayed/stocks`` is the delayed feed's stocks (Polygon's
    other host, here a path: the same synthetic events, not delayed, and the same per-market
    connection limit, which Polygon counts across both feeds). A trailing slash is accepted
    (``/stocks/``), as the proxy accepts it: the official client's URL building may add one."""
    wanted = path.strip("/")
    if wanted.startswith(f"{DELAYED_PREFIX}/"):
        wanted = wanted.removeprefix(f"{DELAYED_PREFIX}/")
        return Route(wanted, delayed=True) if wanted in served else None
    name = wanted or "stocks"
    return Route(name) if name in served else None


def _limit_unsent(sock: socket.socket) -> None:
    """At most 16 KiB unsent in the kernel (as trio's SocketStream sets it): past that a write is
    not taken at once, so a reader that falls behind shows within a frame or two, and the adaptive
    framing batches then rather than after the kernel buffered megabytes (loopback autotuning)."""
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 16_384)
        except OSError:
            pass


async def _authenticate(simulator: Simulator, peer: FaultyConnection, connection: SimConnection) -> tuple[int, str] | None:
    """None once the client is in; else the close (code, reason) that refuses it, its status sent."""
    config, faults = simulator.config, simulator.faults
    action: Auth | None = None
    with trio.move_on_after(config.auth_timeout_seconds):
        action = await _receive_auth(peer)
    if action is None:
        await peer.send_text(protocol.AUTH_TIMEOUT)
        return 1008, "auth timeout"
    simulator.auth_attempts += 1
    key = action.api_key
    if faults.refuse_auth > 0 or (config.api_keys and key not in config.api_keys):
        faults.refuse_auth = max(0, faults.refuse_auth - 1)
        log.info("connection %d: auth_failed for key %s", connection.id, redact(key))
        await peer.send_text(protocol.AUTH_FAILED)
        return 1008, "authentication failed"
    if connection.market not in config.entitled:
        log.info("connection %d: key %s is not entitled to %s (auth_failed)", connection.id, redact(key),
                 connection.market)
        await peer.send_text(NOT_ENTITLED)
        return 1008, "not entitled"
    # Polygon's limit is per cluster: one market's connections do not count against another's.
    open_for_key = [other for other in simulator.connections_to(connection.market) if other.api_key == key]
    if len(open_for_key) >= config.max_connections and faults.evict_oldest and not faults.force_max_connections:
        oldest = min(open_for_key, key=lambda other: other.opened_at)
        log.info("connection %d: evicts connection %d of key %s", connection.id, oldest.id, redact(key))
        oldest.evicted = True
        oldest.drop.set()
    elif faults.force_max_connections or len(open_for_key) >= config.max_connections:
        log.info("connection %d: max_connections for key %s", connection.id, redact(key))
        await peer.send_text(protocol.MAX_CONNECTIONS)
        return 1008, "max connections"
    connection.api_key = key
    connection.capped = {code: set() for code in MARKET_TABLE[connection.market].caps(
        simulator.caps.get(connection.market))}
    await peer.send_text(protocol.AUTH_SUCCESS)
    return None


async def _receive_auth(peer: FaultyConnection) -> Auth:
    while True:
        try:
            action = protocol.parse_client_message(await peer.receive())
        except ClientMessageError as error:
            await peer.send_text(protocol.error_frame(error.message))
            continue
        if isinstance(action, Auth):
            return action
        await peer.send_text(protocol.error_frame("not authorized"))


async def _read_control(simulator: Simulator, peer: FaultyConnection, connection: SimConnection) -> None:
    while True:
        message = await peer.receive()
        try:
            action = protocol.parse_client_message(message)
        except ClientMessageError as error:
            await peer.send_text(protocol.error_frame(error.message))
            continue
        if isinstance(action, Auth):
            await peer.send_text(protocol.error_frame("already authenticated"))
            continue
        verb = "subscribe" if isinstance(action, Subscribe) else "unsubscribe"
        simulator.control_log.append((connection.id, verb, protocol.format_channel_list(action.channels)))
        refused = simulator.faults.refused_channels if verb == "subscribe" else frozenset()
        over_limits = _over_limits(simulator, connection, action.channels) if verb == "subscribe" else {}
        if refused or over_limits or protocol.EVERYTHING_CHANNEL in action.channels:
            statuses = []
            for channel in action.channels:
                if (channel.is_everything and not simulator.config.allow_star) or channel.text in refused:
                    statuses.append(protocol.status_event("error", f"unknown channel: {channel.text}"))
                    continue
                if channel in over_limits:
                    statuses.append(protocol.status_event("error", f"refused {channel.text}: {over_limits[channel]}"))
                    continue
                (connection.add if verb == "subscribe" else connection.discard)(channel)
                statuses.append(protocol.status_event("success", f"{verb}d to: {channel.text}"))
            await peer.send_text(protocol.statuses_frame(statuses))
            continue
        for channel in action.channels:  # a tier may send tens of thousands a second: the plain way
            (connection.add if verb == "subscribe" else connection.discard)(channel)
        await peer.send_text(protocol.subscription_frame(f"{verb}d", action.channels))


def _over_limits(simulator: Simulator, connection: SimConnection, channels: tuple[Channel, ...]) -> dict[Channel, str]:
    """The channels of a subscribe that the market's rules refuse (:func:`~proxy.core.markets.screen`),
    each with why; the others are taken in order up to the caps."""
    rules = MARKET_TABLE[connection.market]
    caps = simulator.caps.get(connection.market)
    limits = rules.caps(caps)
    if not limits and all(event_type.wildcard for event_type in rules.event_types):
        return {}  # stocks and most markets: nothing to check, and a tier may send 100,000 channels
    if limits.keys() <= connection.capped.keys():  # what screen reads of the set: the capped types
        held: set[Channel] = set().union(*(connection.capped[code] for code in limits))
    else:  # caps set after this connection authenticated: look through everything it holds
        held = connection.channels
    return dict(screen(rules, held, channels, caps=caps).refused)


async def _send_frames(simulator: Simulator, peer: FaultyConnection, connection: SimConnection) -> None:
    """Write the connection's queued frames, each as soon as it is queued.

    With the adaptive framing, a frame that the kernel did not take at once means the
    socket is backed up: while it drains, events pile up in the queue, and the next
    frame joins them all (up to MAX_FRAME_EVENTS), as Polygon's server does.
    """
    faults, websocket = simulator.faults, peer.connection
    adaptive = simulator.config.frame_events == FRAME_ADAPTIVE
    backed_up = False
    since_checkpoint = 0
    while True:
        while not connection.pending:
            connection.wake = trio.Event()
            await connection.wake.wait()
            since_checkpoint = 0
        if connection.drop.is_set():
            await trio.sleep_forever()  # the drop task is closing this connection: nothing more goes out
        if faults.stalled():
            await faults.wait_out_stall()
        count, payload = take_frame(connection.pending, merge=adaptive and backed_up)
        connection.pending_events -= count
        if faults.malformed_next > 0:
            faults.malformed_next -= 1
            payload = MALFORMED_FRAME.encode()
        at_once = websocket.send_text(payload)
        if not at_once and not websocket.open:
            raise WebSocketClosed(websocket.close_code, "connection closed")  # closing, closed or broken
        connection.frames_sent += 1
        if simulator.counting and count:
            simulator.window_frames += 1
            simulator.window_frame_events += count
        if simulator.record_frames:
            simulator.sent_frames.setdefault(connection.id, []).append(payload.decode())
        if faults.drop_after_frames is not None and connection.frames_sent >= faults.drop_after_frames:
            connection.drop.set()
        backed_up = not at_once
        if backed_up:
            connection.backed_up = True
            await peer.drain()
            connection.backed_up = False  # what is published meanwhile waits in connection.pending
            since_checkpoint = 0
        else:
            since_checkpoint += 1
            if since_checkpoint >= _FRAMES_BETWEEN_CHECKPOINTS:
                await trio.lowlevel.checkpoint()
                since_checkpoint = 0


async def _drop_when_told(simulator: Simulator, connection: SimConnection, scope: trio.CancelScope) -> None:
    faults = simulator.faults
    while not connection.drop.is_set():
        limit = faults.drop_after_seconds
        deadline = connection.opened_at + limit if limit is not None else math.inf
        with trio.move_on_at(min(deadline, trio.current_time() + 0.2)):
            await connection.drop.wait()
        if trio.current_time() >= deadline:
            break
    log.info("connection %d: dropped by fault injection (%s)", connection.id,
             "abrupt" if faults.abrupt else "close frame")
    connection.dropped = True
    # Writes are whole frames into the socket or its backlog, so cancelling never cuts one;
    # the close frame goes out behind what is already written.
    scope.cancel()


async def main() -> None:
    """``trio-run proxy.simulator``: the simulator configured from the environment."""
    config = load_simulator_config()
    setup_logging(config.log_level, config.library_log_level)
    await run_simulator(config)


if __name__ == "__main__":
    from ..app.cli import run_module_main
    raise SystemExit(run_module_main(main))
