"""What a tier's metrics port answers: health, metrics, and for operators the clients and a status page.

``/healthz``, ``/readyz`` and ``/metrics`` are open to anyone, as probes and
scrapers need. ``/clients``, ``/clients/<id>``, ``/status.json`` and the status
page at ``/`` show peer addresses and key names, so they answer only with
``ADMIN_TOKEN`` (a ``Authorization: Bearer`` header, or the cookie that
``/login?token=...`` sets) when it is set, and only to loopback peers when it is
not. Everything is computed at request time from the tier's state: nothing on the
hot path pays for it.
"""

from __future__ import annotations

import hmac
import importlib.resources
import ipaddress
import itertools
import time
from typing import Any, Callable, Protocol, Sequence

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..core.routes import Route
from ..core.settings import TierConfig
from ..core.stats import TierHistory, TierSnapshot
from ..core.subscriptions import SubscriptionRegistry
from ..net.http import HttpRequest, HttpResponse
from ..net.server import ClientSession, Hub
from ..net.upstream import UpstreamLink

__all__ = ["CHANNELS_LISTED", "COOKIE", "JSON", "Observed", "allowed", "client_view", "forbidden", "login", "make_handler",
           "static_file"]

#: How many channels /clients lists per client (all of them: /clients/<id>).
CHANNELS_LISTED = 100
COOKIE = "proxy_admin"
JSON = "application/json"
HTML = "text/html; charset=utf-8"
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".html": HTML}
_encode = msgspec.json.encode


class Observed(Protocol):
    """What the operator views read of a running tier (:class:`~proxy.app.tier.Tier` is one)."""

    config: TierConfig
    registry: SubscriptionRegistry[ClientSession]
    hub: Hub
    link: UpstreamLink
    history: TierHistory

    def snapshot(self) -> TierSnapshot:
        """The tier's figures now."""
        ...

    def readiness(self) -> tuple[bool, str]:
        """Whether the upstream is connected, and why not."""
        ...

    @property
    def parts(self) -> "Sequence[Observed]":
        """Every market's part of the tier (itself alone when it serves one)."""
        ...

    @property
    def route(self) -> Route:
        """The market and feed this part serves."""
        ...


def client_view(tier: Observed, session: ClientSession, now: float, *, all_channels: bool = False) -> dict[str, Any]:
    """One client as /clients shows it: who, where, since when, what it holds and how it keeps up."""
    channels = tier.registry.channels_of(session)
    listed = channels if all_channels else itertools.islice(channels, CHANNELS_LISTED)
    outbox = session.outbox
    oldest = outbox.oldest_waiting_at
    return {
        "id": session.id,
        "market": tier.route.path,
        "peer": session.peer,
        "key": session.key_name or None,
        "path": session.path,
        "connected_since_ms": session.connected_at_ms,
        "connected_seconds": round(time.time() - session.connected_at_ms / 1000, 3),
        "channel_count": len(channels),
        "channels": sorted(channel.text for channel in listed),
        "events_sent": session.events_sent,
        "events_dropped": outbox.dropped_events,
        "events_queued": outbox.events_waiting,
        "oldest_queued_seconds": None if oldest is None else round(now - oldest, 6),
        "slow": outbox.overflowed or outbox.dropped_events > 0,
        "last_control_seconds_ago": (None if session.last_control_at is None
                                     else round(now - session.last_control_at, 3)),
    }


def _status(tier: Observed) -> dict[str, Any]:
    snapshot, history = tier.snapshot(), tier.history
    return {
        "tier": tier.config.tier,
        "market": tier.config.market,
        "clients_connected": snapshot.clients_connected,
        "upstream": {
            "state": tier.link.state.value,
            "label": tier.link.label,
            "last_error": None if snapshot.upstream_connected else tier.link.last_error,
            "reconnects": snapshot.upstream_reconnects,
            "outages": [{"began_ms": o.began_ms, "seconds": o.seconds, "reason": o.reason}
                        for o in history.outages],
        },
        "rates": [{"t_ms": r.t_ms, "events_in": r.events_in, "events_out": r.events_out}
                  for r in history.rates],
        "keys": [{"key": name, "clients": clients, "events_sent": sent, "events_dropped": dropped}
                 for name, (clients, sent, dropped) in sorted(tier.hub.key_totals().items())],
        "markets": [_market_status(part) for part in tier.parts],
    }


def _market_status(part: Observed) -> dict[str, Any]:
    """One market's part as the status page lists it: where it is served and how its upstream is."""
    snapshot = part.snapshot()
    return {
        "path": f"/{part.route.path}",
        "clients_connected": snapshot.clients_connected,
        "upstream_channels": snapshot.upstream_channels,
        "upstream_connected": snapshot.upstream_connected,
        "upstream_refused": snapshot.upstream_refused,
        "last_error": None if snapshot.upstream_connected else part.link.last_error,
        "events_in": snapshot.stats.events_in,
    }


def allowed(request: HttpRequest, token: str | None) -> bool:
    """Whether ``request`` may see the operator views: it presents ``token`` (Bearer or cookie),
    or, when there is none, it comes from this machine."""
    if token is None:
        try:
            return ipaddress.ip_address(request.peer).is_loopback
        except ValueError:
            return False
    presented = ""
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
    else:
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                presented = value
    return hmac.compare_digest(presented.encode(), token.encode())


def static_file(name: str) -> HttpResponse:
    """A file of the status page shipped in the package (404 for anything outside it)."""
    folder = importlib.resources.files("proxy.app") / "static"
    resource = folder
    for part in name.split("/"):
        if part in ("", ".", "..") or part.startswith("."):
            return HttpResponse(404, b"not found\n")
        resource = resource / part
    if not resource.is_file():
        return HttpResponse(404, b"not found\n")
    suffix = "." + name.rsplit(".", 1)[-1]
    return HttpResponse(200, resource.read_bytes(), _STATIC_TYPES.get(suffix, "application/octet-stream"),
                        (("cache-control", "max-age=3600"),))


def login(request: HttpRequest, token: str | None) -> HttpResponse:
    """``/login?token=...``: the cookie that opens the operator views in a browser, then the status page."""
    presented = request.query.get("token", "")
    if token is None or not hmac.compare_digest(presented.encode(), token.encode()):
        return HttpResponse(403, b"forbidden: /login?token=ADMIN_TOKEN\n")
    cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    return HttpResponse(303, b"logged in\n", headers=(("set-cookie", cookie), ("location", "/")))


def forbidden(token: str | None) -> HttpResponse:
    """The answer to a request :func:`allowed` refuses, saying how to get in."""
    why = ("send ADMIN_TOKEN as a Bearer token, or log in at /login?token=..." if token
           else "without ADMIN_TOKEN set, only this machine (loopback) may look")
    return HttpResponse(403, f"forbidden: {why}\n".encode())


def make_handler(tier: Observed, registry: CollectorRegistry) -> Callable[[HttpRequest], HttpResponse]:
    """The metrics port's answers for ``tier``: open probes and metrics, guarded operator views."""
    token = tier.config.admin_token
    name = tier.config.tier

    def handle(request: HttpRequest) -> HttpResponse:
        path = request.path
        if path == "/healthz":
            return HttpResponse(200, b"ok\n")
        if path == "/readyz":
            ready, reason = tier.readiness()
            return HttpResponse(200 if ready else 503, (reason + "\n").encode())
        if path == "/metrics":
            return HttpResponse(200, generate_latest(registry), CONTENT_TYPE_LATEST)
        if path == "/login":
            return login(request, token)
        if path == "/" or path == "/status.json" or path.startswith(("/clients", "/static/")):
            if not allowed(request, token):
                return forbidden(token)
            return _operator_view(path)
        return HttpResponse(404, (f"not found: this is the {name} tier's health and metrics port; try "
                                  "/healthz, /readyz, /metrics, or / for the status page\n").encode())

    def _operator_view(path: str) -> HttpResponse:
        if path == "/":
            return static_file("status.html")
        if path.startswith("/static/"):
            return static_file(path.removeprefix("/static/"))
        if path == "/status.json":
            return HttpResponse(200, _encode(_status(tier)), JSON)
        now = trio.current_time()
        if path in ("/clients", "/clients/"):
            views = [client_view(part, session, now) for part in tier.parts for session in part.hub.sessions]
            views.sort(key=lambda view: view["id"])
            return HttpResponse(200, _encode(views), JSON)
        wanted = path.removeprefix("/clients/")
        for part in tier.parts:
            for session in part.hub.sessions:
                if str(session.id) == wanted:
                    return HttpResponse(200, _encode(client_view(part, session, now, all_channels=True)), JSON)
        return HttpResponse(404, f"no client {wanted!r} is connected\n".encode())

    return handle
