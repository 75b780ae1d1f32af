"""What accept loops do when accept() fails: which errors to retry, one log line per episode, shedding.

When a process runs out of file descriptors, every accept() fails until one
is freed. Logging each failure (trio's ``serve_listeners`` logs a traceback
per retry, every 0.1 s) floods the log exactly when an operator needs it; so
:class:`AcceptTrouble` logs the first failure, a reminder a minute, and the
recovery with the count. Meanwhile the descriptors are often held by
connections that never authenticate (a flood, or a crowd of broken clients),
which time out only after ``AUTH_TIMEOUT_SECONDS``; :class:`PendingConnections`
lets the accept loop close the oldest of those at each failure, so that a
client that authenticates gets in while the crowd is still there.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any, Callable, NoReturn

import attrs
import trio

__all__ = ["AcceptTrouble", "PendingConnections", "open_socket_listeners", "reserve_shared_port", "accept_forever", "after_resource_error", "RESOURCE_ERRORS", "TRANSIENT_ERRORS", "RETRY_SECONDS", "REMIND_SECONDS", "SETTLE_SECONDS"]

#: accept() errors that mean "out of a resource now": retry shortly (trio's serve_listeners does the same).
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept() errors about the one connection being accepted (it was reset, refused by a firewall...):
#: the next one may be fine. trio's SocketListener ignores the same list; anything else is a bug or a
#: broken listener (EINVAL: not listening, EBADF: closed) and is raised, never retried in a loop.
TRANSIENT_ERRORS = frozenset(
    getattr(errno, name) for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT",
        "ETIMEDOUT", "ECONNRESET",
    ) if hasattr(errno, name)
)
#: How long to wait before accepting again when nothing could be shed (trio's serve_listeners: 0.1 s).
RETRY_SECONDS = 0.1
#: While an episode lasts, a reminder this often (so a server stuck without descriptors is not silent).
REMIND_SECONDS = 60.0
#: An episode ends when no accept has failed for this long and none is waiting: while a crowd is still
#: connecting, the kernel's queue empties for moments between its connections, and that is one episode.
SETTLE_SECONDS = 1.0


@attrs.define
class AcceptTrouble:
    """One listener's resource failures, logged once per episode: its start, reminders, its end."""

    what: str
    log: logging.Logger
    failures: int = 0
    shed: int = 0
    _started: float = 0.0  # trio time of the episode's first failure
    _started_wall: float = 0.0
    _reminded: float = 0.0
    _last_failure: float = 0.0  # trio time

    def unsettled_for(self) -> float:
        """How long until an episode may end (seconds; 0 when none is on or it may end now)."""
        if not self.failures:
            return 0.0
        return max(0.0, self._last_failure + SETTLE_SECONDS - trio.current_time())

    def failed(self, error: OSError) -> None:
        """Count one failed accept; logs only at the start of an episode and once a minute while it lasts."""
        now = trio.current_time()
        self.failures += 1
        self._last_failure = now
        if self.failures == 1:
            self._started, self._started_wall, self._reminded = now, time.time(), now
            name = errno.errorcode.get(error.errno or 0, str(error.errno))
            self.log.error(
                "%s: accept failed (%s: %s)%s; retrying, and counting further failures until it works again",
                self.what, name, os.strerror(error.errno or 0),
                ": out of file descriptors, raise the limit (ulimit -n, LimitNOFILE=)"
                if error.errno in (errno.EMFILE, errno.ENFILE) else "",
            )
        elif now - self._reminded >= REMIND_SECONDS:
            self._reminded = now
            self.log.error("%s: still failing: %s", self.what, self._tally())

    def recovered(self) -> None:
        """Call when accept() would block (every waiting connection is in) and
        :meth:`unsettled_for` is 0: ends an episode, if one is on.

        Not after each successful accept: while a crowd waits, accepts that
        succeed (into descriptors just freed by shedding) alternate with ones
        that fail, and that is one episode; nor as soon as the queue is empty, which
        it is for moments between the connections of a crowd still arriving.
        """
        if self.failures:
            self.log.warning("%s: accepting again after %.1fs: %s", self.what,
                             trio.current_time() - self._started, self._tally())
            self.failures = self.shed = 0

    def _tally(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self._started_wall))
        shed = f", {self.shed} unauthenticated connections closed to make room" if self.shed else ""
        return f"{self.failures} accepts failed since {since}{shed}"


@attrs.define
class PendingConnections:
    """Connections accepted and not yet authenticated, oldest first: the ones shed for descriptors.

    A dict keeps them in arrival order with O(1) add and discard, the only
    work done per connection. Each entry is the cancel scope around the
    connection's handler: cancelling it ends the connection, and its owner
    calls :meth:`closed` once the socket is closed, which wakes whoever shed it.
    """

    _scopes: dict[object, trio.CancelScope] = attrs.field(factory=dict)
    _released: dict[object, trio.Event] = attrs.field(factory=dict)
    #: Connections shed so far (for tests and the logs).
    shed_total: int = 0

    def add(self, connection: object, scope: trio.CancelScope) -> None:
        """Remember a connection not yet authenticated, with the scope that ends it if it must be shed."""
        self._scopes[connection] = scope

    def discard(self, connection: object) -> None:
        """``connection`` authenticated: it is not shed, whatever happens."""
        self._scopes.pop(connection, None)

    def closed(self, connection: object) -> None:
        """Forget a connection that has ended, whatever its state."""
        self._scopes.pop(connection, None)
        released = self._released.pop(connection, None)
        if released is not None:
            released.set()

    def shed_oldest(self) -> trio.Event | None:
        """Cancel the oldest pending connection; the returned event is set once its socket is closed."""
        if not self._scopes:
            return None
        connection = next(iter(self._scopes))
        self._scopes.pop(connection).cancel()
        released = self._released[connection] = trio.Event()
        self.shed_total += 1
        return released

    def was_shed(self, connection: object) -> bool:
        """True from the moment ``connection`` is shed until its socket is closed."""
        return connection in self._released

    def __len__(self) -> int:
        return len(self._scopes)

    def __contains__(self, connection: object) -> bool:
        return connection in self._scopes


async def open_socket_listeners(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host`` and ``port`` (trio resolves and binds).

    With ``reuse_port``, each socket is opened with ``SO_REUSEPORT``, so that several
    processes listen on the same port and the kernel spreads new connections over them
    (the filtered proxy's workers); ``port`` must then be a real port, not 0.
    """
    if not reuse_port:
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockets = []
        for listener in listeners:
            sock = socket.socket(fileno=listener.socket.detach())
            sock.setblocking(False)
            sockets.append(sock)
        return sockets
    return await reserve_shared_port(host, port, listen=True)


async def reserve_shared_port(host: str, port: int, *, listen: bool = False) -> list[socket.socket]:
    """Sockets bound with ``SO_REUSEPORT`` to ``port`` (0: a free one, the same for every
    address of ``host``), listening only if ``listen``: a parent holds such sockets, unlistening,
    to own the port its workers share (a bound socket that does not listen gets no connections)."""
    infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            if listen:
                sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def accept_forever(
    listener: socket.socket, start: Callable[[socket.socket, Any], object], trouble: AcceptTrouble,
    pending: PendingConnections | None = None,
) -> NoReturn:
    """Accept on a non-blocking ``listener`` and call ``start(sock, address)`` for each connection.

    Resource errors: :func:`after_resource_error`. Errors about the one
    connection being accepted (:data:`TRANSIENT_ERRORS`): the next, after a
    checkpoint. Anything else is raised: a listener that cannot accept (not
    listening: EINVAL, closed: EBADF) would fail the same way forever.
    """
    while True:
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            unsettled = trouble.unsettled_for()
            if unsettled:
                with trio.move_on_after(unsettled):
                    await trio.lowlevel.wait_readable(listener)
                    continue  # more of the crowd: the same episode
            trouble.recovered()
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as error:
            if error.errno in RESOURCE_ERRORS:
                await after_resource_error(trouble, error, pending)
                continue
            if error.errno in TRANSIENT_ERRORS:
                await trio.lowlevel.checkpoint()
                continue
            raise
        start(sock, address)
        await trio.lowlevel.checkpoint()


async def after_resource_error(trouble: AcceptTrouble, error: OSError, pending: PendingConnections | None) -> None:
    """Log (once per episode), shed the oldest unauthenticated connection if there is one, and wait:
    until its descriptor is free, or RETRY_SECONDS when there was nothing to shed."""
    trouble.failed(error)
    released = pending.shed_oldest() if pending is not None else None
    if released is None:
        await trio.sleep(RETRY_SECONDS)
        return
    trouble.shed += 1
    with trio.move_on_after(RETRY_SECONDS):
        await released.wait()
