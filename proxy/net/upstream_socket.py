"""The upstream link's WebSocket: wsproto's client driven straight on a Trio stream, a read at a time.

The link used to read through trio-websocket: a reader task of its own, a queue, and a
``get_message`` with its task switch per frame, about 66 µs of CPU a frame when frames pile
up (docs/performance.md, "The upstream read"). Here the link's own task reads: each wake-up
is one ``receive_some`` of up to ``receive_bytes``, wsproto parses all of it, and every whole
message it held comes back as one list (:meth:`UpstreamSocket.get_messages`), which the link
hands to the router as one batch. The protocol is wsproto's (the opening handshake and its
checks, masking, UTF-8 checks of text, fragments, control frames); ours are the read loop,
answering pings, pongs waking :meth:`UpstreamSocket.ping`, the bound on a message's size and
the close handshake. Writes come from several tasks (subscribes, pings, pongs, the close),
so they take turns through one lock and whole frames never interleave.
"""

from __future__ import annotations

from http import HTTPStatus

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from ..core.errors import CloseReason, ProxyError, UpstreamProtocolError
from .transport import describe_error

__all__ = [
    "MAX_MESSAGE_BYTES",
    "RECEIVE_BYTES",
    "UpgradeRefused",
    "UpstreamClosed",
    "UpstreamSocket",
]

#: The largest message taken from upstream (one frame of a busy market is well under 1 MiB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Bytes asked for per read: at 100-byte frames, a read that finds frames piled up takes ~2,000.
RECEIVE_BYTES = 256 * 1024
#: How much of a refusal's body its error quotes.
_BODY_QUOTED = 200


class UpstreamClosed(ProxyError):
    """Upstream ended the WebSocket: its close frame's code and reason, or 1006 (abnormal
    closure) when the connection ended or broke without one."""

    def __init__(self, code: int, reason: str = "") -> None:
        try:
            name = f" {CloseReason(code).name}"
        except ValueError:
            name = ""
        super().__init__(f"connection closed ({code}{name})" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class UpgradeRefused(ProxyError):
    """Upstream answered the opening handshake with an HTTP status, not with 101 (a wrong path's
    404, a proxy's 502, ...); the message says which, and quotes the start of the body."""

    def __init__(self, status_code: int, body: bytes) -> None:
        try:
            phrase = f" {HTTPStatus(status_code).phrase}"
        except ValueError:
            phrase = ""
        text = body[:_BODY_QUOTED].decode("utf-8", "replace").strip()
        super().__init__(f"upstream refused the WebSocket upgrade: HTTP {status_code}{phrase}"
                         + (f": {text}" if text else ""))
        self.status_code = status_code
        self.body = body


class UpstreamSocket:
    """A client WebSocket on ``stream`` (a TCP stream, or a :class:`trio.SSLStream` whose TLS
    handshake is done): :meth:`open` it, then one task reads with :meth:`get_messages` (or
    :meth:`get_message`) while others :meth:`send_message` and :meth:`ping`; :meth:`aclose` once
    nobody reads any more."""

    def __init__(self, stream: trio.abc.Stream, *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 receive_bytes: int = RECEIVE_BYTES) -> None:
        self.stream = stream
        self.max_message_bytes = max_message_bytes
        self.receive_bytes = receive_bytes
        self._handshake = WSConnection(ConnectionType.CLIENT)
        self._ws: Connection | None = None  # wsproto's frame-level connection, once upgraded
        self._send_lock = trio.Lock()
        #: Set while a write is under way: a write cut off (cancelled) leaves part of a frame on the
        #: wire, after which nothing more may be written, not even a close frame.
        self._writing = False
        self._parts: list[str | bytes] = []  # the fragments of the message being received
        self._message_size = 0
        self._ready: list[str | bytes] = []  # whole messages read but not yet handed out
        #: Why reading is over (upstream's close, its framing error, a message too big), raised
        #: once the messages read before it have been handed out.
        self._ended: BaseException | None = None
        self._pings: list[trio.Event] = []  # our pings waiting for a pong

    # --- opening handshake ------------------------------------------------------------

    async def open(self, host: str, resource: str) -> None:
        """The opening handshake: our request, upstream's 101 (checked by wsproto). Raises
        :class:`UpgradeRefused` for any other answer, :class:`UpstreamClosed` if upstream leaves."""
        await self._write(self._handshake.send(Request(host=host, target=resource)))
        refused: RejectConnection | None = None
        body = b""
        while True:
            data = await self._receive()
            self._handshake.receive_data(data)  # empty: the end of the stream
            for event in self._handshake.events():
                if isinstance(event, AcceptConnection):
                    # Frames that came with the 101 wait in wsproto; the first read parses them.
                    self._ws = self._handshake.connection
                    return
                if isinstance(event, RejectConnection):
                    refused = event
                    if not event.has_body:
                        raise UpgradeRefused(event.status_code, b"")
                elif isinstance(event, RejectData) and refused is not None:
                    body = (body + event.data)[:_BODY_QUOTED]
                    if event.body_finished:
                        raise UpgradeRefused(refused.status_code, body)
            if not data:
                if refused is not None:
                    raise UpgradeRefused(refused.status_code, body)
                raise UpstreamClosed(CloseReason.ABNORMAL_CLOSURE, "connection closed during the opening handshake")

    # --- receiving ----------------------------------------------------------------

    async def get_messages(self) -> list[str | bytes]:
        """Every whole message one read brings, at least one (text as ``str``, binary as ``bytes``),
        in order; reads again only when none is complete. Answers pings on the way. Raises
        :class:`UpstreamClosed` or :class:`UpstreamProtocolError` once the messages before the end
        have been handed out."""
        assert self._ws is not None, "open() first"
        messages, self._ready = self._ready, []
        while True:
            if not messages and self._ended is None:
                await self._parse(messages)
            if messages:
                return messages
            if self._ended is not None:
                raise self._ended
            data = await self._receive()
            if not data:
                self._ended = UpstreamClosed(CloseReason.ABNORMAL_CLOSURE, "connection lost without a close frame")
                raise self._ended
            self._ws.receive_data(data)

    async def get_message(self) -> str | bytes:
        """The next whole message; those read with it wait for the next call of either getter."""
        messages = await self.get_messages()
        self._ready = messages[1:]
        return messages[0]

    async def _parse(self, messages: list[str | bytes]) -> None:
        """Append every whole message wsproto holds to ``messages``; answer the latest ping (RFC
        6455 §5.5.3 lets one pong answer the pings before it); note where reading ends."""
        assert self._ws is not None
        pong: Pong | None = None
        parts = self._parts
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                data = event.data if isinstance(event, TextMessage) else bytes(event.data)
                if event.message_finished and not parts:  # the usual case: a whole message in one frame
                    if len(data) > self.max_message_bytes:
                        await self._fail(CloseReason.MESSAGE_TOO_BIG, self._too_big())
                        return
                    messages.append(data)
                    continue
                self._message_size += len(data)
                if self._message_size > self.max_message_bytes:
                    await self._fail(CloseReason.MESSAGE_TOO_BIG, self._too_big())
                    return
                parts.append(data)
                if event.message_finished:
                    messages.append("".join(parts) if isinstance(event, TextMessage) else b"".join(parts))  # type: ignore[arg-type]
                    parts.clear()
                    self._message_size = 0
            elif isinstance(event, Ping):
                pong = event.response()
            elif isinstance(event, Pong):
                pings, self._pings = self._pings, []
                for answered in pings:
                    answered.set()
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.OPEN:
                    # Not a close frame (that moves the state on) but upstream's framing error, as
                    # wsproto reports it; its parser is dead from here.
                    await self._fail(event.code, UpstreamProtocolError(
                        f"upstream broke the WebSocket protocol ({event.code}: {event.reason})"))
                    return
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_event(event.response())
                self._ended = UpstreamClosed(event.code, event.reason or "")
                return
        if pong is not None:
            await self._send_event(pong)

    def _too_big(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"upstream sent a message over {self.max_message_bytes} bytes")

    async def _fail(self, code: int, error: BaseException) -> None:
        self._ended = error
        self._parts.clear()
        await self._send_event(CloseConnection(code=code, reason=str(error)[:120]))

    async def _receive(self) -> bytes:
        """The next bytes (empty at the end); a broken connection is an :class:`UpstreamClosed` 1006."""
        try:
            data = await self.stream.receive_some(self.receive_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise UpstreamClosed(CloseReason.ABNORMAL_CLOSURE, describe_error(error)) from error
        return data if isinstance(data, bytes) else bytes(data)  # TLS reads give a bytearray

    # --- sending ------------------------------------------------------------------

    @property
    def open_for_sending(self) -> bool:
        """True while messages may go out: upgraded, no close frame sent or answered, no write cut off."""
        return self._ws is not None and self._ws.state is ConnectionState.OPEN and not self._writing

    async def send_message(self, text: str) -> None:
        """One text message. Once the WebSocket is closing nothing is sent: the reader raises why."""
        await self._send_event(TextMessage(data=text))

    async def ping(self, payload: bytes) -> None:
        """Send a ping; return when a pong comes (any pong: one may answer several pings)."""
        answered = trio.Event()
        self._pings.append(answered)
        await self._send_event(Ping(payload=payload))
        await answered.wait()

    async def _send_event(self, event: Event) -> None:
        async with self._send_lock:  # frames are made in the order they go out
            if not self.open_for_sending:
                if not isinstance(event, CloseConnection) or self._ws is None or self._writing:
                    return
                if self._ws.state is not ConnectionState.REMOTE_CLOSING:
                    return
            assert self._ws is not None
            await self._write(self._ws.send(event))

    async def _write(self, data: bytes) -> None:
        self._writing = True  # stays set if the write is cut off: the stream holds part of a frame
        await self.stream.send_all(data)
        self._writing = False

    # --- closing ------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """The close handshake (our close frame, upstream's answer), then the stream's close. Call it
        once no other task reads, under a timeout: it waits as long as upstream takes to answer. What
        upstream sends meanwhile is dropped. Never raises for a connection already gone."""
        try:
            if self.open_for_sending:
                async with self._send_lock:
                    assert self._ws is not None
                    await self._write(self._ws.send(CloseConnection(code=code, reason=reason or None)))
            ws, answered = self._ws, False
            while ws is not None and ws.state is ConnectionState.LOCAL_CLOSING and self._ended is None and not answered:
                data = await self.stream.receive_some(self.receive_bytes)
                if not data:
                    break
                ws.receive_data(bytes(data))
                # its answer, or its framing error (wsproto's parser is dead then): nothing more to read
                # either way; data frames come out as they are parsed, so nothing piles up
                answered = any(isinstance(event, CloseConnection) for event in ws.events())
            await self.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)  # at once if cancelled; a no-op if closed above
