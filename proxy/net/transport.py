"""How a client connection's bytes move: a non-blocking socket written synchronously, or a TLS stream.

:class:`SocketTransport` lets the router's writes complete at once when the
kernel has room (``try_send``), and waits with ``trio.lowlevel`` otherwise;
:class:`StreamTransport` wraps any Trio stream (TLS), where every write goes
through the connection's writer task. Both raise OSError when the connection
breaks, so the connection above handles one kind of failure.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["RECEIVE_BYTES", "SocketTransport", "StreamTransport", "Transport", "describe_error"]

RECEIVE_BYTES = 65536


class SocketTransport:
    """A connected non-blocking socket, waited on with trio.lowlevel; sends may complete at once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def try_send(self, data: bytes | bytearray) -> int:
        """Bytes the kernel took now, maybe 0; raises OSError if the connection is broken."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def drain(self, backlog: bytearray) -> None:
        """Wait until the kernel took all of ``backlog`` (which is consumed); OSError if the socket broke."""
        while backlog:
            await trio.lowlevel.wait_writable(self.sock)
            del backlog[:self.try_send(backlog)]

    async def receive_some(self) -> bytes:
        """The next bytes from the peer (empty at its end); checkpoints first, so a flood cannot starve others."""
        await trio.lowlevel.checkpoint()  # a peer that floods us must not starve the other tasks
        while True:
            try:
                return self.sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def shutdown_write(self) -> None:
        """Send FIN: nothing more from us; reading goes on."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:
        """Close the socket, waking any task waiting on it."""
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class StreamTransport:
    """Any Trio stream (TLS): no synchronous path, the writer task sends everything."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    def try_send(self, data: bytes | bytearray) -> int:
        """Always 0: a stream writes only from the writer task."""
        return 0

    async def drain(self, backlog: bytearray) -> None:
        """Send all of ``backlog`` (consumed); OSError if the stream broke."""
        while backlog:
            data = bytes(backlog)
            backlog.clear()  # what is written meanwhile queues behind this, in order
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise OSError(describe_error(error)) from None

    async def receive_some(self) -> bytes:
        """The next bytes from the peer (empty at its end); OSError if the stream broke."""
        try:
            return bytes(await self.stream.receive_some(RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise OSError(describe_error(error)) from None

    def shutdown_write(self) -> None:
        """Nothing: TLS has no half-close; its close_notify goes with aclose."""
        pass  # TLS has no half-close; the close_notify goes out with aclose

    async def aclose(self) -> None:
        """Close the stream at once, without waiting on the peer."""
        await trio.aclose_forcefully(self.stream)


Transport = SocketTransport | StreamTransport


def describe_error(error: BaseException) -> str:
    """An error's text, else its cause's: trio's BrokenResourceError from a failed TLS handshake has none itself."""
    if str(error):
        return str(error)
    cause = error.__cause__ or error.__context__
    return str(cause) if cause is not None and str(cause) else type(error).__name__
