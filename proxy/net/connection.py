"""One server-side WebSocket connection whose writes never wait: wsproto framing straight to the socket.

A tier sends one WebSocket message per client per upstream frame. Through an
async send (trio-websocket, or websockets' Trio implementation) each message
cost about 60 µs of CPU under load, in locks, checkpoints and a task switch per
client, where framing it and the system call cost about 8 µs
(docs/performance.md). So here the router writes each client's frame into the
client's socket at once, synchronously, while the kernel's buffer has room
(:meth:`WsConnection.send_texts`). What the kernel does not take waits, in
order, in the connection's backlog, which the session's own writer task drains
as the socket becomes writable (:meth:`WsConnection.drain`); while a backlog
exists nothing more is written past it. The protocol (the opening handshake's
checks, parsing what clients send, ping, close handshake, UTF-8 checks) is
wsproto's, and so is every frame we send but data: see :func:`text_frame`; h11
reads the handshake's HTTP request and writes refusals. TLS connections go
through :class:`trio.SSLStream`, where every write takes the writer's path.

What a client sends costs bounded memory: h11 refuses a request head over 16
KiB, a message over ``max_message_bytes`` is closed 1009 (wsproto hands data
frames on in pieces, so a frame's declared length costs nothing), one pong at
most waits for a client that does not read, and after our close at most one
message's worth more is read, never into a parser that failed.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable, Iterable

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError as WsprotoProtocolError, RemoteProtocolError

from ..core.errors import CloseReason, WebSocketClosed
from .frames import text_frame
from .transport import RECEIVE_BYTES, Transport

__all__ = ["WsConnection"]



class WsConnection:
    """One server-side WebSocket: handshake, messages in, frames out now or from the backlog.

    ``notify`` is called whenever a write leaves bytes in the backlog, so that
    the owner's writer task wakes to :meth:`drain` it.
    """

    def __init__(
        self, transport: Transport, *, max_message_bytes: int,
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self.transport = transport
        self.max_message_bytes = max_message_bytes
        self.notify = notify
        #: The body of the 400 that a plain HTTP request gets: what this port is for.
        self.plain_http_body = b"this port speaks WebSocket; connect with a WebSocket client\n"
        self._ws = WSConnection(ConnectionType.SERVER)
        #: Reads the opening handshake; None once it is answered. h11 refuses a request head over 16 KiB.
        self._http: h11.Connection | None = h11.Connection(h11.SERVER, max_incomplete_event_size=16_384)
        self._backlog = bytearray()
        self._parts: list = []  # the fragments of the message being received (str, or bytes)
        self._message_size = 0
        self._peer_closed = False
        self._parser_failed = False
        self._pending_pong: bytes | None = None  # the latest ping's payload, while a backlog delays its pong
        #: The close code of the close handshake (ours or the peer's), 1006 if the peer vanished.
        self.close_code: int | None = None
        self.close_reason = ""
        self.broken: OSError | None = None
        #: When bytes last came from the peer (trio.current_time()); a pong counts like anything else.
        self.last_received_at = trio.current_time()

    # --- opening handshake ------------------------------------------------------------

    async def read_request(self) -> Request:
        """The client's opening handshake; WebSocketClosed if it sends something else or leaves.

        h11 reads the HTTP request and wsproto checks that it asks for a
        WebSocket (``initiate_upgrade_connection``, its API for a request
        parsed elsewhere). Reading it ourselves keeps what arrived after the
        request: a client may send its first frames without waiting for our
        101, and wsproto's own handshake drops whatever its h11 read past the
        request. :meth:`accept` hands those bytes on.
        """
        assert self._http is not None, "read_request is called once"
        http = self._http
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as error:  # not HTTP, headers over h11's 16 KiB, and the like
                self._reply(error.error_status_hint, f"bad HTTP request: {error}\n".encode())
                raise WebSocketClosed(reason=f"not a WebSocket handshake: {error}") from None
            if isinstance(event, h11.Request):
                break
            if event is not h11.NEED_DATA:
                raise WebSocketClosed(reason="connection closed during the handshake")
            try:
                data = await self.transport.receive_some()
            except OSError as error:
                raise WebSocketClosed(reason=f"connection failed during the handshake: {error}") from None
            if not data:
                raise WebSocketClosed(reason="connection closed during the handshake")
            http.receive_data(data)
        if event.method != b"GET" or not self._request_ended(http):
            # wsproto would check the method, but initiate_upgrade_connection assumes GET; and bytes of a
            # body must not be taken for frames.
            self._reply(400, b"a WebSocket opening handshake is a GET without a body\n")
            raise WebSocketClosed(reason="not a WebSocket handshake: not a GET without a body")
        try:
            self._ws.initiate_upgrade_connection(list(event.headers), event.target)
        except RemoteProtocolError as error:  # not an upgrade, no key, version not 13 (426), ...
            hint = error.event_hint
            if isinstance(hint, RejectConnection):  # a plain HTTP request, for one: say what this port is
                self._reply(hint.status_code, f"{error}: ".encode() + self.plain_http_body, hint.headers)
            raise WebSocketClosed(reason=f"not a WebSocket handshake: {error}") from None
        return next(event for event in self._ws.events() if isinstance(event, Request))

    def accept(self) -> None:
        """Answer 101, then take the frames that came with the request as if just received."""
        assert self._http is not None
        pipelined, _ = self._http.trailing_data
        self._http = None  # and with it the bytes it buffered
        self._write(self._ws.send(AcceptConnection()))
        if pipelined:
            self._ws.receive_data(pipelined)  # get_message parses what wsproto holds before it reads

    def reject(self, status_code: int, body: bytes) -> None:
        """Refuse the WebSocket with an HTTP error (after :meth:`read_request`); ``body`` is plain text."""
        self._reply(status_code, body)

    @staticmethod
    def _request_ended(http: h11.Connection) -> bool:
        try:
            return isinstance(http.next_event(), h11.EndOfMessage)  # at once, for a request without a body
        except h11.RemoteProtocolError:
            return False

    def _reply(self, status_code: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """An HTTP error response, with its reason phrase (wsproto's have none), that ends the connection."""
        http, self._http = self._http, None
        if http is None:
            return
        try:
            reason = HTTPStatus(status_code).phrase.encode()
        except ValueError:
            reason = b""
        all_headers = [*headers, (b"content-type", b"text/plain; charset=utf-8"),
                       (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
        try:
            data = http.send(h11.Response(status_code=status_code, reason=reason, headers=all_headers))
            data += http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return  # h11 cannot answer in this state; closing says enough
        self._write(data)

    # --- sending ------------------------------------------------------------------

    @property
    def backlogged(self) -> bool:
        """True while earlier bytes (or a pong) wait for the kernel, or the connection broke: add nothing now."""
        return bool(self._backlog) or self._pending_pong is not None or self.broken is not None

    @property
    def open(self) -> bool:
        """True while frames may be sent: the WebSocket is open and the socket not broken."""
        return self._ws.state is ConnectionState.OPEN and self.broken is None

    def send_texts(self, texts: Iterable[str | bytes]) -> int:
        """Frame each text as one text message and write them now, as far as the kernel takes them.

        Returns the payload bytes framed (0 once the WebSocket is closing: data
        after a close frame would break the protocol, so it is not sent).
        """
        if not self.open:
            return 0
        size, frames = 0, []
        for text in texts:
            payload = text.encode() if isinstance(text, str) else text
            size += len(payload)
            frames.append(text_frame(payload))
        self._write(frames[0] if len(frames) == 1 else b"".join(frames))
        return size

    def send_text(self, payload: bytes) -> bool:
        """One text message of UTF-8 bytes, written now; True if everything so far went to the kernel at once.

        :meth:`send_texts` for one message with less work per call (the
        simulator writes one frame per event). False means bytes wait in the
        backlog (the socket is backed up), or the WebSocket is no longer
        :attr:`open`, when nothing was sent.
        """
        if self._ws.state is not ConnectionState.OPEN or self.broken is not None:
            return False
        self._write(text_frame(payload))
        return not self._backlog and self._pending_pong is None and self.broken is None

    def _write(self, data: bytes) -> None:
        if self.broken is not None:
            return
        if not self._backlog:
            try:
                sent = self.transport.try_send(data)
            except OSError as error:
                self.broken = error
                self.notify()
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._backlog += data
        self.notify()

    async def drain(self) -> None:
        """Wait until the kernel took every byte written so far; WebSocketClosed if it cannot."""
        await trio.lowlevel.checkpoint()
        while self.broken is None and (self._backlog or self._pending_pong is not None):
            if self._backlog:
                try:
                    await self.transport.drain(self._backlog)
                except OSError as error:
                    self.broken = error
                    break
            if self._pending_pong is not None:
                payload, self._pending_pong = self._pending_pong, None
                if self._ws.state is ConnectionState.OPEN:  # never after our close frame
                    self._write(self._ws.send(Pong(payload=payload)))
        if self.broken is not None:
            self.close_code = self.close_code or CloseReason.ABNORMAL_CLOSURE
            raise WebSocketClosed(self.close_code, f"connection broken: {self.broken}")

    # --- receiving ----------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next whole message from the client; answers pings; WebSocketClosed at the end."""
        while True:
            for event in self._ws.events():
                message = self._take(event)
                if message is not None:
                    return message
            if self.close_code is not None or self.broken is not None:
                raise WebSocketClosed(self.close_code, self.close_reason)
            try:
                data = await self.transport.receive_some()
            except OSError:
                data = b""
            if not data:
                self._peer_closed = True
                if self.close_code is None:
                    self.close_code, self.close_reason = CloseReason.ABNORMAL_CLOSURE, "connection lost without a close frame"
                raise WebSocketClosed(self.close_code, self.close_reason)
            self.last_received_at = trio.current_time()
            self._ws.receive_data(data)

    def ping(self, payload: bytes) -> None:
        """Send a ping now (behind anything queued); its pong, like any bytes, moves ``last_received_at``."""
        if self.open:
            self._write(self._ws.send(Ping(payload=payload)))

    def _take(self, event: object) -> str | bytes | None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self._message_size += len(event.data)
            if self._message_size > self.max_message_bytes:
                self._close_now(CloseReason.MESSAGE_TOO_BIG, f"message over {self.max_message_bytes} bytes")
                return None
            self._parts.append(event.data)
            if event.message_finished:
                joiner = "" if isinstance(event, TextMessage) else b""
                message = joiner.join(self._parts)
                self._parts, self._message_size = [], 0
                return message
        elif isinstance(event, Ping):
            self._answer_ping(event.payload)
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.OPEN:
                # Not a close frame (that would have moved the state on) but the peer's framing error, as
                # wsproto reports it; its parser is dead from here and must not be fed again.
                self._parser_failed = True
                self._close_now(event.code, event.reason or "")
            else:
                self._peer_closed = True  # the peer's close, or its answer to ours
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._write(self._ws.send(event.response()))
                if self.close_code is None:
                    self.close_code, self.close_reason = event.code, event.reason or ""
        return None

    def _answer_ping(self, payload: bytes) -> None:
        """Pong now, unless earlier bytes still wait for the kernel: then keep only this ping's payload.

        RFC 6455 §5.5.3 lets a pong answer only the most recent ping, so a
        client that pings without reading costs one pong, not one per ping
        (a million pings queued 80-130 MB of them). :meth:`drain` sends the
        pong once the backlog before it is gone.
        """
        if self._ws.state is not ConnectionState.OPEN:
            return
        if self._backlog or self.broken is not None:
            self._pending_pong = payload
            self.notify()
        else:
            self._write(self._ws.send(Pong(payload=payload)))

    def _close_now(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    # --- closing ------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """The close handshake, bounded by ``timeout``: our close frame after everything queued, the
        peer's answer, then the TCP close. Call it once no other task reads this connection."""
        self._close_now(code, reason)
        with trio.move_on_after(timeout):
            try:
                await self.drain()
                self.transport.shutdown_write()
                await self._read_to_peer_close()
            except (WebSocketClosed, OSError, WsprotoProtocolError):
                pass  # gone, or past talking to
        await self.transport.aclose()

    async def _read_to_peer_close(self) -> None:
        """Read to the peer's close frame or EOF, so that ours is not lost to a reset; a bounded amount.

        A client with a message in flight when we closed sends at most
        ``max_message_bytes`` more; past that (plus one read) it is flooding,
        and gets the reset. What is read goes through wsproto only while its
        parser works: after a framing error wsproto parses nothing more but
        still appends every byte fed to its buffer (that held 550 MB of
        random bytes in 2 s), and a connection that never opened has nothing
        to parse. Dropped bytes cost one read each and no memory.
        """
        parse = self._ws.state is ConnectionState.LOCAL_CLOSING and not self._parser_failed
        budget = self.max_message_bytes + RECEIVE_BYTES
        while not self._peer_closed and budget > 0:
            data = await self.transport.receive_some()
            if not data:
                return
            budget -= len(data)
            if parse:
                self._ws.receive_data(data)
                for event in self._ws.events():  # data frames come out in pieces as they arrive: nothing piles up
                    if isinstance(event, CloseConnection):
                        self._peer_closed = True  # its answer (or a framing error: nothing more to read then either)
