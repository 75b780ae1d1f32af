"""A tier's HTTP side on its metrics port: ``/healthz``, ``/readyz`` and ``/metrics``.

h11 parses the requests (the HTTP/1.1 state machine trio-websocket's stack
already uses); prometheus-client renders the exposition. One request per
connection, then close: scrapers and probes need nothing more.
"""

from __future__ import annotations

import functools
import logging
import socket
from typing import Callable

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .accepting import AcceptTrouble, PendingConnections, accept_forever, open_socket_listeners

log = logging.getLogger("proxy.http")
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 16_384


def respond(path: str, readiness: Callable[[], tuple[bool, str]],
            registry: CollectorRegistry) -> tuple[int, str, bytes]:
    """Status, content type and body for a GET of ``path``."""
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == "/readyz":
        ready, reason = readiness()
        return (200 if ready else 503), "text/plain; charset=utf-8", (reason + "\n").encode()
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    return 404, "text/plain; charset=utf-8", b"not found: try /healthz, /readyz or /metrics\n"


async def serve_http(
    host: str, port: int, readiness: Callable[[], tuple[bool, str]], registry: CollectorRegistry,
    *, pending: PendingConnections | None = None, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. Out of descriptors, accept failures are logged once per episode (trio's
    serve_listeners logged a traceback every 0.1 s) and, given the tier's ``pending`` connections, the
    oldest unauthenticated client is closed to make room, as the client listener does: a probe must
    get through while a crowd of clients holds the descriptors."""
    listeners = await open_socket_listeners(host, port)
    bound = listeners[0].getsockname()[1]
    log.info("Health and metrics on http://%s:%d (/healthz /readyz /metrics)", host, bound)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve, listener, readiness, registry, pending)
        task_status.started(bound)


async def _serve(listener: socket.socket, readiness: Callable[[], tuple[bool, str]], registry: CollectorRegistry,
                 pending: PendingConnections | None) -> None:
    trouble = AcceptTrouble(f"metrics listener {listener.getsockname()[0]}:{listener.getsockname()[1]}", log)
    async with trio.open_nursery() as handlers:

        def start(sock: socket.socket, _address: object) -> None:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            handlers.start_soon(functools.partial(_handle, stream, readiness=readiness, registry=registry))

        try:
            await accept_forever(listener, start, trouble, pending)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()


async def _handle(stream: trio.SocketStream, *, readiness: Callable[[], tuple[bool, str]],
                  registry: CollectorRegistry) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await _read_request(stream, connection)
            if request is None:
                return
            if request.method not in (b"GET", b"HEAD"):
                status, content_type, body = 405, "text/plain; charset=utf-8", b"only GET\n"
            else:
                path = request.target.decode("ascii", "replace").split("?", 1)[0]
                status, content_type, body = respond(path, readiness, registry)
            headers = [("content-type", content_type), ("content-length", str(len(body))),
                       ("connection", "close")]
            data = connection.send(h11.Response(status_code=status, headers=headers))
            if request.method == b"GET":
                data += connection.send(h11.Data(data=body))
            data += connection.send(h11.EndOfMessage())
            await stream.send_all(data)
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _read_request(stream: trio.SocketStream, connection: h11.Connection) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(4096))
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # the client closed or sent something else
