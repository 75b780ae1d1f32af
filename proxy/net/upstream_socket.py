"""The upstream link's WebSocket: websockets' sans-I/O client driven straight on a Trio stream, a read at a time.

The link's own task reads: each wake-up is one ``receive_some`` of up to ``receive_bytes``, the
protocol parses all of it, and every whole message it held comes back as one list
(:meth:`UpstreamSocket.get_messages`), which the link hands to the router as one batch. The
protocol is websockets' ``ClientProtocol`` (the opening handshake and its checks, masking,
fragments' order, control frames, answering pings and upstream's close, the bound on a message's
size, checked from a frame's header before its payload is read), not wsproto's: its frame parser
costs about a third of wsproto's per frame (docs/performance.md, "The upstream read"), and at one
event a frame wsproto's parser was half of the firehose's CPU. websockets' protocol does not check
that text is UTF-8 (its connection classes do when they decode), so this module decodes each text
message (in C): an invalid one closes the link with 1007, as wsproto did. Ours are the read loop,
pongs waking :meth:`UpstreamSocket.ping`, joining fragments and the close handshake's bound.
Writes come from several tasks (subscribes, pings, pongs, the close), so they take turns through
one lock and whole frames never interleave.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Sequence, cast

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import WebSocketURI

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


#: The protocol's logger. websockets logs every frame at debug, the auth message with our key among
#: them (and at one event a frame the lines would cost more than the parsing): pinned at info, so
#: that neither LOG_LEVEL nor LOG_LEVEL_LIBRARIES at debug brings those lines.
_protocol_log = logging.getLogger(__name__ + ".protocol")
_protocol_log.setLevel(logging.INFO)
#: A close frame's reason is at most 123 bytes (its payload, with the code, at most 125).
_CLOSE_REASON_BYTES = 120
_TEXT, _BINARY, _CONT, _PONG, _CLOSE = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG, Opcode.CLOSE


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
        #: websockets' protocol; its URI only makes the request line (open() sets the Host header).
        self._protocol: ClientProtocol | None = None
        self._send_lock = trio.Lock()
        #: Set while a write is under way: a write cut off (cancelled) leaves part of a frame on the
        #: wire, after which nothing more may be written, not even a close frame.
        self._writing = False
        self._parts: list[bytes | bytearray | memoryview] = []  # the fragments of the message being received
        self._text = False  # whether that message is text
        self._ready: list[str | bytes] = []  # whole messages read but not yet handed out
        #: Why reading is over (upstream's close, its framing error, a message too big), raised
        #: once the messages read before it have been handed out.
        self._ended: BaseException | None = None
        self._pings: list[trio.Event] = []  # our pings waiting for a pong

    # --- opening handshake ------------------------------------------------------------

    async def open(self, host: str, resource: str) -> None:
        """The opening handshake: our request, upstream's 101 (checked by websockets). Raises
        :class:`UpgradeRefused` for any other status, :class:`UpstreamClosed` if upstream leaves,
        :class:`UpstreamProtocolError` for an answer that is not a valid upgrade."""
        protocol = self._protocol = ClientProtocol(
            WebSocketURI(secure=False, host=host, port=80, path=resource, query=""),
            max_size=self.max_message_bytes, logger=_protocol_log)
        request = protocol.connect()
        del request.headers["Host"]
        request.headers["Host"] = host  # as given ("name" or "name:port"), whatever the scheme's port
        protocol.send_request(request)
        await self._write(b"".join(protocol.data_to_send()))
        while True:
            data = await self._receive()
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()  # a refusal's body may run to the end of the stream
            events = protocol.events_received()
            for index, event in enumerate(events):
                if isinstance(event, Response):
                    if event.status_code != 101:
                        raise UpgradeRefused(event.status_code, bytes(event.body or b""))  # (None in websockets 13 for a 204)
                    if protocol.handshake_exc is not None:  # a 101 without the right headers
                        raise UpstreamProtocolError(
                            f"upstream's answer to the WebSocket upgrade is not valid: {protocol.handshake_exc}")
                    # Frames that came with the 101 were parsed with it: the first read hands them out.
                    await self._parse(self._ready, events[index + 1:])
                    return
            if not data:
                raise UpstreamClosed(CloseReason.ABNORMAL_CLOSURE, "connection closed during the opening handshake")
            if protocol.handshake_exc is not None:  # not HTTP, or a body over websockets' bound
                error = protocol.handshake_exc
                cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
                raise UpstreamProtocolError(f"upstream's answer to the WebSocket upgrade is not valid: {error}{cause}")

    # --- receiving ----------------------------------------------------------------

    async def get_messages(self) -> list[str | bytes]:
        """Every whole message one read brings, at least one (text as ``str``, binary as ``bytes``),
        in order; reads again only when none is complete. Answers pings on the way. Raises
        :class:`UpstreamClosed` or :class:`UpstreamProtocolError` once the messages before the end
        have been handed out."""
        protocol = self._protocol
        assert protocol is not None and protocol.state is not State.CONNECTING, "open() first"
        messages, self._ready = self._ready, []
        while True:
            if messages:
                return messages
            if self._ended is not None:
                raise self._ended
            data = await self._receive()
            if not data:
                self._ended = UpstreamClosed(CloseReason.ABNORMAL_CLOSURE, "connection lost without a close frame")
                raise self._ended
            protocol.receive_data(data)
            await self._parse(messages, protocol.events_received())

    async def get_message(self) -> str | bytes:
        """The next whole message; those read with it wait for the next call of either getter."""
        messages = await self.get_messages()
        self._ready = messages[1:]
        return messages[0]

    async def _parse(self, messages: list[str | bytes], events: Sequence[object]) -> None:
        """Append the whole messages among ``events`` (the protocol's frames) to ``messages``; note
        where reading ends; write what the protocol queued (its answers to pings and to a close)."""
        protocol = self._protocol
        assert protocol is not None
        parts = self._parts
        for frame in cast("Sequence[Frame]", events):  # once open, the protocol yields only frames
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                if frame.fin and not parts:  # the usual case: a whole message in one frame
                    if opcode is _BINARY:
                        messages.append(bytes(frame.data))
                        continue
                    try:
                        # websockets' protocol leaves UTF-8 to us; its frames hold a bytearray, and
                        # its decode() (0.14 µs for 106 bytes) is quicker than str(data, "utf-8")
                        messages.append(frame.data.decode())  # type: ignore[union-attr]
                    except UnicodeDecodeError as error:
                        self._fail_invalid_text(error)
                        break
                    continue
                # fragments: the protocol checks their order and their total against max_size
                if opcode is not _CONT:
                    self._text = opcode is _TEXT
                parts.append(frame.data)
                if frame.fin:
                    whole = b"".join(parts)
                    parts.clear()
                    if not self._text:
                        messages.append(whole)
                        continue
                    try:
                        messages.append(str(whole, "utf-8"))
                    except UnicodeDecodeError as error:
                        self._fail_invalid_text(error)
                        break
            elif opcode is _PONG:
                pings, self._pings = self._pings, []
                for answered in pings:
                    answered.set()
            elif opcode is _CLOSE:  # the protocol queued its answer; nothing is parsed after it
                close = protocol.close_rcvd
                assert close is not None
                self._ended = UpstreamClosed(close.code, close.reason)
                break
            # a ping: the protocol queued its pong
        if self._ended is None and protocol.parser_exc is not None:
            # upstream's framing error or a message too big: the protocol queued its close frame
            # (1002, 1007 for a close reason not UTF-8, 1009) and parses nothing more
            failure = protocol.parser_exc
            self._parts.clear()
            if isinstance(failure, PayloadTooBig):
                self._ended = self._too_big()
            else:
                code = protocol.close_sent.code if protocol.close_sent is not None else CloseReason.PROTOCOL_ERROR
                self._ended = UpstreamProtocolError(f"upstream broke the WebSocket protocol ({int(code)}: {failure})")
        queued = protocol.data_to_send()
        if queued:
            async with self._send_lock:
                await self._write_all(queued)

    def _too_big(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"upstream sent a message over {self.max_message_bytes} bytes")

    def _fail_invalid_text(self, error: UnicodeDecodeError) -> None:
        """A text message that is not UTF-8: the link ends with 1007, as RFC 6455 §8.1 says."""
        assert self._protocol is not None
        code = CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._ended = UpstreamProtocolError(f"upstream broke the WebSocket protocol ({int(code)}: {error})")
        self._parts.clear()
        self._protocol.fail(code, _close_reason(str(self._ended)))

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
        return self._protocol is not None and self._protocol.state is State.OPEN and not self._writing

    async def send_message(self, text: str) -> None:
        """One text message. Once the WebSocket is closing nothing is sent: the reader raises why."""
        async with self._send_lock:
            if self.open_for_sending:
                assert self._protocol is not None
                self._protocol.send_text(text.encode())
                await self._write_all(self._protocol.data_to_send())

    async def ping(self, payload: bytes) -> None:
        """Send a ping; return when a pong comes (any pong: one may answer several pings)."""
        answered = trio.Event()
        self._pings.append(answered)
        async with self._send_lock:
            if self.open_for_sending:
                assert self._protocol is not None
                self._protocol.send_ping(payload)
                await self._write_all(self._protocol.data_to_send())
        await answered.wait()

    async def _write_all(self, queued: list[bytes]) -> None:
        """Write frames the protocol queued, in order; the caller holds the lock. After a write
        cut off nothing more may go out, so they are dropped then."""
        # (an empty bytes is websockets' sign to half-close the stream: the link closes it whole)
        data = b"".join(queued)
        if data and not self._writing:
            await self._write(data)

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
            protocol = self._protocol
            if self.open_for_sending:
                async with self._send_lock:
                    assert protocol is not None
                    if self.open_for_sending:
                        protocol.send_close(code, _close_reason(reason))
                        await self._write_all(protocol.data_to_send())
            # its answer, or its framing error (the protocol then parses nothing more): nothing more
            # to read either way; data frames are dropped as they are parsed, so nothing piles up
            while (protocol is not None and protocol.close_sent is not None and protocol.close_rcvd is None
                   and protocol.parser_exc is None and self._ended is None):
                data = await self.stream.receive_some(self.receive_bytes)
                if not data:
                    break
                protocol.receive_data(data)
                protocol.events_received()
            await self.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)  # at once if cancelled; a no-op if closed above


def _close_reason(text: str) -> str:
    """``text`` cut to what a close frame holds, on a character's boundary."""
    return text.encode()[:_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
