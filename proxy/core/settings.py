"""What each tier and the simulator are configured with, as frozen values (no reading here).

:mod:`proxy.app.config` fills these from the environment and ``.env``; tests
and tools build them directly. Every layer may read them; none may change them.
"""

from __future__ import annotations

import attrs

from .backoff import Backoff
from .outbox import SlowClientPolicy
from .protocol import Channel

__all__ = ["MARKETS", "FRAME_ADAPTIVE", "FRAME_TICK", "MAX_FRAME_EVENTS", "SimulatorConfig", "TierConfig"]

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


@attrs.frozen
class TierConfig:
    """Everything one proxy tier needs; the firehose and the filtered proxy differ only here."""

    tier: str  # "firehose" or "filtered"
    upstream_url: str
    upstream_api_key: str
    #: Channels asked upstream beyond the registry's set: ``*`` for the filtered tier.
    upstream_extra: tuple[Channel, ...]
    static_channels: tuple[Channel, ...]
    host: str
    port: int
    #: Keys clients must present; empty with allow_any_key means anyone may connect.
    api_keys: frozenset[str]
    allow_any_key: bool
    #: HTTP port for /healthz, /readyz, /metrics; None = off (the variable set to 0).
    metrics_port: int | None
    market: str = "stocks"
    log_level: str = "info"
    unsubscribe_grace_seconds: float = 5.0
    client_queue_events: int = 50_000
    slow_client_policy: SlowClientPolicy = SlowClientPolicy.DISCONNECT
    #: How long a client disconnected as a slow consumer gets to read what is already on its
    #: socket, the slow_consumer status and the close frame, before its TCP connection is closed.
    slow_client_close_seconds: float = 5.0
    max_message_bytes: int = 262_144
    auth_timeout_seconds: float = 10.0
    max_channels_per_message: int = 10_000
    max_channels_per_client: int = 10_000
    max_clients: int = 10_000
    max_connections_per_ip: int = 1_000
    control_messages_per_second: float = 50.0
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive_interval_seconds: float = 10.0
    keepalive_timeout_seconds: float = 20.0
    upstream_ca_file: str | None = None
    #: On shutdown, how long to wait for clients and upstream to answer our close frame.
    shutdown_close_seconds: float = 2.0
    backoff: Backoff = Backoff()
    #: The setting ``upstream_api_key`` was read from, named when upstream refuses it.
    upstream_api_key_source: str = "POLYGON_API_KEY"
    #: Log level of third-party libraries (trio-websocket logs every message at debug);
    #: None: as ``log_level``, but never below info.
    library_log_level: str | None = None

    @property
    def port_setting(self) -> str:
        """The variable that sets :attr:`port`, for error messages."""
        return "FIREHOSE_PORT" if self.tier == "firehose" else "FILTERED_PROXY_PORT"

    @property
    def metrics_port_setting(self) -> str:
        """The variable that sets :attr:`metrics_port`, for error messages."""
        return "FIREHOSE_METRICS_PORT" if self.tier == "firehose" else "FILTERED_METRICS_PORT"


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
