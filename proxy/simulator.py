"""A Polygon-compatible server with synthetic data and fault injection (``trio-run proxy.simulator``).

It speaks the protocol as Polygon does (``connected`` first, auth against
``SIMULATOR_API_KEYS``, ``auth_timeout``, ``max_connections`` per key, one
status per channel, a bare ``*`` refused unless ``SIMULATOR_ALLOW_STAR``) and
sends each connection only the events its channels select, batched in mixed
frames. The WebSocket layer is wsproto on raw Trio streams, so faults can be
real: an abrupt close sends no close frame, a stall answers not even pings.
:class:`Faults` switches each fault by configuration or from a test at run time.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import time

import attrs
import msgspec
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.utilities import LocalProtocolError
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from . import protocol
from .config import SimulatorConfig, load_simulator_config, redact, setup_logging
from .market import Event, MarketModel, frame_of, prebuild, stamp, synthetic_symbols
from .protocol import Auth, Channel, ProtocolError, Subscribe

log = logging.getLogger("proxy.simulator")
TICK_SECONDS = 0.01
MAX_FRAME_EVENTS = 200
CONNECTION_QUEUE_FRAMES = 2000
MALFORMED_FRAME = '[{"ev":"T","sym":"AAPL","p":'


class PeerClosed(Exception):
    """The peer went away (close frame, EOF or a broken stream)."""


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
    #: Channels (texts) a subscribe is refused, with an `error` status per channel (tests set it).
    refused_channels: frozenset[str] = frozenset()
    #: A connection over SIMULATOR_MAX_CONNECTIONS evicts the key's oldest one (``max_connections``,
    #: then close 1008) instead of being refused, as Polygon has been seen to do (tests set it).
    evict_oldest: bool = False

    def stall(self, seconds: float) -> None:
        self.stall_until = trio.current_time() + seconds


class WsPeer:
    """One server-side WebSocket over a Trio stream, with the few operations faults need."""

    def __init__(self, stream: trio.abc.Stream, faults: Faults | None = None) -> None:
        self.stream = stream
        self.faults = faults or Faults()
        self.ws = WSConnection(ConnectionType.SERVER)
        self._events: collections.deque = collections.deque()
        self._send_lock = trio.Lock()
        self._text_parts: list[str] = []

    async def _pump(self) -> None:
        await _stall_if_told(self.faults)
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise PeerClosed() from None
        if not data:
            raise PeerClosed()
        self.ws.receive_data(data)
        self._events.extend(self.ws.events())

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            await _stall_if_told(self.faults)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise PeerClosed() from None

    async def accept(self) -> str:
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, Request):
                    await self._write(self.ws.send(AcceptConnection()))
                    return event.target
            await self._pump()

    async def receive(self) -> str | bytes:
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, TextMessage):
                    self._text_parts.append(event.data)
                    if event.message_finished:
                        text, self._text_parts = "".join(self._text_parts), []
                        return text
                elif isinstance(event, BytesMessage):
                    return bytes(event.data)
                elif isinstance(event, Ping):
                    await self._write(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    try:
                        await self._write(self.ws.send(event.response()))
                    finally:
                        await self.stream.aclose()
                    raise PeerClosed()
            await self._pump()

    async def send_text(self, text: str) -> None:
        try:
            data = self.ws.send(TextMessage(data=text))
        except LocalProtocolError:  # the WebSocket is already closing or closed
            raise PeerClosed() from None
        await self._write(data)

    async def close(self, code: int = 1000, reason: str = "", wait: float = 1.0) -> None:
        """The close handshake: our close frame, the peer's answer (briefly), then TCP close."""
        try:
            await self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
            with trio.move_on_after(wait):
                while not any(isinstance(event, CloseConnection) for event in self._events):
                    self._events.clear()
                    await self._pump()
        except (PeerClosed, LocalProtocolError):
            pass  # already gone or closing: nothing more to tell it
        await self.stream.aclose()

    async def abort(self) -> None:
        """Close the TCP stream without a close frame, as a crashed server would."""
        await self.stream.aclose()


@attrs.define(eq=False)
class SimConnection:
    id: int
    api_key: str = ""
    channels: set[Channel] = attrs.field(factory=set)
    # Indexes of `channels` for the per-event filter: type wildcards, exact channel texts, `*`.
    wild_types: set[str] = attrs.field(factory=set)
    exact: set[str] = attrs.field(factory=set)
    star: bool = False
    frames: trio.MemorySendChannel | None = None
    frames_sent: int = 0
    opened_at: float = 0.0
    drop: trio.Event = attrs.field(factory=trio.Event)
    dropped: bool = False
    evicted: bool = False

    def add(self, channel: Channel) -> None:
        """Hold ``channel``, and index it (one channel at a time: a tier may hold 100,000)."""
        self.channels.add(channel)
        if channel.is_everything:
            self.star = True
        elif channel.is_type_wildcard:
            self.wild_types.add(channel.ev_type)
        else:
            self.exact.add(channel.text)

    def discard(self, channel: Channel) -> None:
        self.channels.discard(channel)
        if channel.is_everything:
            self.star = False
        elif channel.is_type_wildcard:
            self.wild_types.discard(channel.ev_type)
        else:
            self.exact.discard(channel.text)

    def selects(self, event: Event) -> bool:
        return self.star or event.ev in self.wild_types or event.channel in self.exact


@attrs.define(eq=False)
class Simulator:
    """A running simulator: its port, connections and fault switches, for tests."""

    config: SimulatorConfig
    model: MarketModel
    faults: Faults
    port: int = 0
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

    def mark(self) -> None:
        """Send every connection a ``BENCH.MARK`` event and open or close the counting window.

        Clients see the marks in their stream, in order with the data, so each can count
        exactly the events between them; :attr:`window_counts` says what was sent.
        """
        self.marks += 1
        self.counting = not self.counting
        marker = Event("BENCH", "MARK", msgspec.json.encode({"ev": "BENCH", "sym": "MARK", "n": self.marks}))
        for connection in list(self.connections):
            try:
                connection.frames.send_nowait(frame_of([marker]).decode())  # type: ignore[union-attr]
            except trio.WouldBlock:
                connection.drop.set()

    def drop_all(self, *, abrupt: bool = False) -> None:
        self.faults.abrupt = abrupt
        for connection in self.connections:
            connection.drop.set()

    def subscribed_channels(self) -> set[str]:
        return {channel.text for connection in self.connections for channel in connection.channels}


def _symbols(config: SimulatorConfig) -> tuple[str, ...]:
    if isinstance(config.symbols, int):
        return synthetic_symbols(config.symbols)
    return config.symbols


async def run_simulator(
    config: SimulatorConfig, *, task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED
) -> None:
    simulator = Simulator(
        config=config,
        model=MarketModel(_symbols(config), seed=config.seed),
        faults=Faults(drop_after_seconds=config.drop_after_seconds,
                      drop_after_frames=config.drop_after_frames,
                      refuse_auth=config.refuse_auth,
                      abrupt=config.drop_abrupt,
                      malformed_next=config.malformed_frames,
                      force_max_connections=config.force_max_connections),
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, functools.partial(_serve_connection, simulator),
                              config.port, host=config.host)
        )
        simulator.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(_generate, simulator)
        if config.stall_after_seconds is not None and config.stall_seconds > 0:
            nursery.start_soon(_stall_later, simulator.faults, config.stall_after_seconds, config.stall_seconds)
        log.info("Polygon simulator listening on ws://%s:%d/stocks (%d symbols, %.0f events/s)",
                 config.host, simulator.port, len(simulator.model.symbols), config.events_per_second)
        task_status.started(simulator)


async def _stall_later(faults: Faults, after: float, seconds: float) -> None:
    await trio.sleep(after)
    log.info("stalling every connection for %.1fs (fault injection)", seconds)
    faults.stall(seconds)


async def _generate(simulator: Simulator) -> None:
    """Emit the stream at the configured rate, plus A each second and AM each minute."""
    model, config = simulator.model, simulator.config
    rate = config.events_per_second
    # A pre-built frame holds one tick's worth of events, so low rates are not sent in lumps.
    frame_events = max(1, min(MAX_FRAME_EVENTS, int(rate * TICK_SECONDS)))
    prebuilt = prebuild(model, config.prebuilt_events, frame_events) if config.prebuilt_events else []
    cursor = 0
    start = trio.current_time()
    emitted = 0
    second = int(time.time())
    minute = second // 60
    while True:
        now = trio.current_time()
        due = int((now - start) * rate) - emitted
        wall_ms = int(time.time() * 1000)
        frames: list[list[Event]] = []
        if prebuilt:
            while due > 0:  # whole pre-built frames: the rate holds on average, frames stay intact
                frames.append(prebuilt[cursor])
                cursor = (cursor + 1) % len(prebuilt)
                due -= len(frames[-1])
                emitted += len(frames[-1])
        elif due > 0:
            events = model.stream_events(due, wall_ms)
            emitted += due
            frames = [events[offset:offset + MAX_FRAME_EVENTS]
                      for offset in range(0, len(events), MAX_FRAME_EVENTS)]
        if wall_ms // 1000 != second:
            frames.append(model.second_aggregates(second * 1000))
            second = wall_ms // 1000
        if wall_ms // 60_000 != minute:
            frames.append(model.minute_aggregates(minute * 60_000))
            minute = wall_ms // 60_000
        for events in frames:
            if events:
                simulator.events_generated += len(events)
                _publish(simulator, events, wall_ms if prebuilt else None)
        # Sleep to the next event when the rate is low, a tick when it is high.
        wait = max(TICK_SECONDS, (emitted + 1) / rate - (trio.current_time() - start))
        await trio.sleep(min(wait, 1.0))


def _publish(simulator: Simulator, events: list[Event], stamp_ms: int | None) -> None:
    """Queue each connection the events its channels select, as one frame."""
    whole: str | None = None
    for connection in list(simulator.connections):
        if connection.star:
            selected = events
            whole = whole or _frame_text(events, stamp_ms)
            frame = whole
        else:
            selected = [event for event in events if connection.selects(event)]
            if not selected:
                continue
            frame = _frame_text(selected, stamp_ms)
        if simulator.counting:
            simulator.window_events += len(selected)
            simulator.window_counts.update(event.channel for event in selected)
        try:
            connection.frames.send_nowait(frame)  # type: ignore[union-attr]
        except trio.WouldBlock:
            log.warning("connection %d is a slow consumer; disconnecting it", connection.id)
            connection.drop.set()


def _frame_text(events: list[Event], stamp_ms: int | None) -> str:
    frame = frame_of(events)
    return (stamp(frame, stamp_ms) if stamp_ms is not None else frame).decode()


async def _serve_connection(simulator: Simulator, stream: trio.SocketStream) -> None:
    peer = WsPeer(stream, simulator.faults)
    simulator.connections_total += 1
    connection = SimConnection(id=simulator.connections_total, opened_at=trio.current_time())
    try:
        await peer.accept()
        await peer.send_text(protocol.CONNECTED)
        if not await _authenticate(simulator, peer, connection):
            return
        send, receive = trio.open_memory_channel[str](CONNECTION_QUEUE_FRAMES)
        connection.frames = send
        simulator.connections.add(connection)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_control, simulator, peer, connection)
                nursery.start_soon(_send_frames, simulator, peer, connection, receive)
                nursery.start_soon(_drop_when_told, simulator, peer, connection, nursery.cancel_scope)
        finally:
            simulator.connections.discard(connection)
        if connection.evicted:
            await peer.send_text(protocol.MAX_CONNECTIONS)
            await peer.close(1008, "max connections")
        elif connection.dropped:
            if simulator.faults.abrupt:
                await peer.abort()
            else:
                await peer.close(1001, "simulated drop")
    except* PeerClosed:
        pass  # the peer went away; that ends this connection and nothing else
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _authenticate(simulator: Simulator, peer: WsPeer, connection: SimConnection) -> bool:
    config, faults = simulator.config, simulator.faults
    action: Auth | None = None
    with trio.move_on_after(config.auth_timeout_seconds):
        action = await _receive_auth(peer)
    if action is None:
        await peer.send_text(protocol.AUTH_TIMEOUT)
        await peer.close(1008, "auth timeout")
        return False
    simulator.auth_attempts += 1
    key = action.api_key
    if faults.refuse_auth > 0 or (config.api_keys and key not in config.api_keys):
        faults.refuse_auth = max(0, faults.refuse_auth - 1)
        log.info("connection %d: auth_failed for key %s", connection.id, redact(key))
        await peer.send_text(protocol.AUTH_FAILED)
        await peer.close(1008, "authentication failed")
        return False
    open_for_key = [other for other in simulator.connections if other.api_key == key]
    if len(open_for_key) >= config.max_connections and faults.evict_oldest and not faults.force_max_connections:
        oldest = min(open_for_key, key=lambda other: other.opened_at)
        log.info("connection %d: evicts connection %d of key %s", connection.id, oldest.id, redact(key))
        oldest.evicted = True
        oldest.drop.set()
    elif faults.force_max_connections or len(open_for_key) >= config.max_connections:
        log.info("connection %d: max_connections for key %s", connection.id, redact(key))
        await peer.send_text(protocol.MAX_CONNECTIONS)
        await peer.close(1008, "max connections")
        return False
    connection.api_key = key
    await peer.send_text(protocol.AUTH_SUCCESS)
    return True


async def _receive_auth(peer: WsPeer) -> Auth:
    while True:
        try:
            action = protocol.parse_client_message(await peer.receive())
        except ProtocolError as error:
            await peer.send_text(protocol.error_frame(error.message))
            continue
        if isinstance(action, Auth):
            return action
        await peer.send_text(protocol.error_frame("not authorized"))


async def _stall_if_told(faults: Faults) -> None:
    if faults.stall_until > trio.current_time():
        await trio.sleep_until(faults.stall_until)


async def _read_control(simulator: Simulator, peer: WsPeer, connection: SimConnection) -> None:
    while True:
        message = await peer.receive()
        try:
            action = protocol.parse_client_message(message)
        except ProtocolError as error:
            await peer.send_text(protocol.error_frame(error.message))
            continue
        if isinstance(action, Auth):
            await peer.send_text(protocol.error_frame("already authenticated"))
            continue
        verb = "subscribe" if isinstance(action, Subscribe) else "unsubscribe"
        simulator.control_log.append((connection.id, verb, protocol.format_channel_list(action.channels)))
        refused = simulator.faults.refused_channels if verb == "subscribe" else frozenset()
        if refused or protocol.EVERYTHING_CHANNEL in action.channels:
            statuses = []
            for channel in action.channels:
                if (channel.is_everything and not simulator.config.allow_star) or channel.text in refused:
                    statuses.append(protocol.status_event("error", f"unknown channel: {channel.text}"))
                    continue
                (connection.add if verb == "subscribe" else connection.discard)(channel)
                statuses.append(protocol.status_event("success", f"{verb}d to: {channel.text}"))
            await peer.send_text(protocol.statuses_frame(statuses))
            continue
        for channel in action.channels:  # a tier may send tens of thousands a second: the plain way
            (connection.add if verb == "subscribe" else connection.discard)(channel)
        await peer.send_text(protocol.subscription_frame(f"{verb}d", action.channels))


async def _send_frames(simulator: Simulator, peer: WsPeer, connection: SimConnection,
                       frames: trio.MemoryReceiveChannel[str]) -> None:
    faults = simulator.faults
    async for frame in frames:
        if faults.malformed_next > 0:
            faults.malformed_next -= 1
            frame = MALFORMED_FRAME
        await peer.send_text(frame)
        connection.frames_sent += 1
        if simulator.record_frames:
            simulator.sent_frames.setdefault(connection.id, []).append(frame)
        if faults.drop_after_frames is not None and connection.frames_sent >= faults.drop_after_frames:
            connection.drop.set()


async def _drop_when_told(simulator: Simulator, peer: WsPeer, connection: SimConnection,
                          scope: trio.CancelScope) -> None:
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
    async with peer._send_lock:  # stop the connection's tasks between frames, never mid-frame
        scope.cancel()


async def main() -> None:
    config = load_simulator_config()
    setup_logging(config.log_level)
    await run_simulator(config)


if __name__ == "__main__":
    from .cli import run_module_main
    raise SystemExit(run_module_main(main))
