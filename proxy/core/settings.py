"""What each tier and the simulator are configured with, as frozen values (no reading here).

:mod:`proxy.app.config` fills these from the environment and ``.env``; tests
and tools build them directly. Every layer may read them; none may change them.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import attrs

from .backoff import Backoff
from .entitlements import KeyBook
from .outbox import SlowClientPolicy
from .protocol import Channel

__all__ = ["ABOVE_ZERO", "AT_LEAST_ONE", "FLUSH_MS", "FRAME_ADAPTIVE", "FRAME_TICK", "MARKETS", "MAX_FRAME_EVENTS", "NOT_NEGATIVE",
           "PORT", "SECONDS", "SimulatorConfig", "TierConfig", "TierKind"]

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
ABOVE_ZERO = _within(lambda v: v > 0, "a number above 0")
NOT_NEGATIVE = _within(lambda v: v >= 0, "0 or more")
FLUSH_MS = _within(lambda v: 0 <= v <= 1000, "a number of milliseconds from 0 to 1000")

#: Polygon's markets, each served at its own path.
MARKETS = ("stocks", "options", "forex", "crypto", "indices", "futures")

#: ``SIMULATOR_FRAME_EVENTS=adaptive``: each event its own frame, sent as soon as it is due; what
#: piles up while the connection's socket is backed up goes out as one frame. That is how Polygon
#: frames: several events in one message only when its send buffer backs up.
FRAME_ADAPTIVE = "adaptive"
#: ``SIMULATOR_FRAME_EVENTS=tick``: one 10 ms tick's events per frame (rate / 100, 1 to 200),
#: 100 frames a second at most: the simulator's only framing before the setting existed.
FRAME_TICK = "tick"
#: The most events a fixed framing may put in a frame, and the most an adaptive batch holds.
MAX_FRAME_EVENTS = 1000


class TierKind(enum.StrEnum):
    """The two tiers: the one connection to Polygon, and where users connect."""

    FIREHOSE = "firehose"
    FILTERED = "filtered"


@attrs.frozen
class TierConfig:
    """Everything one proxy tier needs; the firehose and the filtered proxy differ only here."""

    tier: TierKind = attrs.field(converter=TierKind)
    upstream_url: str
    upstream_api_key: str
    #: Channels asked upstream beyond the registry's set: ``*`` for the filtered tier.
    upstream_extra: tuple[Channel, ...]
    static_channels: tuple[Channel, ...]
    host: str
    port: int = attrs.field(validator=PORT)
    #: Keys clients must present; empty with allow_any_key means anyone may connect.
    api_keys: frozenset[str]
    allow_any_key: bool
    #: HTTP port for /healthz, /readyz, /metrics; None = off (the variable set to 0).
    metrics_port: int | None = attrs.field(validator=PORT)
    market: str = attrs.field(default="stocks", validator=attrs.validators.in_(MARKETS))
    log_level: str = "info"
    unsubscribe_grace_seconds: float = attrs.field(default=5.0, validator=SECONDS)
    client_queue_events: int = attrs.field(default=50_000, validator=AT_LEAST_ONE)
    slow_client_policy: SlowClientPolicy = SlowClientPolicy.DISCONNECT
    #: How long a client disconnected as a slow consumer gets to read what is already on its
    #: socket, the slow_consumer status and the close frame, before its TCP connection is closed.
    slow_client_close_seconds: float = attrs.field(default=5.0, validator=SECONDS)
    #: Adaptive write coalescing (CLIENT_FLUSH_MS): a client is written at most once per this many
    #: milliseconds; one last written longer ago than that is written at once. 0: every time.
    client_flush_ms: float = attrs.field(default=5.0, validator=FLUSH_MS)
    max_message_bytes: int = attrs.field(default=262_144, validator=AT_LEAST_ONE)
    auth_timeout_seconds: float = attrs.field(default=10.0, validator=SECONDS)
    max_channels_per_message: int = attrs.field(default=10_000, validator=AT_LEAST_ONE)
    max_channels_per_client: int = attrs.field(default=10_000, validator=AT_LEAST_ONE)
    max_clients: int = attrs.field(default=10_000, validator=AT_LEAST_ONE)
    max_connections_per_ip: int = attrs.field(default=1_000, validator=AT_LEAST_ONE)
    control_messages_per_second: float = attrs.field(default=50.0, validator=ABOVE_ZERO)
    #: A downstream proxy tier's link (it says so at auth) carries the union of its clients'
    #: demand: its own budget and channel limit, sized for thousands of clients.
    downstream_proxy_control_messages_per_second: float = attrs.field(default=1000.0, validator=ABOVE_ZERO)
    downstream_proxy_max_channels: int = attrs.field(default=1_000_000, validator=AT_LEAST_ONE)
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive_interval_seconds: float = attrs.field(default=10.0, validator=ABOVE_ZERO)
    keepalive_timeout_seconds: float = attrs.field(default=20.0, validator=ABOVE_ZERO)
    upstream_ca_file: str | None = None
    #: On shutdown, how long to wait for clients and upstream to answer our close frame.
    shutdown_close_seconds: float = attrs.field(default=2.0, validator=SECONDS)
    backoff: Backoff = Backoff()
    #: Named keys with entitlements, read from ``api_keys_file`` (API_KEYS_FILE), which SIGHUP re-reads.
    key_book: KeyBook = attrs.field(factory=KeyBook)
    api_keys_file: str | None = None
    #: A client that sent nothing this long is pinged; one that then answers nothing within
    #: the pong timeout is closed (1011) as gone.
    client_ping_seconds: float = attrs.field(default=30.0, validator=ABOVE_ZERO)
    client_pong_timeout_seconds: float = attrs.field(default=20.0, validator=ABOVE_ZERO)
    #: The token that opens /clients and the status page; None: only loopback peers may see them.
    admin_token: str | None = None
    #: The setting ``upstream_api_key`` was read from, named when upstream refuses it.
    upstream_api_key_source: str = "POLYGON_API_KEY"
    #: Log level of third-party libraries (trio-websocket logs every message at debug);
    #: None: as ``log_level``, but never below info.
    library_log_level: str | None = None
    #: The journal (docs/journal.md): the recent past kept in memory, bounded by seconds and
    #: by bytes, whichever binds first (0: none kept) ...
    journal_memory_seconds: float = attrs.field(default=300.0, validator=NOT_NEGATIVE)
    journal_memory_bytes: int = attrs.field(default=256_000_000, validator=NOT_NEGATIVE)
    #: ... and the directory it is written to (None: memory only), with how long and how much
    #: of it is kept there (None: no bound of that kind).
    journal_dir: str | None = None
    journal_retention_seconds: float | None = 24 * 3600.0
    journal_max_bytes: int | None = 10_000_000_000

    @property
    def port_setting(self) -> str:
        """The variable that sets :attr:`port`, for error messages."""
        return "FIREHOSE_PORT" if self.tier is TierKind.FIREHOSE else "FILTERED_PROXY_PORT"

    @property
    def metrics_port_setting(self) -> str:
        """The variable that sets :attr:`metrics_port`, for error messages."""
        return "FIREHOSE_METRICS_PORT" if self.tier is TierKind.FIREHOSE else "FILTERED_METRICS_PORT"


@attrs.frozen
class SimulatorConfig:
    """Everything the simulator needs; :func:`proxy.app.config.load_simulator_config` reads it."""

    host: str = "127.0.0.1"
    port: int = 8766
    api_keys: frozenset[str] = frozenset()
    max_connections: int = 1
    allow_star: bool = False
    symbols: tuple[str, ...] | int = 3000
    events_per_second: float = 50.0
    seed: int | None = None
    auth_timeout_seconds: float = 10.0
    log_level: str = "info"
    library_log_level: str | None = None
    drop_after_seconds: float | None = None
    drop_after_frames: int | None = None
    refuse_auth: int = 0
    drop_abrupt: bool = False
    malformed_frames: int = 0
    stall_after_seconds: float | None = None
    stall_seconds: float = 0.0
    force_max_connections: bool = False
    #: For benchmarks: cycle through this many pre-built events instead of generating live (0 = live).
    prebuilt_events: int = 0
    #: Events per data frame: a whole number N (1 to :data:`MAX_FRAME_EVENTS`; frames evenly
    #: paced, rate / N a second), :data:`FRAME_ADAPTIVE` or :data:`FRAME_TICK`.
    frame_events: int | str = FRAME_ADAPTIVE
