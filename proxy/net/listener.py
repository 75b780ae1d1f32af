"""The clients' listener: accept on each listening socket, give every connection its task and transport.

Accept failures are handled by :mod:`proxy.net.accepting` (one log line per
episode, shedding the oldest unauthenticated connection when descriptors run
out); each accepted socket becomes a :class:`~proxy.net.connection.WsConnection`
over a plain or TLS transport, owned by the handler until it returns.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Callable

import trio

from .accepting import AcceptTrouble, PendingConnections, accept_forever
from .connection import WsConnection
from .transport import SocketTransport, StreamTransport, Transport

__all__ = ["accept_connections"]

log = logging.getLogger(__name__)


async def accept_connections(
    listener: socket.socket,
    handler: Callable[[WsConnection, str], object],
    *,
    max_message_bytes: int,
    tls_context: ssl.SSLContext | None = None,
    pending: PendingConnections | None = None,
) -> None:
    """Accept forever on ``listener``, running ``handler(connection, peer)`` in a task per client.

    The handler owns the connection; the socket is closed when it returns.
    Each connection is in ``pending`` from its accept until the handler
    discards it (once authenticated); when accept fails for want of
    descriptors, the oldest there is closed to make room (:mod:`proxy.accepting`).
    """
    pending = PendingConnections() if pending is None else pending
    trouble = AcceptTrouble(f"client listener {_peer(listener.getsockname())}", log)
    async with trio.open_nursery() as nursery:

        def start(sock: socket.socket, address: object) -> None:
            nursery.start_soon(_own_connection, sock, address, handler, max_message_bytes, tls_context, pending)

        try:
            await accept_forever(listener, start, trouble, pending)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()


async def _own_connection(
    sock: socket.socket, address: object, handler: Callable[[WsConnection, str], object],
    max_message_bytes: int, tls_context: ssl.SSLContext | None, pending: PendingConnections,
) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are already batched: send now
    transport: Transport
    if tls_context is None:
        transport = SocketTransport(sock)
    else:
        transport = StreamTransport(
            trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), tls_context, server_side=True)
        )
    connection = WsConnection(transport, max_message_bytes=max_message_bytes)
    try:
        with trio.CancelScope() as scope:  # cancelled if the connection is shed
            pending.add(connection, scope)
            await handler(connection, _peer(address))  # type: ignore[misc]
    except Exception:  # a bug in one connection must not end the accept loop for everyone
        log.exception("connection from %s failed; other clients are unaffected", _peer(address))
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        pending.closed(connection)


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
