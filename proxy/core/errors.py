"""Every error this package raises on purpose, under one base class, and a flattener for Trio's groups.

Each error says what went wrong in words a user or an operator can act on.
Errors about a client's connection carry the WebSocket close code to send (as
h11's errors carry the HTTP status to answer with); close codes come from one
enum, wsproto's :class:`~wsproto.frame_protocol.CloseReason`. :func:`leaves`
yields the errors inside Trio's (possibly nested) exception groups.
"""

from __future__ import annotations

from typing import Iterator

from wsproto.frame_protocol import CloseReason

__all__ = [
    "ClientMessageError",
    "CloseReason",
    "ConfigError",
    "FrameError",
    "JournalDamaged",
    "JournalFormatError",
    "JournalLocked",
    "ProxyError",
    "SeqEvicted",
    "UpstreamProtocolError",
    "UpstreamRefused",
    "WebSocketClosed",
    "leaves",
]


class ProxyError(Exception):
    """The base of every error this package raises on purpose."""


class ConfigError(ProxyError, ValueError):
    """One configuration variable is wrong; the message names it and says what is wrong."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"configuration error: {variable}: {problem}")
        self.variable = variable


class ClientMessageError(ProxyError, ValueError):
    """A client's control message or channel that breaks the protocol; ``kind`` names the case.

    ``close_code`` is the close the connection should get, or None when an
    ``error`` status is the whole answer and the client stays connected (the
    usual case: Polygon answers a bad message and keeps the connection).
    """

    def __init__(self, kind: str, message: str, close_code: CloseReason | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.close_code = close_code


class FrameError(ProxyError, ValueError):
    """An upstream frame that is not a JSON array of objects."""


class WebSocketClosed(ProxyError):
    """A client's WebSocket is closed or its connection is gone; ``code`` says how, when known."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class UpstreamRefused(ProxyError):
    """Upstream answered auth with something other than ``auth_success`` (``status`` says what)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        #: Upstream's own words (Polygon: "Your plan doesn't include websocket access.").
        self.message = message


class UpstreamProtocolError(ProxyError):
    """Upstream said something the protocol does not allow at that point, or fell silent."""


class JournalFormatError(ProxyError, ValueError):
    """Bytes that are not what the journal format says. ``kind`` names the check that failed,
    ``offset`` is where in the segment it failed.

    Kinds: ``truncated`` (the bytes end early: a torn write when at the end of the
    last segment), ``bad_magic``, ``header_checksum``, ``bad_header``,
    ``payload_checksum``, ``bad_payload``, ``segment_header``.
    """

    def __init__(self, kind: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.offset = offset
        self.message = message


class SeqEvicted(ProxyError, LookupError):
    """The journal seq asked for has already left the memory ring (or never reached it)."""


class JournalLocked(ProxyError, OSError):
    """Another process holds the journal directory's lock: it is writing there."""


class JournalDamaged(ProxyError):
    """A journal being replayed holds damage (not a torn tail at its very end); the message
    names the segment, the bytes, what failed and the seqs lost, as ``verify`` reports it."""


def leaves(raised: BaseException) -> Iterator[BaseException]:
    """Every exception in ``raised``, groups flattened, in order; a plain exception yields itself."""
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            yield from leaves(inner)
    else:
        yield raised
