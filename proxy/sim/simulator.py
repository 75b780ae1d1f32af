"""A Polygon-compatible server with synthetic data and fault injection (``trio-run proxy.simulator``).

It speaks the protocol as Polygon does (``connected`` first, auth against
``SIMULATOR_API_KEYS``, ``auth_timeout``, ``max_connections`` per key, one
status per channel, a bare ``*`` refused unless ``SIMULATOR_ALLOW_STAR``) and
sends each connection only the events its channels select, in frames cut and
paced as ``SIMULATOR_FRAME_EVENTS`` says (:mod:`proxy.sim.framing`). The
WebSocket layer is wsproto on the raw non-blocking socket, so faults can be real
(an abrupt close sends no close frame, a stall answers not even pings) and a
write can tell whether the kernel took it at once, which is what the adaptive
framing batches on. :class:`Faults` switches each fault by configuration or from
a test at run time.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import socket
import time

import attrs
import msgspec
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from ..core import protocol
from ..app.config import bind_error, load_simulator_config, setup_logging
from ..core.keys import redact
from ..core.settings import FRAME_ADAPTIVE, SimulatorConfig
from ..net.wsserver import text_frame
from .framing import Pacer, Unit, events_per_frame, take_frame
from .market import Event, MarketModel, frame_of, prebuild, stamp, synthetic_symbols
from ..core.protocol import Auth, Channel, ProtocolError, Subscribe

__all__ = [
    "CONNECTION_QUEUE_EVENTS",
    "RECEIVE_BYTES",
    "MALFORMED_FRAME",
    "PeerClosed",
    "Faults",
    "WsPeer",
    "SimConnection",
    "Simulator",
    "run_simulator",
    "main",
]

log = logging.getLogger("proxy.simulator")
#: Events queued for one connection beyond which it is dropped as a slow consumer: counted in
#: events, not frames, so that the bound means the same at every framing (10 s at 25,000/s).
CONNECTION_QUEUE_EVENTS = 250_000
RECEIVE_BYTES = 65536
#: A connection's writer checks in with the scheduler at least this often while frames go out
#: at once, so that a catch-up burst does not hold up the other connections.
_FRAMES_BETWEEN_CHECKPOINTS = 64
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

    def stall(self, seconds: float) -> None:
        self.stall_until = trio.current_time() + seconds


class WsPeer:
    """One server-side WebSocket on a non-blocking socket, with the few operations faults need.

    Writes go to the socket at once, synchronously, while the kernel takes them, as a
    server writing to its socket does; what the kernel does not take waits, in order, in
    a backlog that :meth:`drain` sends as the socket becomes writable. So frames are
    never interleaved or cut by a cancellation, and :meth:`write_data` can say whether a
    frame went out at once: when it did not, the socket is backed up, which is when the
    adaptive framing batches. (A Trio stream's ``send_all`` cannot say so, and costs a
    task switch per frame, too much at 20,000 frames a second.)
    """

    def __init__(self, sock: socket.socket, faults: Faults | None = None) -> None:
        self.sock = sock
        self.faults = faults or Faults()
        self.ws = WSConnection(ConnectionType.SERVER)
        self._events: collections.deque = collections.deque()
        self._backlog = bytearray()
        self._drain_lock = trio.Lock()  # one task at a time may wait for the socket to be writable
        self._text_parts: list[str] = []

    async def _pump(self) -> None:
        await _stall_if_told(self.faults)
        await trio.lowlevel.checkpoint()  # a peer that floods us must not starve the other tasks
        while True:
            try:
                data = self.sock.recv(RECEIVE_BYTES)
                break
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except (trio.ClosedResourceError, ValueError, OSError):
                    raise PeerClosed() from None
            except OSError:
                raise PeerClosed() from None
        if not data:
            raise PeerClosed()
        self.ws.receive_data(data)
        self._events.extend(self.ws.events())

    def _stalled(self) -> bool:
        until = self.faults.stall_until
        return until > 0 and until > trio.current_time()

    def _put(self, data: bytes) -> bool:
        """Write ``data`` behind anything still waiting; True if the kernel took all of it now."""
        if not self._backlog and not self._stalled():
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                raise PeerClosed() from None
            if sent == len(data):
                return True
            data = data[sent:]
        self._backlog += data
        return False

    def write_data(self, frame: bytes) -> bool:
        """Write one data frame (bytes already framed); True if it went out at once.

        False means the socket is backed up: the caller must :meth:`drain` before
        writing more, and what it queues meanwhile is what the adaptive framing joins.
        """
        if self.ws.state is not ConnectionState.OPEN:
            raise PeerClosed()  # closing: data after a close frame would break the protocol
        return self._put(frame)

    async def drain(self) -> None:
        """Wait until the kernel took everything written so far (a stall holds it back)."""
        if not self._backlog:
            return
        async with self._drain_lock:
            while self._backlog:
                await _stall_if_told(self.faults)
                try:
                    await trio.lowlevel.wait_writable(self.sock)
                    sent = self.sock.send(self._backlog)
                except BlockingIOError:
                    continue
                except (trio.ClosedResourceError, ValueError, OSError):
                    raise PeerClosed() from None
                del self._backlog[:sent]

    async def _write(self, data: bytes) -> None:
        self._put(data)
        await self.drain()

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
                        self.close_socket()
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
        with trio.move_on_after(wait):
            try:
                await self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
                while not any(isinstance(event, CloseConnection) for event in self._events):
                    self._events.clear()
                    await self._pump()
            except (PeerClosed, LocalProtocolError):
                pass  # already gone or closing: nothing more to tell it
        self.close_socket()

    async def abort(self) -> None:
        """Close the TCP stream without a close frame, as a crashed server would."""
        self.close_socket()

    def close_socket(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)  # wakes a task waiting on it, with ClosedResourceError
            self.sock.close()


@attrs.define(eq=False)
class SimConnection:
    id: int
    api_key: str = ""
    channels: set[Channel] = attrs.field(factory=set)
    # Indexes of `channels` for the per-event filter: type wildcards, exact channel texts, `*`.
    wild_types: set[str] = attrs.field(factory=set)
    exact: set[str] = attrs.field(factory=set)
    star: bool = False
    #: Frames published to this connection and not yet written, in order (see framing.take_frame).
    pending: collections.deque[Unit] = attrs.field(factory=collections.deque)
    pending_events: int = 0
    #: Set when something is queued; the writer replaces it before it waits again.
    wake: trio.Event = attrs.field(factory=trio.Event)
    frames_sent: int = 0
    opened_at: float = 0.0
    drop: trio.Event = attrs.field(factory=trio.Event)
    dropped: bool = False

    def reindex(self) -> None:
        self.star = protocol.EVERYTHING_CHANNEL in self.channels
        self.wild_types = {c.ev_type for c in self.channels if c.is_type_wildcard}
        self.exact = {c.text for c in self.channels if not c.is_type_wildcard and not c.is_everything}

    def selects(self, event: Event) -> bool:
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
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as error:
        raise bind_error("SIMULATOR_PORT", config.host, config.port, error) from None
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, functools.partial(_serve_connection, simulator), listeners)
        simulator.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(_generate, simulator)
        if config.stall_after_seconds is not None and config.stall_seconds > 0:
            nursery.start_soon(_stall_later, simulator.faults, config.stall_after_seconds, config.stall_seconds)
        log.info("Polygon simulator listening on ws://%s:%d/stocks (%d symbols, %.0f events/s, "
                 "frames: %s)", config.host, simulator.port, len(simulator.model.symbols),
                 config.events_per_second, _describe_framing(config))
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


async def _generate(simulator: Simulator) -> None:
    """Emit the stream at the configured rate, plus A each second and AM each minute.

    Frames are paced by deadline (:class:`~proxy.sim.framing.Pacer`): each wake-up
    publishes every frame due by then, each of the configured size, and sleeps until
    the next is due; Trio's sleep is too coarse to wake once per frame at high rates.
    """
    model, config = simulator.model, simulator.config
    rate = config.events_per_second
    per_frame = events_per_frame(config.frame_events, rate)
    prebuilt: list[list[Event]] = []
    if config.prebuilt_events:
        # whole frames only, so that the cycle's last frame is as full as the others
        prebuilt = prebuild(model, math.ceil(config.prebuilt_events / per_frame) * per_frame, per_frame)
    cursor = 0
    pacer = Pacer(frames_per_second=rate / per_frame, start=trio.current_time())
    second = int(time.time())
    minute = second // 60
    skipped_reported, warned_ms = 0, 0
    while True:
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
            _publish(simulator, events, wall_ms if prebuilt else None)
        # Aggregates are cut like the stream: N to a frame, or one each when adaptive.
        if wall_ms // 1000 != second:
            _publish_cut(simulator, model.second_aggregates(second * 1000), per_frame)
            second = wall_ms // 1000
        if wall_ms // 60_000 != minute:
            _publish_cut(simulator, model.minute_aggregates(minute * 60_000), per_frame)
            minute = wall_ms // 60_000
        simulator.events_skipped = pacer.skipped * per_frame
        if simulator.events_skipped > skipped_reported and wall_ms - warned_ms >= 5000:
            log.warning("the generator cannot keep %.0f events/s in frames of %d: %d events skipped so far",
                        rate, per_frame, simulator.events_skipped)
            skipped_reported, warned_ms = simulator.events_skipped, wall_ms
        # Wake at least once a second, for the aggregates, even when frames are further apart.
        await trio.sleep_until(min(pacer.next_at(), trio.current_time() + 1.0))


def _publish_cut(simulator: Simulator, events: list[Event], per_frame: int) -> None:
    for offset in range(0, len(events), per_frame):
        chunk = events[offset:offset + per_frame]
        simulator.events_generated += len(chunk)
        _publish(simulator, chunk, None)


def _publish(simulator: Simulator, events: list[Event], stamp_ms: int | None) -> None:
    """Queue each connection the events its channels select, as one frame."""
    whole: bytes | None = None
    for connection in simulator.connections:
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


async def _serve_connection(simulator: Simulator, stream: trio.SocketStream) -> None:
    # The raw socket (non-blocking, TCP_NODELAY as Trio set it), so that writes can be synchronous.
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    peer = WsPeer(sock, simulator.faults)
    simulator.connections_total += 1
    connection = SimConnection(id=simulator.connections_total, opened_at=trio.current_time())
    try:
        await peer.accept()
        await peer.send_text(protocol.CONNECTED)
        if not await _authenticate(simulator, peer, connection):
            return
        simulator.connections.add(connection)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_control, simulator, peer, connection)
                nursery.start_soon(_send_frames, simulator, peer, connection)
                nursery.start_soon(_drop_when_told, simulator, connection, nursery.cancel_scope)
        finally:
            simulator.connections.discard(connection)
        if connection.dropped:
            if simulator.faults.abrupt:
                await peer.abort()
            else:
                await peer.close(1001, "simulated drop")
    except* PeerClosed:
        pass  # the peer went away; that ends this connection and nothing else
    finally:
        peer.close_socket()


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
    open_for_key = sum(1 for other in simulator.connections if other.api_key == key)
    if faults.force_max_connections or open_for_key >= config.max_connections:
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
        statuses = []
        for channel in action.channels:
            if channel.is_everything and not simulator.config.allow_star:
                statuses.append(protocol.status_event("error", f"unknown channel: {channel.text}"))
                continue
            if verb == "subscribe":
                connection.channels.add(channel)
            else:
                connection.channels.discard(channel)
            statuses.append(protocol.status_event("success", f"{verb}d to: {channel.text}"))
        connection.reindex()
        await peer.send_text(protocol.statuses_frame(statuses))


async def _send_frames(simulator: Simulator, peer: WsPeer, connection: SimConnection) -> None:
    """Write the connection's queued frames, each as soon as it is queued.

    With the adaptive framing, a frame that the kernel did not take at once means the
    socket is backed up: while it drains, events pile up in the queue, and the next
    frame joins them all (up to MAX_FRAME_EVENTS), as Polygon's server does.
    """
    faults = simulator.faults
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
        await _stall_if_told(faults)
        count, payload = take_frame(connection.pending, merge=adaptive and backed_up)
        connection.pending_events -= count
        if faults.malformed_next > 0:
            faults.malformed_next -= 1
            payload = MALFORMED_FRAME.encode()
        at_once = peer.write_data(text_frame(payload))
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
            await peer.drain()  # what is published meanwhile waits in connection.pending
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
    config = load_simulator_config()
    setup_logging(config.log_level, config.library_log_level)
    await run_simulator(config)


if __name__ == "__main__":
    from ..app.cli import run_module_main
    raise SystemExit(run_module_main(main))
