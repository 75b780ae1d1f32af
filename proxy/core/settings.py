"""What each tier and the simulator are configured with, as frozen values, each setting declared once.

A field says everything about its setting: its type, default and validator, and (through
:func:`setting`) the environment variable that sets it and how that variable's text becomes
its value (:mod:`proxy.core.setting_text`). :mod:`proxy.app.config` reads the variables the
fields name; tests and tools build these values directly, and the validators hold either way.
Every layer may read them; none may change them. Nothing here reads the environment.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import attrs

from . import setting_text as parse
from .backoff import Backoff
from .entitlements import KeyBook
from .markets import MARKET_NAMES, market as market_named
from .outbox import SlowClientPolicy
from .protocol import Channel
from .routes import Route, replace_market_path, routes_for

__all__ = ["ABOVE_ZERO", "AT_LEAST_ONE", "FLUSH_MS", "FRAME_ADAPTIVE", "FRAME_TICK", "LOG_LEVELS", "MARKETS", "MARKET_NAMES_ONLY",
           "MAX_FRAME_EVENTS", "SOME_MARKETS", "NOT_NEGATIVE", "PORT", "POSITIVE_SECONDS", "PathCheck", "ReplayConfig",
           "SECONDS", "SimulatorConfig", "TierConfig", "TierKind", "Variable", "connections_variable",
           "parse_frame_events", "parse_speed", "setting", "variable_of"]


def connections_variable(market: str) -> str:
    """The variable that says how many upstream connections the account has for ``market``."""
    return f"POLYGON_CONNECTIONS_{market.upper()}"


def _within(check: "Callable[[Any], bool]", expected: str) -> "Callable[[Any, attrs.Attribute, Any], None]":
    """An attrs validator: ``check(value)`` must hold, else ValueError naming the field and what it expects."""

    def validate(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not check(value):
            raise ValueError(f"{attribute.name} must be {expected}, not {value!r}")

    return validate


#: The rules a value must keep however the configuration was built (from the environment,
#: which names the variable in its one-line error, or in code, as tests and tools do).
PORT = _within(lambda v: isinstance(v, int) and 0 <= v <= 65535, "a port number from 0 to 65535")
AT_LEAST_ONE = _within(lambda v: isinstance(v, int) and v >= 1, "a whole number of at least 1")
SECONDS = _within(lambda v: 0 <= v < 86_400 * 365, "a number of seconds, 0 or more")
POSITIVE_SECONDS = _within(lambda v: 0 < v < 86_400 * 365, "a number of seconds above 0")
ABOVE_ZERO = _within(lambda v: v > 0, "a number above 0")
NOT_NEGATIVE = _within(lambda v: v >= 0, "0 or more")
FLUSH_MS = _within(lambda v: 0 <= v <= 1000, "a number of milliseconds from 0 to 1000")

#: Polygon's markets, each served at its own path (the table of their facts: :mod:`proxy.core.markets`).
MARKETS = MARKET_NAMES
#: Market names only (any of :data:`MARKETS`), and at least one of them.
MARKET_NAMES_ONLY = _within(lambda v: all(name in MARKETS for name in v), f"market names from {', '.join(MARKETS)}")
SOME_MARKETS = _within(lambda v: len(v) > 0 and all(name in MARKETS for name in v),
                       f"one or more of {', '.join(MARKETS)}")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

#: ``SIMULATOR_FRAME_EVENTS=adaptive``: each event its own frame, sent as soon as it is due; what
#: piles up while the connection's socket is backed up goes out as one frame. That is how Polygon
#: frames: several events in one message only when its send buffer backs up.
FRAME_ADAPTIVE = "adaptive"
#: ``SIMULATOR_FRAME_EVENTS=tick``: one 10 ms tick's events per frame (rate / 100, 1 to 200),
#: 100 frames a second at most: the simulator's only framing before the setting existed.
FRAME_TICK = "tick"
#: The most events a fixed framing may put in a frame, and the most an adaptive batch holds.
MAX_FRAME_EVENTS = 1000


def parse_frame_events(raw: str) -> int | str:
    """``SIMULATOR_FRAME_EVENTS`` (and ``scripts/bench --frame-events``): :data:`FRAME_ADAPTIVE`,
    :data:`FRAME_TICK`, or a whole number of events per frame from 1 to :data:`MAX_FRAME_EVENTS`."""
    value = raw.strip().lower()
    if value in (FRAME_ADAPTIVE, FRAME_TICK):
        return value
    if value.isdigit() and 1 <= int(value) <= MAX_FRAME_EVENTS:
        return int(value)
    raise ValueError(f"expected {FRAME_ADAPTIVE}, {FRAME_TICK} or a whole number of events "
                     f"per frame from 1 to {MAX_FRAME_EVENTS}")


class TierKind(enum.StrEnum):
    """The two tiers: the one connection to Polygon, and where users connect."""

    FIREHOSE = "firehose"
    FILTERED = "filtered"


class PathCheck(enum.Enum):
    """What a path setting must name on the file system, checked where it is read (the core does no I/O)."""

    FILE = "an existing file"
    #: A directory to write in: it may not exist yet (it is created), but it may not be a file.
    DIRECTORY = "a directory (or nothing yet)"


@attrs.frozen
class Variable:
    """The environment variable behind a field, and how its text becomes the field's value.

    ``name`` is one name, or one per tier where the tiers' names differ (a tier missing
    from the mapping does not read the field); ``defaults`` gives a tier's default where it
    differs from the field's own. A variable that is unset or blank leaves the default.
    """

    name: str | Mapping[TierKind, str]
    parse: Callable[[str], Any]
    defaults: Mapping[TierKind, Any] = attrs.field(factory=dict)
    path: PathCheck | None = None

    def name_for(self, tier: TierKind | None) -> str | None:
        """The variable's name for ``tier`` (None: that tier does not read it)."""
        if isinstance(self.name, str):
            return self.name
        return self.name.get(tier) if tier is not None else None


_VARIABLE = "proxy.variable"


def setting(
    name: str | Mapping[TierKind, str],
    parse: Callable[[str], Any],
    *,
    default: Any = attrs.NOTHING,
    validator: Any = None,
    converter: Any = None,
    defaults: Mapping[TierKind, Any] | None = None,
    path: PathCheck | None = None,
    factory: Any = None,
) -> Any:
    """An attrs field read from the environment variable ``name`` with ``parse``: the one place
    a setting's name, parser, default and validator are written down."""
    variable = Variable(name, parse, dict(defaults or {}), path)
    if factory is not None:
        default = attrs.Factory(factory)
    return attrs.field(default=default, validator=validator, converter=converter,
                       metadata={_VARIABLE: variable})


def variable_of(field: attrs.Attribute) -> Variable | None:
    """The environment variable declared on ``field`` with :func:`setting`, if any."""
    return field.metadata.get(_VARIABLE)


def _tiers(firehose: Any, filtered: Any) -> dict[TierKind, Any]:
    return {TierKind.FIREHOSE: firehose, TierKind.FILTERED: filtered}


@attrs.frozen(kw_only=True)
class TierConfig:
    """Everything one proxy tier needs; the firehose and the filtered proxy differ only here.

    Fields declared with :func:`setting` are read from the variable they name (README's
    configuration table lists them all; ``tests/test_config.py`` checks it does). The rest
    are derived by :mod:`proxy.app.config` (keys, the filtered tier's ``*``) or fixed.
    """

    tier: TierKind = attrs.field(converter=TierKind)
    upstream_url: str = setting(_tiers("POLYGON_URL", "FIREHOSE_URL"), parse.ws_url,
                                defaults=_tiers("wss://socket.polygon.io/stocks", "ws://localhost:8767"))
    upstream_api_key: str
    #: Channels asked upstream beyond the registry's set: ``*`` for the filtered tier.
    upstream_extra: tuple[Channel, ...]
    #: Channels the firehose holds upstream whatever its downstreams ask for.
    static_channels: tuple[Channel, ...] = setting({TierKind.FIREHOSE: "FIREHOSE_SUBSCRIPTIONS"},
                                                   parse.channel_list, default=())
    host: str = setting(_tiers("FIREHOSE_HOST", "FILTERED_PROXY_HOST"), parse.text, default="0.0.0.0")
    port: int = setting(_tiers("FIREHOSE_PORT", "FILTERED_PROXY_PORT"), parse.port, validator=PORT,
                        defaults=_tiers(8767, 8765))
    #: Keys clients must present; empty with allow_any_key means anyone may connect.
    api_keys: frozenset[str] = frozenset()
    allow_any_key: bool = False
    #: HTTP port for /healthz, /readyz, /metrics; None = off (the variable set to 0).
    metrics_port: int | None = setting(_tiers("FIREHOSE_METRICS_PORT", "FILTERED_METRICS_PORT"), parse.port_or_off,
                                       validator=PORT, default=None, defaults=_tiers(9767, 9765))
    market: str = setting("MARKET", parse.choice(MARKETS), default="stocks", validator=attrs.validators.in_(MARKETS))
    #: Every market served, each at its Polygon path with its own upstream link(s) (empty: just
    #: ``market``, the one-market spelling); the first is served at ``/`` too.
    markets: tuple[str, ...] = setting("MARKETS", parse.names, default=(), converter=parse.as_tuple,
                                       validator=MARKET_NAMES_ONLY)
    #: Markets of the 15-minute delayed feed, served under ``/delayed/<market>`` beside the real-time ones.
    delayed_markets: tuple[str, ...] = setting("POLYGON_DELAYED_MARKETS", parse.names, default=(),
                                               converter=parse.as_tuple, validator=MARKET_NAMES_ONLY)
    #: The firehose's real-time feed: market M's upstream is ``<feed>/M`` (None: ``upstream_url``
    #: for one market, its host for several).
    polygon_feed: str | None = setting({TierKind.FIREHOSE: "POLYGON_FEED"}, parse.ws_url, default=None)
    #: The firehose's delayed feed: delayed market M's upstream is ``<feed>/M``.
    delayed_feed: str = setting({TierKind.FIREHOSE: "POLYGON_DELAYED_FEED"}, parse.ws_url,
                                default="wss://delayed.polygon.io")
    #: Upstream connections per market (``POLYGON_CONNECTIONS_<MARKET>``; 1 when not named): the
    #: firehose spreads a market's channels over them, which multiplies its per-connection caps.
    upstream_connections: Mapping[str, int] = attrs.field(factory=dict, validator=attrs.validators.deep_mapping(
        attrs.validators.in_(MARKETS), AT_LEAST_ONE))
    #: Per market and event type, the most symbols one upstream connection may hold, over
    #: Polygon's documented caps (``POLYGON_CAPS=options.Q=1000``; the table: proxy/core/markets.py).
    upstream_caps: Mapping[str, Mapping[str, int]] = setting("POLYGON_CAPS", parse.market_caps, factory=dict)
    log_level: str = setting("LOG_LEVEL", parse.choice(LOG_LEVELS), default="info",
                             validator=attrs.validators.in_(LOG_LEVELS))
    unsubscribe_grace_seconds: float = setting("UNSUBSCRIBE_GRACE_SECONDS", parse.number, default=5.0,
                                               validator=SECONDS)
    client_queue_events: int = setting("CLIENT_QUEUE_EVENTS", parse.whole_number, default=50_000,
                                       validator=AT_LEAST_ONE)
    slow_client_policy: SlowClientPolicy = setting("SLOW_CLIENT_POLICY", parse.enum_choice(SlowClientPolicy),
                                                   default=SlowClientPolicy.DISCONNECT)
    #: How long a client disconnected as a slow consumer gets to read what is already on its
    #: socket, the slow_consumer status and the close frame, before its TCP connection is closed.
    slow_client_close_seconds: float = setting("SLOW_CLIENT_CLOSE_SECONDS", parse.number, default=5.0,
                                               validator=SECONDS)
    #: Adaptive write coalescing: a client is written at most once per this many milliseconds; one
    #: last written longer ago than that is written at once. 0: every time, as frames come.
    client_flush_ms: float = setting("CLIENT_FLUSH_MS", parse.number, default=5.0, validator=FLUSH_MS)
    max_message_bytes: int = setting("MAX_MESSAGE_BYTES", parse.whole_number, default=262_144,
                                     validator=AT_LEAST_ONE)
    auth_timeout_seconds: float = setting("AUTH_TIMEOUT_SECONDS", parse.number, default=10.0, validator=SECONDS)
    max_channels_per_message: int = attrs.field(default=10_000, validator=AT_LEAST_ONE)
    max_channels_per_client: int = setting("MAX_CHANNELS_PER_CLIENT", parse.whole_number, default=10_000,
                                           validator=AT_LEAST_ONE)
    max_clients: int = setting("MAX_CLIENTS", parse.whole_number, default=10_000, validator=AT_LEAST_ONE)
    max_connections_per_ip: int = setting("MAX_CONNECTIONS_PER_IP", parse.whole_number, default=1_000,
                                          validator=AT_LEAST_ONE)
    control_messages_per_second: float = setting("CONTROL_MESSAGES_PER_SECOND", parse.number, default=50.0,
                                                 validator=ABOVE_ZERO)
    #: A downstream proxy tier's link (it says so at auth) carries the union of its clients'
    #: demand: its own budget and channel limit, sized for thousands of clients.
    downstream_proxy_control_messages_per_second: float = setting(
        "DOWNSTREAM_PROXY_CONTROL_MESSAGES_PER_SECOND", parse.number, default=1000.0, validator=ABOVE_ZERO)
    downstream_proxy_max_channels: int = setting("DOWNSTREAM_PROXY_MAX_CHANNELS", parse.whole_number,
                                                 default=1_000_000, validator=AT_LEAST_ONE)
    tls_cert: str | None = setting(_tiers("FIREHOSE_TLS_CERT", "FILTERED_PROXY_TLS_CERT"), parse.text,
                                   default=None, path=PathCheck.FILE)
    tls_key: str | None = setting(_tiers("FIREHOSE_TLS_KEY", "FILTERED_PROXY_TLS_KEY"), parse.text,
                                  default=None, path=PathCheck.FILE)
    #: How often the upstream link pings, and how long it waits for the answer before it
    #: counts the connection as dead and reconnects.
    keepalive_interval_seconds: float = setting("UPSTREAM_PING_SECONDS", parse.number, default=10.0,
                                                validator=POSITIVE_SECONDS)
    keepalive_timeout_seconds: float = setting("UPSTREAM_PONG_TIMEOUT_SECONDS", parse.number, default=20.0,
                                               validator=POSITIVE_SECONDS)
    #: Reads of the upstream link at least this many milliseconds apart: what arrives meanwhile is
    #: read, journaled and routed as one batch, so one-event frames cost a wake-up per interval,
    #: not one each. A frame after a quiet spell is read at once. 0: every frame as it comes.
    upstream_read_ms: float = setting("UPSTREAM_READ_MS", parse.number, default=1.0, validator=FLUSH_MS)
    upstream_ca_file: str | None = setting("UPSTREAM_CA_FILE", parse.text, default=None, path=PathCheck.FILE)
    #: On shutdown, how long to wait for clients and upstream to answer our close frame.
    shutdown_close_seconds: float = attrs.field(default=2.0, validator=SECONDS)
    backoff: Backoff = Backoff()
    #: Named keys with entitlements, read from ``api_keys_file`` (API_KEYS_FILE), which SIGHUP re-reads.
    key_book: KeyBook = attrs.field(factory=KeyBook)
    api_keys_file: str | None = setting("API_KEYS_FILE", parse.text, default=None, path=PathCheck.FILE)
    #: A client that sent nothing this long is pinged; one that then answers nothing within
    #: the pong timeout is closed (1011) as gone.
    client_ping_seconds: float = setting("CLIENT_PING_SECONDS", parse.number, default=30.0,
                                         validator=POSITIVE_SECONDS)
    client_pong_timeout_seconds: float = setting("CLIENT_PONG_TIMEOUT_SECONDS", parse.number, default=20.0,
                                                 validator=POSITIVE_SECONDS)
    #: The token that opens /clients and the status page; None: only loopback peers may see them.
    admin_token: str | None = setting("ADMIN_TOKEN", parse.admin_token, default=None)
    #: The setting ``upstream_api_key`` was read from, named when upstream refuses it.
    upstream_api_key_source: str = "POLYGON_API_KEY"
    #: Log level of third-party libraries (trio-websocket logs every message at debug);
    #: None: as ``log_level``, but never below info.
    library_log_level: str | None = setting("LOG_LEVEL_LIBRARIES", parse.choice(LOG_LEVELS), default=None,
                                            validator=attrs.validators.optional(attrs.validators.in_(LOG_LEVELS)))
    #: The journal (docs/journal.md): the recent past kept in memory, bounded by seconds and
    #: by bytes, whichever binds first (0: none kept) ...
    journal_memory_seconds: float = setting("JOURNAL_MEMORY_SECONDS", parse.number, default=300.0,
                                            validator=SECONDS)
    journal_memory_bytes: int = setting("JOURNAL_MEMORY_MB", parse.megabytes, default=256_000_000,
                                        validator=NOT_NEGATIVE)
    #: ... and the directory it is written to (None: memory only), with how long and how much
    #: of it is kept there (None: no bound of that kind).
    journal_dir: str | None = setting("JOURNAL_DIR", parse.text, default=None, path=PathCheck.DIRECTORY)
    journal_retention_seconds: float | None = setting("JOURNAL_RETENTION_HOURS", parse.hours_or_unbounded,
                                                      default=24 * 3600.0, validator=ABOVE_ZERO)
    journal_max_bytes: int | None = setting("JOURNAL_MAX_GB", parse.gigabytes_or_unbounded,
                                            default=10_000_000_000, validator=AT_LEAST_ONE)
    #: How far back a subscribe's "from" may reach, in seconds (docs/protocol.md, "Resume"); 0
    #: turns resume off. Capped, where it is used, by what the journal keeps.
    replay_max_seconds: float = setting("REPLAY_MAX_SECONDS", parse.number, default=3600.0, validator=SECONDS)

    #: Worker processes of the filtered proxy sharing its client port (``SO_REUSEPORT``), each
    #: with its own link to the firehose, under one parent that serves the metrics port for all
    #: (proxy/app/workers.py). The firehose has one: it holds the one connection to Polygon.
    workers: int = setting({TierKind.FILTERED: "FILTERED_PROXY_WORKERS"}, parse.whole_number, default=1,
                           validator=AT_LEAST_ONE)
    #: Set by the workers' parent, never read from the environment: open the client port with
    #: SO_REUSEPORT; the worker's number (in its log lines); where its metrics port listens
    #: (None: ``host``; a worker's is on loopback, for its parent only).
    reuse_port: bool = False
    worker_index: int | None = None
    metrics_host: str | None = None

    @property
    def routes(self) -> tuple[Route, ...]:
        """The markets of each feed this tier serves, each at its path; the first is also at ``/``."""
        return routes_for(self.markets or (self.market,), self.delayed_markets)

    def connections_for(self, market: str) -> int:
        """How many upstream connections the account has for ``market`` (POLYGON_CONNECTIONS_<MARKET>)."""
        return self.upstream_connections.get(market, 1)

    def connection_caps(self, market: str) -> dict[str, int]:
        """Per event type, the most symbols one upstream connection of ``market`` may hold:
        Polygon's documented caps (:mod:`proxy.core.markets`), then POLYGON_CAPS over them."""
        return market_named(market).caps(self.upstream_caps.get(market))

    def market_caps(self, market: str) -> dict[str, int]:
        """Per event type, the most symbols ``market``'s upstream may hold in all: each
        connection's cap (:meth:`connection_caps`) times the market's connections."""
        connections = self.connections_for(market)
        return {code: cap * connections for code, cap in self.connection_caps(market).items()}

    def connections_for_route(self, route: Route) -> int:
        """How many of the market's connections ``route`` uses: the delayed feed one, the real-time
        feed the rest (Polygon counts a market's delayed and real-time connections together).
        0 when the account has too few for both (:meth:`connection_shortfall` says so)."""
        if route.delayed:
            return 1
        delayed = 1 if route.market in self.delayed_markets else 0
        return max(0, self.connections_for(route.market) - delayed)

    def connection_shortfall(self) -> tuple[str, str] | None:
        """When the markets served need more connections than the account has: the variable to
        raise, and why; else None."""
        for route in self.routes:
            if not route.delayed and self.connections_for_route(route) < 1:
                have, variable = self.connections_for(route.market), connections_variable(route.market)
                return variable, (f"{route.market} is served real-time and delayed (POLYGON_DELAYED_MARKETS), "
                                  f"which takes 2 connections, and Polygon counts them together; the account has "
                                  f"{have} ({variable}): set it to 2 if your plan has them, or drop {route.market} "
                                  "from one feed")
        return None

    def upstream_url_for(self, route: Route) -> str:
        """Where ``route``'s upstream is.

        Firehose: ``<feed>/<market>`` of the delayed feed or of POLYGON_FEED; without POLYGON_FEED,
        POLYGON_URL verbatim when it serves one real-time market (as it always did), else its
        host with each market's path. Filtered proxy: the firehose's path for the route
        (FIREHOSE_URL with the route's path), unless one real-time market is served and
        FIREHOSE_URL names a path of its own (kept verbatim: a reverse proxy's, say).
        """
        single = len(self.routes) == 1 and not route.delayed
        if self.tier is TierKind.FIREHOSE:
            if route.delayed:
                return replace_market_path(self.delayed_feed, route.market)
            if self.polygon_feed is not None:
                return replace_market_path(self.polygon_feed, route.market)
            return self.upstream_url if single else replace_market_path(self.upstream_url, route.market)
        if single and urlsplit(self.upstream_url).path.strip("/"):
            return self.upstream_url
        return replace_market_path(self.upstream_url, route.path)

    def for_route(self, route: Route) -> "TierConfig":
        """The configuration of one route's part of the tier: its market, its upstream URL, and
        its journal's directory (a subdirectory per route when the tier serves several)."""
        journal_dir = self.journal_dir
        if journal_dir is not None and len(self.routes) > 1:
            journal_dir = f"{journal_dir.rstrip('/')}/{route.path.replace('/', '-')}"
        # the route's own share of the market's connections, which its links and caps count
        connections = {**self.upstream_connections, route.market: max(1, self.connections_for_route(route))}
        return attrs.evolve(self, market=route.market, upstream_url=self.upstream_url_for(route),
                            journal_dir=journal_dir, upstream_connections=connections)

    def setting_name(self, field: str) -> str:
        """The variable that sets ``field`` in this tier, for error messages."""
        variable = variable_of(attrs.fields_dict(TierConfig)[field])
        name = variable.name_for(self.tier) if variable is not None else None
        if name is None:
            raise KeyError(f"{field} is not read from the environment by the {self.tier} tier")
        return name

    @property
    def port_setting(self) -> str:
        """The variable that sets :attr:`port`, for error messages."""
        return self.setting_name("port")

    @property
    def metrics_port_setting(self) -> str:
        """The variable that sets :attr:`metrics_port`, for error messages."""
        return self.setting_name("metrics_port")


@attrs.frozen(kw_only=True)
class SimulatorConfig:
    """Everything the simulator needs; :func:`proxy.app.config.load_simulator_config` reads it."""

    host: str = setting("SIMULATOR_HOST", parse.text, default="127.0.0.1")
    port: int = setting("SIMULATOR_PORT", parse.port, default=8766, validator=PORT)
    #: Keys it accepts; empty: any key.
    api_keys: frozenset[str] = setting("SIMULATOR_API_KEYS", parse.key_set, default=frozenset())
    #: Connections at once per key in each market, as Polygon's limit is per market (more get ``max_connections``).
    max_connections: int = setting("SIMULATOR_MAX_CONNECTIONS", parse.whole_number, default=1,
                                   validator=AT_LEAST_ONE)
    #: Whether a bare ``*`` subscription is allowed (Polygon refuses it to most plans).
    allow_star: bool = setting("SIMULATOR_ALLOW_STAR", parse.boolean, default=False)
    symbols: tuple[str, ...] | int = setting("SIMULATOR_SYMBOLS", parse.symbols, default=3000,
                                             validator=_within(lambda v: v != 0, "a count of at least 1 or symbols"))
    events_per_second: float = setting("SIMULATOR_EVENTS_PER_SECOND", parse.number, default=50.0,
                                       validator=_within(lambda v: 0 < v <= 5_000_000,
                                                         "events per second above 0 (at most 5,000,000)"))
    seed: int | None = setting("SIMULATOR_SEED", int, default=None)
    auth_timeout_seconds: float = setting("AUTH_TIMEOUT_SECONDS", parse.number, default=10.0, validator=SECONDS)
    log_level: str = setting("LOG_LEVEL", parse.choice(LOG_LEVELS), default="info",
                             validator=attrs.validators.in_(LOG_LEVELS))
    library_log_level: str | None = setting("LOG_LEVEL_LIBRARIES", parse.choice(LOG_LEVELS), default=None,
                                            validator=attrs.validators.optional(attrs.validators.in_(LOG_LEVELS)))
    # Faults, for tests and for trying a tier's recovery by hand (README, "The simulator").
    drop_after_seconds: float | None = setting("SIMULATOR_DROP_AFTER_SECONDS", parse.number, default=None,
                                               validator=SECONDS)
    drop_after_frames: int | None = setting("SIMULATOR_DROP_AFTER_FRAMES", parse.whole_number, default=None,
                                            validator=AT_LEAST_ONE)
    refuse_auth: int = setting("SIMULATOR_REFUSE_AUTH", parse.whole_number, default=0, validator=NOT_NEGATIVE)
    drop_abrupt: bool = setting("SIMULATOR_DROP_ABRUPT", parse.boolean, default=False)
    malformed_frames: int = setting("SIMULATOR_MALFORMED_FRAMES", parse.whole_number, default=0,
                                    validator=NOT_NEGATIVE)
    stall_after_seconds: float | None = setting("SIMULATOR_STALL_AFTER_SECONDS", parse.number, default=None,
                                                validator=SECONDS)
    stall_seconds: float = setting("SIMULATOR_STALL_SECONDS", parse.number, default=0.0, validator=SECONDS)
    force_max_connections: bool = setting("SIMULATOR_FORCE_MAX_CONNECTIONS", parse.boolean, default=False)
    #: For benchmarks: cycle through this many pre-built events instead of generating live (0 = live).
    prebuilt_events: int = setting("SIMULATOR_PREBUILT_EVENTS", parse.whole_number, default=0,
                                   validator=NOT_NEGATIVE)
    #: Events per data frame: a whole number N (1 to :data:`MAX_FRAME_EVENTS`; frames evenly
    #: paced, rate / N a second), :data:`FRAME_ADAPTIVE` or :data:`FRAME_TICK`.
    frame_events: int | str = setting("SIMULATOR_FRAME_EVENTS", parse_frame_events, default=FRAME_ADAPTIVE)
    #: The markets served, each at its path (``/stocks``, ...; ``/`` is stocks); other paths get 404.
    markets: tuple[str, ...] = setting("SIMULATOR_MARKETS", parse.names, default=MARKETS, converter=parse.as_tuple,
                                       validator=SOME_MARKETS)
    #: The markets the keys may use; a key authenticating at another answers ``auth_failed``
    #: ("Your plan doesn't include websocket access."), as Polygon does for a plan without it.
    entitled: tuple[str, ...] = setting("SIMULATOR_ENTITLED", parse.names, default=MARKETS, converter=parse.as_tuple,
                                        validator=MARKET_NAMES_ONLY)


def parse_speed(raw: str) -> float | None:
    """``REPLAY_SPEED`` (and ``--speed``): a number above 0 (2 = twice the recorded pace), or ``max``
    (None: as fast as the sockets take). Raises ValueError with a sentence otherwise."""
    text = raw.strip().lower()
    if text == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        speed = float("nan")
    if not 0 < speed < float("inf"):
        raise ValueError("expected a number above 0 (2 = twice the recorded pace) or max")
    return speed


@attrs.frozen(kw_only=True)
class ReplayConfig:
    """What ``python -m proxy.replay`` serves: a recorded journal, as a Polygon upstream.

    ``journal_dir`` is the recording (the command line's argument). How it listens and
    whom it lets in are the simulator's settings under ``REPLAY_*`` names
    (:meth:`server` turns them into the :class:`SimulatorConfig` its server runs with).
    ``speed`` divides the recorded time between frames (None: as fast as the sockets take
    them); ``from_ns`` / ``to_ns`` (ns since the epoch; ``REPLAY_FROM`` / ``REPLAY_TO``, read
    relative to now by :func:`proxy.app.replay_config.load_replay_config`) cut the recording
    by receive time, at or after and before; ``loop`` starts again at the end;
    ``outage_statuses`` sends the recorded upstream outages as the ``upstream_disconnected``
    / ``upstream_connected`` statuses a tier's clients saw.
    """

    journal_dir: str = attrs.field(validator=_within(bool, "a journal directory"))
    host: str = setting("REPLAY_HOST", parse.text, default="127.0.0.1")
    port: int = setting("REPLAY_PORT", parse.port, default=8766, validator=PORT)
    #: Keys it accepts; empty: any key.
    api_keys: frozenset[str] = setting("REPLAY_API_KEYS", parse.key_set, default=frozenset())
    max_connections: int = setting("REPLAY_MAX_CONNECTIONS", parse.whole_number, default=1, validator=AT_LEAST_ONE)
    allow_star: bool = setting("REPLAY_ALLOW_STAR", parse.boolean, default=False)
    speed: float | None = setting("REPLAY_SPEED", parse_speed, default=1.0, validator=ABOVE_ZERO)
    from_ns: int | None = None
    to_ns: int | None = None
    loop: bool = setting("REPLAY_LOOP", parse.boolean, default=False)
    outage_statuses: bool = setting("REPLAY_OUTAGE_STATUSES", parse.boolean, default=False)
    auth_timeout_seconds: float = setting("AUTH_TIMEOUT_SECONDS", parse.number, default=10.0, validator=SECONDS)
    log_level: str = setting("LOG_LEVEL", parse.choice(LOG_LEVELS), default="info",
                             validator=attrs.validators.in_(LOG_LEVELS))
    library_log_level: str | None = setting("LOG_LEVEL_LIBRARIES", parse.choice(LOG_LEVELS), default=None,
                                            validator=attrs.validators.optional(attrs.validators.in_(LOG_LEVELS)))

    def __attrs_post_init__(self) -> None:
        if self.from_ns is not None and self.to_ns is not None and self.to_ns <= self.from_ns:
            raise ValueError("to_ns must be after from_ns")

    def server(self) -> SimulatorConfig:
        """The simulator's configuration its server runs with: these listening and access
        settings, and one frame out for one recorded frame (never merged)."""
        return SimulatorConfig(host=self.host, port=self.port, api_keys=self.api_keys,
                               max_connections=self.max_connections, allow_star=self.allow_star,
                               auth_timeout_seconds=self.auth_timeout_seconds, log_level=self.log_level,
                               library_log_level=self.library_log_level, frame_events=1)
