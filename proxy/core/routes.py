"""Which markets and feeds a tier serves, at which paths, and where each one's upstream is, without I/O.

A tier serves every configured market at its Polygon path on its one port (``/stocks``,
``/options``, ...), and each market of the delayed feed under ``/delayed/<market>``; the
first real-time market is also served at ``/``, as the one market was before MARKETS. Each
:class:`Route` is one market of one feed: it has its own upstream link (or links, where the
operator bought several connections), registry, journal and metrics. :func:`upstream_url`
says where a route's upstream is: Polygon's ``<feed>/<market>`` for the firehose, the
firehose's matching path for the filtered proxy, and the one configured URL, verbatim, where
a single market is configured by ``POLYGON_URL`` as it always was.
"""

from __future__ import annotations

from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

import attrs

from .markets import MARKET_NAMES

__all__ = ["DELAYED_PREFIX", "Route", "routes_for", "route_of_path", "replace_market_path", "unserved_message"]

#: The path prefix of the delayed feed's markets: ``/delayed/stocks``.
DELAYED_PREFIX = "delayed"


@attrs.frozen
class Route:
    """One market of one feed, as a tier serves it: ``stocks``, or ``delayed/stocks``."""

    market: str
    delayed: bool = False

    @property
    def path(self) -> str:
        """The path clients connect at, without the leading slash: ``options``, ``delayed/stocks``."""
        return f"{DELAYED_PREFIX}/{self.market}" if self.delayed else self.market

    @property
    def label(self) -> str:
        """How logs and metrics name it: ``stocks``, ``stocks (delayed)``."""
        return f"{self.market} (delayed)" if self.delayed else self.market


def routes_for(markets: Iterable[str], delayed_markets: Iterable[str] = ()) -> tuple[Route, ...]:
    """The routes of the real-time ``markets`` then the ``delayed_markets``, each once, in order;
    the first is the one served at ``/`` as well."""
    real_time = [Route(name) for name in dict.fromkeys(markets)]
    delayed = [Route(name, delayed=True) for name in dict.fromkeys(delayed_markets)]
    return tuple(real_time + delayed)


def route_of_path(path: str, routes: Iterable[Route]) -> Route | None:
    """The route a request's path names (``/``: the first), or None when none is served there.

    A trailing slash is accepted (``/stocks/``), as the official client's URL building may add one."""
    served = tuple(routes)
    wanted = path.strip("/")
    if not wanted:
        return served[0] if served else None
    return next((route for route in served if route.path == wanted), None)


def unserved_message(path: str, routes: Iterable[Route]) -> str:
    """The refusal for a path no route serves: what was asked and every path served."""
    served = ", ".join(f"/{route.path}" for route in routes)
    wanted = path.strip("/")
    name = wanted.split("/")[-1]
    what = f"the {name} market" if name in MARKET_NAMES else f"the path /{wanted}"
    return f"this proxy does not serve {what}; it serves {served} (the MARKETS setting)"


def replace_market_path(url: str, route_path: str) -> str:
    """``url`` with its path's market part (a trailing market name, and a ``delayed`` before
    it, if any) replaced by ``route_path``: ``wss://h/stocks`` and ``options`` give
    ``wss://h/options``; ``ws://h:8767`` and ``delayed/stocks`` give ``ws://h:8767/delayed/stocks``.
    A path that names no market is kept as a prefix: ``ws://h/feed`` gives ``ws://h/feed/options``."""
    parts = urlsplit(url)
    segments = [segment for segment in parts.path.split("/") if segment]
    if segments and segments[-1] in MARKET_NAMES:
        segments.pop()
        if segments and segments[-1] == DELAYED_PREFIX:
            segments.pop()
    path = "/" + "/".join(segments + route_path.split("/"))
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
