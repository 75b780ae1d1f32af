"""Configuration of each tier, read with python-decouple from the environment and a ``.env``.

Both proxy tiers run the same code (:mod:`proxy.tier`) with a :class:`TierConfig`;
:func:`load_firehose_config` and :func:`load_filtered_config` fill it from the
tier-prefixed variables, so one ``.env`` serves both tiers. The simulator has
:class:`SimulatorConfig`. The file is ``.env`` in the working directory, or the
one ``PROXY_ENV_FILE`` names; the environment wins over the file. A bad value
raises :class:`ConfigError`, which ``trio-run`` prints as one line (exit 2).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import attrs
import decouple

from .outbox import SlowClientPolicy
from .protocol import EVERYTHING_CHANNEL, Channel, ProtocolError, parse_channel_list

T = TypeVar("T")
MARKETS = ("stocks", "options", "forex", "crypto", "indices", "futures")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """One configuration variable is wrong; the message names it and says what is wrong."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"configuration error: {variable}: {problem}")
        self.variable = variable


@attrs.frozen
class Backoff:
    """Reconnect timing: exponential with jitter, reset after a healthy connection."""

    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    healthy_after_seconds: float = 60.0
    #: After ``auth_failed`` or ``max_connections``: a long wait, never a tight loop.
    refused_seconds: float = 60.0


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
    #: A downstream proxy tier's link (it says so at auth) carries the union of its clients'
    #: demand: its own budget and channel limit, sized for thousands of clients.
    downstream_proxy_control_messages_per_second: float = 1000.0
    downstream_proxy_max_channels: int = 1_000_000
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive_interval_seconds: float = 10.0
    keepalive_timeout_seconds: float = 20.0
    upstream_ca_file: str | None = None
    #: On shutdown, how long to wait for clients and upstream to answer our close frame.
    shutdown_close_seconds: float = 2.0
    backoff: Backoff = Backoff()


@attrs.frozen
class SimulatorConfig:
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


# --- reading -------------------------------------------------------------------------


def _source() -> decouple.Config:
    path = Path(os.environ.get("PROXY_ENV_FILE", ".env"))
    if "PROXY_ENV_FILE" in os.environ and not path.is_file():
        raise ConfigError("PROXY_ENV_FILE", f"no such file: {path}")
    repository = decouple.RepositoryEnv(str(path)) if path.is_file() else decouple.RepositoryEmpty()
    return decouple.Config(repository)


def _read(source: decouple.Config, name: str, default: str, parse: Callable[[str], T]) -> T:
    raw = str(source(name, default=default)).strip()
    try:
        return parse(raw)
    except ConfigError:
        raise
    except (ValueError, ProtocolError) as error:
        raise ConfigError(name, f"{raw!r} is not valid: {error}") from None


def _port(raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return int(raw)


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError("expected a whole number of at least 1")
    return int(raw)


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < 86_400 * 365:
        raise ValueError("expected a number of seconds, 0 or more")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return raw.lower()

    return parse


def _keys(raw: str) -> frozenset[str]:
    return frozenset(key.strip() for key in raw.split(",") if key.strip())


def _channels(raw: str) -> tuple[Channel, ...]:
    return parse_channel_list(raw) if raw else ()


def _ws_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("expected a ws:// or wss:// URL")
    return raw


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _shared(source: decouple.Config) -> dict:
    return dict(
        market=_read(source, "MARKET", "stocks", _choice(MARKETS)),
        log_level=_read(source, "LOG_LEVEL", "info", _choice(LOG_LEVELS)),
        unsubscribe_grace_seconds=_read(source, "UNSUBSCRIBE_GRACE_SECONDS", "5", _seconds),
        client_queue_events=_read(source, "CLIENT_QUEUE_EVENTS", "50000", _positive_int),
        slow_client_policy=SlowClientPolicy(
            _read(source, "SLOW_CLIENT_POLICY", "disconnect", _choice(("disconnect", "drop_oldest")))
        ),
        slow_client_close_seconds=_read(source, "SLOW_CLIENT_CLOSE_SECONDS", "5", _seconds),
        max_message_bytes=_read(source, "MAX_MESSAGE_BYTES", "262144", _positive_int),
        auth_timeout_seconds=_read(source, "AUTH_TIMEOUT_SECONDS", "10", _seconds),
        upstream_ca_file=_read(source, "UPSTREAM_CA_FILE", "", _existing_file),
        max_clients=_read(source, "MAX_CLIENTS", "10000", _positive_int),
        max_connections_per_ip=_read(source, "MAX_CONNECTIONS_PER_IP", "1000", _positive_int),
        max_channels_per_client=_read(source, "MAX_CHANNELS_PER_CLIENT", "10000", _positive_int),
        control_messages_per_second=_read(source, "CONTROL_MESSAGES_PER_SECOND", "50", _positive_rate),
        downstream_proxy_control_messages_per_second=_read(
            source, "DOWNSTREAM_PROXY_CONTROL_MESSAGES_PER_SECOND", "1000", _positive_rate),
        downstream_proxy_max_channels=_read(source, "DOWNSTREAM_PROXY_MAX_CHANNELS", "1000000", _positive_int),
    )


def _existing_file(raw: str) -> str | None:
    if raw and not Path(raw).is_file():
        raise ValueError("no such file")
    return raw or None


def _positive_rate(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("expected a number above 0")
    return value


def _tls(source: decouple.Config, prefix: str) -> dict:
    cert = _read(source, f"{prefix}_TLS_CERT", "", _existing_file)
    key = _read(source, f"{prefix}_TLS_KEY", "", _existing_file)
    if bool(cert) != bool(key):
        missing = f"{prefix}_TLS_KEY" if cert else f"{prefix}_TLS_CERT"
        raise ConfigError(missing, "TLS needs both a certificate and its key; only one is set")
    return dict(tls_cert=cert, tls_key=key)


def _required(source: decouple.Config, name: str) -> str:
    value = _read(source, name, "", str)
    if not value:
        raise ConfigError(name, "is required but not set (put it in the environment or in .env)")
    return value


def load_firehose_config() -> TierConfig:
    source = _source()
    api_key = _required(source, "POLYGON_API_KEY")
    accepted = _read(source, "FIREHOSE_API_KEYS", "", _keys)
    return TierConfig(
        tier="firehose",
        upstream_url=_read(source, "POLYGON_URL", "wss://socket.polygon.io/stocks", _ws_url),
        upstream_api_key=api_key,
        upstream_extra=(),
        static_channels=_read(source, "FIREHOSE_SUBSCRIPTIONS", "", _channels),
        host=_read(source, "FIREHOSE_HOST", "0.0.0.0", str),
        port=_read(source, "FIREHOSE_PORT", "8767", _port),
        api_keys=accepted or frozenset({api_key}),
        allow_any_key=False,
        metrics_port=_read(source, "FIREHOSE_METRICS_PORT", "9767", _port) or None,
        **_tls(source, "FIREHOSE"),
        **_shared(source),
    )


def load_filtered_config() -> TierConfig:
    source = _source()
    api_key = _read(source, "POLYGON_API_KEY", "", str)
    accepted = _read(source, "FILTERED_PROXY_API_KEYS", "", _keys)
    if not accepted and api_key:
        accepted = frozenset({api_key})
    return TierConfig(
        tier="filtered",
        upstream_url=_read(source, "FIREHOSE_URL", "ws://localhost:8767", _ws_url),
        upstream_api_key=api_key,
        upstream_extra=(EVERYTHING_CHANNEL,),
        static_channels=(),
        host=_read(source, "FILTERED_PROXY_HOST", "0.0.0.0", str),
        port=_read(source, "FILTERED_PROXY_PORT", "8765", _port),
        api_keys=accepted,
        allow_any_key=not accepted,
        metrics_port=_read(source, "FILTERED_METRICS_PORT", "9765", _port) or None,
        **_tls(source, "FILTERED_PROXY"),
        **_shared(source),
    )


def _symbols(raw: str) -> tuple[str, ...] | int:
    if raw.isdigit():
        return _positive_int(raw)
    symbols = tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    if not symbols:
        raise ValueError("expected a count or a comma-separated list of symbols")
    return symbols


def _optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    return lambda raw: parse(raw) if raw else None


def load_simulator_config() -> SimulatorConfig:
    source = _source()
    return SimulatorConfig(
        host=_read(source, "SIMULATOR_HOST", "127.0.0.1", str),
        port=_read(source, "SIMULATOR_PORT", "8766", _port),
        api_keys=_read(source, "SIMULATOR_API_KEYS", "", _keys),
        max_connections=_read(source, "SIMULATOR_MAX_CONNECTIONS", "1", _positive_int),
        allow_star=_read(source, "SIMULATOR_ALLOW_STAR", "false", _bool),
        symbols=_read(source, "SIMULATOR_SYMBOLS", "3000", _symbols),
        events_per_second=_read(source, "SIMULATOR_EVENTS_PER_SECOND", "50", _events_rate),
        seed=_read(source, "SIMULATOR_SEED", "", _optional(int)),
        auth_timeout_seconds=_read(source, "AUTH_TIMEOUT_SECONDS", "10", _seconds),
        log_level=_read(source, "LOG_LEVEL", "info", _choice(LOG_LEVELS)),
        drop_after_seconds=_read(source, "SIMULATOR_DROP_AFTER_SECONDS", "", _optional(_seconds)),
        drop_after_frames=_read(source, "SIMULATOR_DROP_AFTER_FRAMES", "", _optional(_positive_int)),
        refuse_auth=_read(source, "SIMULATOR_REFUSE_AUTH", "0", _count),
        drop_abrupt=_read(source, "SIMULATOR_DROP_ABRUPT", "false", _bool),
        malformed_frames=_read(source, "SIMULATOR_MALFORMED_FRAMES", "0", _count),
        stall_after_seconds=_read(source, "SIMULATOR_STALL_AFTER_SECONDS", "", _optional(_seconds)),
        stall_seconds=_read(source, "SIMULATOR_STALL_SECONDS", "0", _seconds),
        force_max_connections=_read(source, "SIMULATOR_FORCE_MAX_CONNECTIONS", "false", _bool),
        prebuilt_events=_read(source, "SIMULATOR_PREBUILT_EVENTS", "0", _count),
    )


def _count(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError("expected a whole number, 0 or more")
    return int(raw)


def _events_rate(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 5_000_000:
        raise ValueError("expected events per second above 0")
    return value


def redact(key: str) -> str:
    """A key as logs may show it: enough to tell keys apart, never the key."""
    if len(key) <= 8:
        return "*" * len(key) if key else "<none>"
    return f"{key[:4]}…{key[-2:]}"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
