"""A tier's HTTP side on its metrics port: ``/healthz``, ``/readyz`` and ``/metrics``.

h11 parses the requests (the HTTP/1.1 state machine trio-websocket's stack
already uses); prometheus-client renders the exposition. One request per
connection, then close: scrapers and probes need nothing more.
"""

from __future__ import annotations

import functools
import logging
from http import HTTPStatus
from typing import Callable

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["REQUEST_TIMEOUT", "MAX_REQUEST_BYTES", "respond", "serve_http"]

log = logging.getLogger("proxy.http")
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 16_384


def respond(path: str, readiness: Callable[[], tuple[bool, str]],
            registry: CollectorRegistry, name: str = "proxy") -> tuple[int, str, bytes]:
    """Status, content type and body for a GET of ``path`` on the metrics port of tier ``name``."""
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == "/readyz":
        ready, reason = readiness()
        return (200 if ready else 503), "text/plain; charset=utf-8", (reason + "\n").encode()
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    return 404, "text/plain; charset=utf-8", (
        f"not found: this is the {name} tier's health and metrics port; try /healthz, /readyz or /metrics\n"
    ).encode()


async def serve_http(
    host: str, port: int, readiness: Callable[[], tuple[bool, str]], registry: CollectorRegistry,
    *, name: str = "proxy", task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("Health and metrics on http://%s:%d (/healthz /readyz /metrics)", host, bound)
    handler = functools.partial(_handle, readiness=readiness, registry=registry, name=name)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


async def _handle(stream: trio.SocketStream, *, readiness: Callable[[], tuple[bool, str]],
                  registry: CollectorRegistry, name: str) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await _read_request(stream, connection)
            if request is None:
                return
            if request.method not in (b"GET", b"HEAD"):
                status, content_type, body = 405, "text/plain; charset=utf-8", b"only GET and HEAD\n"
            else:
                path = request.target.decode("ascii", "replace").split("?", 1)[0]
                status, content_type, body = respond(path, readiness, registry, name)
            headers = [("content-type", content_type), ("content-length", str(len(body))),
                       ("connection", "close")]
            reason = HTTPStatus(status).phrase.encode()  # h11 leaves it empty: "HTTP/1.1 503 "
            data = connection.send(h11.Response(status_code=status, headers=headers, reason=reason))
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
