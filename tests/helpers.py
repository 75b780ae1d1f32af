"""What the tests share: real tiers on 127.0.0.1 port 0, test clients, and fakes for socket-free tests.

- **Configurations and starters**: :func:`simulator_config`, :func:`firehose_config`,
  :func:`filtered_config`, :func:`start_simulator`, :func:`start_tier`; a simulator and its
  firehose, link up, in one call (:func:`start_firehose`), and the whole chain (simulator →
  firehose → filtered proxy, links up): :func:`start_chain`.
- **Clients**: :class:`Client` (trio-websocket, as a user writes one), :func:`connect`,
  :func:`authed_client`, :func:`raw_events` (a client's events as the bytes they came as),
  a ``*`` :class:`Neighbour` that must see a gapless stream, raw
  wsproto clients for what a library would not send (:func:`handshake`, :func:`masked`), and a
  :class:`SlowReader` whose tiny socket buffer fills at once.
- **Fakes**: :class:`FakeConnection`, what :class:`~proxy.net.server.Hub` and the client
  reader use of a WebSocket connection, for testing them without sockets (under Trio's
  ``autojump_clock`` where time matters).

Waiting: :func:`wait_until` polls with a deadline that is generous on purpose. A deadline
here says "it never happened", not "it was fast": the suite must pass on a busy machine.

``tests.conftest`` re-exports the names other test files import from it.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Callable, NamedTuple

import attrs
import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from proxy.app.tier import Tier, run_tier
from proxy.core.backoff import Backoff
from proxy.core.protocol import EVERYTHING_CHANNEL, parse_channel_list
from proxy.core.settings import FRAME_TICK, SimulatorConfig, TierConfig
from proxy.net.upstream import LinkState
from proxy.core.errors import WebSocketClosed as ServerConnectionClosed
from proxy.sim.simulator import Simulator, run_simulator

__all__ = [
    "ALL_STREAM", "CLIENT_KEY", "FAST_BACKOFF", "FAST_KEEPALIVE", "FIREHOSE_KEY", "LIVENESS_SECONDS", "POLYGON_KEY",
    "Chain", "Client", "FakeConnection", "Neighbour", "SlowReader", "authed_client", "connect", "count_tasks",
    "filtered_config", "firehose_config", "handshake", "masked", "raw_events", "read_statuses", "selects", "send_all",
    "simulator_config", "start_chain", "start_firehose", "start_simulator", "start_tier", "wait_connected",
    "wait_until",
]

POLYGON_KEY = "sim-key"
FIREHOSE_KEY = "firehose-key"
CLIENT_KEY = "client-key"
FAST_BACKOFF = Backoff(initial_seconds=0.05, max_seconds=0.2, healthy_after_seconds=5, refused_seconds=0.3)
#: Every stream type the simulator sends with a `q` sequence: a firehose holding these relays a
#: gapless sequence that a `*` client can check.
ALL_STREAM = parse_channel_list("T.*,Q.*,LULD.*,FMV.*")
#: How long something that must happen may take before a test calls it lost. Generous on
#: purpose: on a loaded machine a loopback round trip can take a second.
LIVENESS_SECONDS = 10.0
#: The upstream keepalive of test tiers: one that gives up after a second drops the link whenever a
#: busy machine delays a pong, and the test sees an outage it did not cause.
RELAXED_KEEPALIVE = dict(keepalive_interval_seconds=0.5, keepalive_timeout_seconds=30.0)
#: For the tests of a silent upstream: noticed within 1.5 s of the silence (a link's
#: ``keepalive_interval`` and ``keepalive_timeout`` may also be set while it runs).
FAST_KEEPALIVE = dict(keepalive_interval_seconds=0.5, keepalive_timeout_seconds=1.0)


# --- configurations and starters -------------------------------------------------------------


def simulator_config(**overrides: Any) -> SimulatorConfig:
    # Tests run the simulator, the tiers and their clients in one process: at their rates
    # (up to 20,000 events/s) one-event frames would measure that process, not the behaviour
    # under test, so they keep the framing of one 10 ms tick per frame unless they say otherwise.
    defaults: dict[str, Any] = dict(
        host="127.0.0.1", port=0, api_keys=frozenset({POLYGON_KEY}), symbols=40,
        events_per_second=2000, seed=7, max_connections=1, frame_events=FRAME_TICK,
    )
    return SimulatorConfig(**{**defaults, **overrides})


def firehose_config(simulator: Simulator, **overrides: Any) -> TierConfig:
    defaults: dict[str, Any] = dict(
        tier="firehose", upstream_url=f"ws://127.0.0.1:{simulator.port}/stocks",
        upstream_api_key=POLYGON_KEY, upstream_extra=(), static_channels=(), host="127.0.0.1",
        port=0, api_keys=frozenset({FIREHOSE_KEY}), allow_any_key=False, metrics_port=None,
        unsubscribe_grace_seconds=0.3, backoff=FAST_BACKOFF,
        shutdown_close_seconds=0.05, **RELAXED_KEEPALIVE,
    )
    return TierConfig(**{**defaults, **overrides})


def filtered_config(firehose: Tier | int, **overrides: Any) -> TierConfig:
    port = firehose if isinstance(firehose, int) else firehose.port
    defaults: dict[str, Any] = dict(
        tier="filtered", upstream_url=f"ws://127.0.0.1:{port}", upstream_api_key=FIREHOSE_KEY,
        upstream_extra=(EVERYTHING_CHANNEL,), static_channels=(), host="127.0.0.1", port=0,
        api_keys=frozenset({CLIENT_KEY}), allow_any_key=False, metrics_port=None,
        unsubscribe_grace_seconds=0.3, backoff=FAST_BACKOFF,
        shutdown_close_seconds=0.05, **RELAXED_KEEPALIVE,
    )
    return TierConfig(**{**defaults, **overrides})


async def start_simulator(nursery: trio.Nursery, **overrides: Any) -> Simulator:
    return await nursery.start(run_simulator, simulator_config(**overrides))


async def start_tier(nursery: trio.Nursery, config: TierConfig) -> Tier:
    return await nursery.start(run_tier, config)


async def wait_until(predicate: Callable[[], object], timeout: float = LIVENESS_SECONDS,
                     what: str = "condition") -> None:
    """Return once ``predicate()`` is true; AssertionError if it is still false after ``timeout``."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_connected(*tiers: Tier, timeout: float = LIVENESS_SECONDS) -> None:
    """Wait until each tier's upstream link is connected (authenticated, data may flow)."""
    for tier in tiers:
        await wait_until(lambda: tier.link.state is LinkState.CONNECTED, timeout,
                         what=f"the {tier.config.tier} tier's upstream link")


async def start_firehose(nursery: trio.Nursery, *, simulator: dict[str, Any] | None = None, connected: bool = True,
                         **overrides: Any) -> tuple[Simulator, Tier]:
    """Start the simulator (with the ``simulator`` overrides) and a firehose on it (with the
    others); with ``connected`` (the default), return once its link is up."""
    sim = await start_simulator(nursery, **(simulator or {}))
    firehose = await start_tier(nursery, firehose_config(sim, **overrides))
    if connected:
        await wait_connected(firehose)
    return sim, firehose


class Chain(NamedTuple):
    """A running simulator → firehose → filtered proxy; unpacks as ``sim, firehose, filtered``."""

    sim: Simulator
    firehose: Tier
    filtered: Tier


async def start_chain(nursery: trio.Nursery, *, simulator: dict[str, Any] | None = None,
                      firehose: dict[str, Any] | None = None, filtered: dict[str, Any] | None = None,
                      connected: bool = True) -> Chain:
    """Start the simulator, a firehose on it and a filtered proxy on that, with the overrides
    given for each; with ``connected`` (the default), return once both links are up, so that
    no client of the test hears an ``upstream_disconnected`` of the start-up."""
    sim, first = await start_firehose(nursery, simulator=simulator, connected=False, **(firehose or {}))
    second = await start_tier(nursery, filtered_config(first, **(filtered or {})))
    if connected:
        await wait_connected(first, second)
    return Chain(sim, first, second)


def count_tasks() -> int:
    """Every task running in this Trio run, for tests that check nothing was leaked."""
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


# --- clients -----------------------------------------------------------------------------------


@attrs.define
class Client:
    """A Polygon client as a user would write one, over trio-websocket, for tests."""

    ws: WebSocketConnection
    statuses: list[dict] = attrs.field(factory=list)
    events: list[dict] = attrs.field(factory=list)
    frames: list[str] = attrs.field(factory=list)

    async def receive(self) -> list[dict]:
        message = await self.ws.get_message()
        self.frames.append(message)
        parsed = json.loads(message)
        for event in parsed:
            (self.statuses if event.get("ev") == "status" else self.events).append(event)
        return parsed

    async def send(self, action: str, params: Any) -> None:
        await self.ws.send_message(json.dumps({"action": action, "params": params}))

    async def request(self, action: str, params: Any) -> list[dict]:
        """Send an action and return the next frame (its answer while no data flows)."""
        await self.send(action, params)
        return await self.next_status()

    async def next_status(self, timeout: float = LIVENESS_SECONDS) -> list[dict]:
        with trio.fail_after(timeout):
            while True:
                frame = await self.receive()
                found = [event for event in frame if event.get("ev") == "status"]
                if found:
                    return found

    async def wait_status(self, status: str, timeout: float = LIVENESS_SECONDS) -> dict:
        """Read until a status ``status`` has come (now or before); return the first one."""
        with trio.fail_after(timeout):
            while not any(s["status"] == status for s in self.statuses):
                await self.receive()
        return next(s for s in self.statuses if s["status"] == status)

    async def auth(self, key: str) -> list[dict]:
        return await self.request("auth", key)

    async def collect(self, seconds: float) -> list[dict]:
        """Read everything for ``seconds``; returns the data events received in that time."""
        start = len(self.events)
        with trio.move_on_after(seconds):
            try:
                while True:
                    await self.receive()
            except ConnectionClosed:
                pass
        return self.events[start:]

    async def wait_events(self, count: int, timeout: float = LIVENESS_SECONDS) -> list[dict]:
        """Read until ``count`` data events have come in all; returns every event so far."""
        with trio.fail_after(timeout):
            while len(self.events) < count:
                await self.receive()
        return self.events

    async def more_events(self, count: int, timeout: float = LIVENESS_SECONDS) -> list[dict]:
        """Read until ``count`` more data events have come; returns those."""
        start = len(self.events)
        await self.wait_events(start + count, timeout)
        return self.events[start:]

    async def close_code(self, timeout: float = LIVENESS_SECONDS) -> int:
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.receive()
            except ConnectionClosed as closed:
                return closed.reason.code


async def connect(nursery: trio.Nursery, port: int, path: str = "/stocks") -> Client:
    ws = await connect_websocket_url(nursery, f"ws://127.0.0.1:{port}{path}")
    client = Client(ws)
    greeting = await client.receive()
    assert greeting == [{"ev": "status", "status": "connected", "message": "Connected Successfully"}]
    return client


async def authed_client(nursery: trio.Nursery, port: int, key: str, subscribe: str | None = None) -> Client:
    client = await connect(nursery, port)
    assert (await client.auth(key))[0]["status"] == "auth_success"
    if subscribe:
        await client.send("subscribe", subscribe)
        while True:  # relayed upstream_* statuses may arrive first; the answer is what we want
            answer = [s for s in await client.next_status() if not s["status"].startswith("upstream_")]
            if answer:
                break
        assert all(status["status"] == "success" for status in answer), answer
    return client


_split_raw = msgspec.json.Decoder(list[msgspec.Raw]).decode


def raw_events(frames: list[str]) -> list[bytes]:
    """The data events of ``frames`` (JSON arrays; status frames skipped), each as the exact bytes
    it had in its frame: for checking that events arrive byte for byte however they were framed."""
    return [bytes(raw) for frame in frames if '"ev":"status"' not in frame for raw in _split_raw(frame)]


def selects(params: str, event: dict) -> bool:
    """A reference filter, written from docs/protocol.md's rules, independent of the proxy's code."""
    ev = event.get("ev")
    symbol = event.get({"LULD": "T", "NOI": "T", "V": "T"}.get(ev, "sym"))
    for channel in (item.strip() for item in params.split(",")):
        if channel == "*":
            return True
        ev_type, _, wanted = channel.partition(".")
        if ev_type == ev and isinstance(symbol, str) and wanted in ("*", symbol):
            return True
    return False


@attrs.define
class Neighbour:
    """A `*` client beside the trouble: it must see a gapless `q` sequence throughout.

    The firehose under it must hold :data:`ALL_STREAM`, so that every event carries `q`.
    """

    client: Client
    sequence: list[int] = attrs.field(factory=list)

    async def run(self) -> None:
        while True:
            for event in await self.client.receive():
                if "q" in event:
                    self.sequence.append(event["q"])

    async def wait_for_more(self, count: int = 50, timeout: float = LIVENESS_SECONDS) -> None:
        """Wait until ``count`` more events came: what was in flight during the trouble has arrived."""
        target = len(self.sequence) + count
        await wait_until(lambda: len(self.sequence) >= target, timeout, what=f"{count} more events for the neighbour")

    def assert_no_gap(self) -> None:
        assert len(self.sequence) > 100
        first = self.sequence[0]
        assert self.sequence == list(range(first, first + len(self.sequence))), "the neighbour saw a gap"


# --- raw clients: what a WebSocket library would not send ---------------------------------------


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def handshake(port: int, *, rcvbuf: int | None = None,
                    path: str = "/") -> tuple[trio.socket.SocketType, WSConnection]:
    """A raw socket that completed the WebSocket opening handshake, and its wsproto client."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    client = WSConnection(ConnectionType.CLIENT)
    await send_all(sock, client.send(Request(host="127.0.0.1", target=path)))
    with trio.fail_after(LIVENESS_SECONDS):
        while True:
            data = await sock.recv(65536)
            assert data, "the proxy closed during the handshake"
            client.receive_data(data)
            if any(isinstance(event, AcceptConnection) for event in client.events()):
                return sock, client


def masked(message: str | bytes) -> bytes:
    """One masked client frame, as a client would send it after the handshake."""
    framer = Connection(ConnectionType.CLIENT)  # open from the start: frames without a handshake
    event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
    return framer.send(event)


async def read_statuses(sock: trio.socket.SocketType, client: WSConnection, count: int) -> list[dict]:
    """The next ``count`` statuses the proxy sends (the 101 is parsed on the way)."""
    statuses: list[dict] = []
    with trio.fail_after(LIVENESS_SECONDS):
        while len(statuses) < count:
            for event in client.events():
                if isinstance(event, TextMessage):
                    statuses += [e for e in json.loads(event.data) if e.get("ev") == "status"]
                elif isinstance(event, CloseConnection):
                    raise AssertionError(f"closed {event.code} {event.reason!r} after {statuses}")
            if len(statuses) < count:
                data = await sock.recv(65536)
                assert data, f"connection closed after {statuses}"
                client.receive_data(data)
    return statuses


class SlowReader:
    """A client with a 4 KiB receive buffer that reads 1 KiB at a time, then (``fast``) all it can;
    one that has not started :meth:`run` reads nothing at all.

    Made by :meth:`subscribe`, which authenticates and subscribes over a raw socket: the kernel's
    buffers fill at once, where a library's client would take megabytes first.
    """

    def __init__(self, sock: trio.socket.SocketType, client: WSConnection) -> None:
        self.sock, self.client = sock, client
        self.sequence: list[int] = []  # q of every event received (T, Q and LULD carry one, gapless upstream)
        self.statuses: list[str] = []
        self.close_code: int | None = None
        self.fast = False
        self._parts: list[str] = []

    @classmethod
    async def subscribe(cls, port: int, key: str, params: str) -> SlowReader:
        sock, client = await handshake(port, rcvbuf=4096)
        await send_all(sock, masked(json.dumps({"action": "auth", "params": key}))
                       + masked(json.dumps({"action": "subscribe", "params": params})))
        return cls(sock, client)

    async def run(self) -> None:
        while self.close_code is None:
            data = await self.sock.recv(1 << 20 if self.fast else 1024)
            self.client.receive_data(data or None)
            for event in self.client.events():
                if isinstance(event, CloseConnection):
                    self.close_code = event.code
                elif isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        for item in json.loads("".join(self._parts)):
                            if "q" in item:
                                self.sequence.append(item["q"])
                            elif item.get("ev") == "status":
                                self.statuses.append(item["message"] if item["status"] == "success" else item["status"])
                        self._parts = []
            if not self.fast:
                await trio.sleep(0.02)


# --- fakes -------------------------------------------------------------------------------------


class FakeConnection:
    """What the Hub and a client's reader use of a :class:`~proxy.net.connection.WsConnection`.

    ``send_texts`` records what would be written; set ``backlogged`` to act as a socket the
    kernel stopped taking. Messages from the client are fed with :meth:`client_sends`;
    :meth:`client_leaves` ends them. ``pong_after`` (seconds, or None for a peer that vanished)
    says when a ping is answered: the answer moves ``last_received_at`` as a pong does,
    without being a message. Times are ``trio.current_time()``, so it runs under a MockClock.
    """

    def __init__(self, *, pong_after: float | None = 0.05) -> None:
        self.sent: list[str | bytes] = []
        self.backlogged = False
        self.open = True
        self.notify: Callable[[], None] = lambda: None
        self.pong_after = pong_after
        self.pings: list[float] = []
        self._received_at = trio.current_time()
        self._pongs_at: list[float] = []
        self._inbox_send, self._inbox = trio.open_memory_channel[str | bytes](100)

    # what the Hub uses
    def send_texts(self, texts: list[str | bytes]) -> int:
        if not self.open:
            return 0
        self.sent.extend(texts)
        return sum(len(text) for text in texts)

    # what the reader uses
    @property
    def last_received_at(self) -> float:
        now = trio.current_time()
        return max([self._received_at, *(at for at in self._pongs_at if at <= now)])

    def ping(self, payload: bytes) -> None:
        self.pings.append(trio.current_time())
        if self.pong_after is not None:
            self._pongs_at.append(trio.current_time() + self.pong_after)

    async def get_message(self) -> str | bytes:
        try:
            message = await self._inbox.receive()
        except trio.EndOfChannel:
            raise ServerConnectionClosed(1000, "the client left") from None
        self._received_at = trio.current_time()
        return message

    # what the test does
    def client_sends(self, message: str | bytes) -> None:
        self._inbox_send.send_nowait(message)

    def client_leaves(self) -> None:
        self._inbox_send.close()

    def sent_events(self) -> list[dict]:
        """Every event sent, parsed: statuses and data, in order."""
        return [event for text in self.sent for event in json.loads(text)]
