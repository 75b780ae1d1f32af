"""A tier's HTTP side on its metrics port: one request per connection, answered by a handler.

h11 parses the request (the HTTP/1.1 state machine trio-websocket's stack
already uses); what to answer is the app's (:mod:`proxy.app.admin`): the server
hands it an :class:`HttpRequest` value and writes back the :class:`HttpResponse`
it returns, with the status's reason phrase. Scrapers, probes and a status page
need nothing more than one request per connection.
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
from http import HTTPStatus
from typing import Awaitable, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import h11
import trio

from .accepting import AcceptTrouble, PendingConnections, accept_forever, open_socket_listeners

__all__ = ["MAX_REQUEST_BYTES", "REQUEST_TIMEOUT", "Handler", "HttpRequest", "HttpResponse", "http_get", "serve_http"]

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 16_384
TEXT = "text/plain; charset=utf-8"


@attrs.frozen
class HttpRequest:
    """What a handler needs of a request: method, decoded path, query, headers (lowercase names), peer address."""

    method: str
    path: str
    query: dict[str, str] = attrs.field(factory=dict)
    headers: dict[str, str] = attrs.field(factory=dict)
    peer: str = ""


@attrs.frozen
class HttpResponse:
    """A complete answer: status, body, its content type, and any extra headers."""

    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


#: Answers a request, at once or (for a view that must ask elsewhere first) when awaited.
Handler = Callable[[HttpRequest], "HttpResponse | Awaitable[HttpResponse]"]


async def serve_http(
    host: str, port: int, handler: Handler, *, name: str = "proxy", pending: PendingConnections | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer HTTP on ``host``:``port`` with ``handler`` until cancelled; reports the bound port.

    Raises OSError when the port cannot be opened (the caller names its setting). Out of
    descriptors, accept failures are logged once per episode (trio's serve_listeners logged
    a traceback every 0.1 s) and, given the tier's ``pending`` connections, the oldest
    unauthenticated client is closed to make room, as the client listener does: a probe
    must get through while a crowd of clients holds the descriptors.
    """
    listeners = await open_socket_listeners(host, port)
    bound = listeners[0].getsockname()[1]
    log.info("%s tier: health, metrics and status on http://%s:%d", name, host, bound)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve, listener, handler, pending)
        task_status.started(bound)


async def _serve(listener: socket.socket, handler: Handler, pending: PendingConnections | None) -> None:
    trouble = AcceptTrouble(f"metrics listener {listener.getsockname()[0]}:{listener.getsockname()[1]}", log)
    async with trio.open_nursery() as handlers:

        def start(sock: socket.socket, _address: object) -> None:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            handlers.start_soon(functools.partial(_handle, stream, handler=handler))

        try:
            await accept_forever(listener, start, trouble, pending)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()


async def _handle(stream: trio.SocketStream, *, handler: Handler) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await _read_request(stream, connection)
            if request is None:
                return
            method = request.method.decode("ascii", "replace")
            if method not in ("GET", "HEAD"):
                response = HttpResponse(405, b"only GET and HEAD\n")
            else:
                answer = handler(_request_value(request, method, stream))
                response = await answer if inspect.isawaitable(answer) else answer
            headers = [("content-type", response.content_type), ("content-length", str(len(response.body))),
                       ("connection", "close"), *response.headers]
            reason = HTTPStatus(response.status).phrase.encode()  # h11 leaves it empty: "HTTP/1.1 503 "
            data = connection.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            if method == "GET":
                data += connection.send(h11.Data(data=response.body))
            data += connection.send(h11.EndOfMessage())
            await stream.send_all(data)
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:  # a failing handler must cost this request only, never the server
        log.exception("the HTTP handler failed; the request got no answer")
    finally:
        await stream.aclose()


def _request_value(request: h11.Request, method: str, stream: trio.SocketStream) -> HttpRequest:
    target = urlsplit(request.target.decode("ascii", "replace"))
    try:
        peer = str(stream.socket.getpeername()[0])
    except OSError:
        peer = ""
    return HttpRequest(
        method=method,
        path=unquote(target.path) or "/",
        query=dict(parse_qsl(target.query)),
        headers={name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers},
        peer=peer,
    )


async def _read_request(stream: trio.SocketStream, connection: h11.Connection) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(4096))
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # the client closed or sent something else


async def http_get(
    host: str, port: int, path: str, *, headers: tuple[tuple[str, str], ...] = (), timeout: float = REQUEST_TIMEOUT,
) -> tuple[int, bytes]:
    """GET ``path`` from ``host:port`` (one request, h11 as the server uses it): status and body.

    For a parent asking its own workers on loopback, so nothing more than that:
    raises OSError, ``trio.TooSlowError`` after ``timeout``, or h11's errors.
    """
    connection = h11.Connection(h11.CLIENT)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            request = h11.Request(method="GET", target=path,
                                  headers=[("host", f"{host}:{port}"), ("connection", "close"), *headers])
            await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
            status, body = 0, bytearray()
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65_536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, bytes(body)
