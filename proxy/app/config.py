"""Configuration of each tier, read with python-decouple from the environment and a ``.env``.

Both proxy tiers run the same code (:mod:`proxy.app.tier`) with a
:class:`~proxy.core.settings.TierConfig`;
:func:`load_firehose_config` and :func:`load_filtered_config` fill it from the
tier-prefixed variables, so one ``.env`` serves both tiers. The simulator has
:class:`SimulatorConfig`. The file is ``.env`` in the working directory, or the
one ``PROXY_ENV_FILE`` names; the environment wins over the file. A bad value
raises :class:`ConfigError`, which ``trio-run`` prints as one line (exit 2).
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import attrs
import decouple

from ..core.entitlements import KeyBook, parse_key_file
from ..core.errors import ClientMessageError, ConfigError
from ..core.outbox import SlowClientPolicy
from ..core.protocol import EVERYTHING_CHANNEL, Channel, parse_channel_list
from ..core.settings import FRAME_ADAPTIVE, FRAME_TICK, MARKETS, MAX_FRAME_EVENTS, SimulatorConfig, TierConfig, TierKind

__all__ = [
    "read_key_file",
    "LOG_LEVELS",
    "load_firehose_config",
    "load_filtered_config",
    "load_simulator_config",
    "parse_frame_events",
    "setup_logging",
    "LIBRARY_LOGGERS",
    "bind_error",
    "check_market_url",
]

T = TypeVar("T")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


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
    except (ValueError, ClientMessageError) as error:
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


def _default(name: str) -> str:
    """A TierConfig field's default as the text of its variable: defaults are declared once, there."""
    value = attrs.fields_dict(TierConfig)[name].default
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def _shared(source: decouple.Config) -> dict:
    return dict(
        market=_read(source, "MARKET", _default("market"), _choice(MARKETS)),
        log_level=_read(source, "LOG_LEVEL", _default("log_level"), _choice(LOG_LEVELS)),
        library_log_level=_read(source, "LOG_LEVEL_LIBRARIES", "", _optional(_choice(LOG_LEVELS))),
        admin_token=_read(source, "ADMIN_TOKEN", "", _optional(_admin_token)),
        client_ping_seconds=_read(source, "CLIENT_PING_SECONDS", _default("client_ping_seconds"), _positive_seconds),
        client_pong_timeout_seconds=_read(source, "CLIENT_PONG_TIMEOUT_SECONDS", _default("client_pong_timeout_seconds"), _positive_seconds),
        unsubscribe_grace_seconds=_read(source, "UNSUBSCRIBE_GRACE_SECONDS", _default("unsubscribe_grace_seconds"), _seconds),
        client_queue_events=_read(source, "CLIENT_QUEUE_EVENTS", _default("client_queue_events"), _positive_int),
        slow_client_policy=SlowClientPolicy(
            _read(source, "SLOW_CLIENT_POLICY", _default("slow_client_policy"), _choice(("disconnect", "drop_oldest")))
        ),
        slow_client_close_seconds=_read(source, "SLOW_CLIENT_CLOSE_SECONDS", _default("slow_client_close_seconds"), _seconds),
        client_flush_ms=_read(source, "CLIENT_FLUSH_MS", _default("client_flush_ms"), _flush_ms),
        max_message_bytes=_read(source, "MAX_MESSAGE_BYTES", _default("max_message_bytes"), _positive_int),
        auth_timeout_seconds=_read(source, "AUTH_TIMEOUT_SECONDS", _default("auth_timeout_seconds"), _seconds),
        upstream_ca_file=_read(source, "UPSTREAM_CA_FILE", "", _existing_file),
        max_clients=_read(source, "MAX_CLIENTS", _default("max_clients"), _positive_int),
        max_connections_per_ip=_read(source, "MAX_CONNECTIONS_PER_IP", _default("max_connections_per_ip"), _positive_int),
        max_channels_per_client=_read(source, "MAX_CHANNELS_PER_CLIENT", _default("max_channels_per_client"), _positive_int),
        control_messages_per_second=_read(source, "CONTROL_MESSAGES_PER_SECOND", _default("control_messages_per_second"), _positive_rate),
        downstream_proxy_control_messages_per_second=_read(
            source, "DOWNSTREAM_PROXY_CONTROL_MESSAGES_PER_SECOND",
            _default("downstream_proxy_control_messages_per_second"), _positive_rate),
        downstream_proxy_max_channels=_read(
            source, "DOWNSTREAM_PROXY_MAX_CHANNELS", _default("downstream_proxy_max_channels"), _positive_int),
        journal_memory_seconds=_read(source, "JOURNAL_MEMORY_SECONDS", _default("journal_memory_seconds"), _seconds),
        journal_memory_bytes=int(_read(source, "JOURNAL_MEMORY_MB", "256", _amount) * 1e6),
        journal_dir=_read(source, "JOURNAL_DIR", "", _directory),
        journal_retention_seconds=_unbounded_if_zero(_read(source, "JOURNAL_RETENTION_HOURS", "24", _amount) * 3600),
        journal_max_bytes=_unbounded_if_zero(int(_read(source, "JOURNAL_MAX_GB", "10", _amount) * 1e9)),
    )


def _flush_ms(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1000:
        raise ValueError("expected a number of milliseconds from 0 to 1000 (0: write every frame at once)")
    return value


def _positive_seconds(raw: str) -> float:
    value = _seconds(raw)
    if value <= 0:
        raise ValueError("expected a number of seconds above 0")
    return value


def _admin_token(raw: str) -> str:
    if len(raw) < 16:
        raise ValueError("use at least 16 characters (it guards client addresses and key names)")
    if any(character in raw for character in ";, \t\"\\"):
        raise ValueError("a token goes into a cookie: no spaces, commas, semicolons, quotes or backslashes")
    return raw


def _amount(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < math.inf:
        raise ValueError("expected a number, 0 or more")
    return value


def _unbounded_if_zero(value: T) -> T | None:
    return value or None


def _directory(raw: str) -> str | None:
    """A directory to write in: it may not exist yet (it is created), but it may not be a file."""
    if raw and Path(raw).exists() and not Path(raw).is_dir():
        raise ValueError("exists and is not a directory")
    return raw or None


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


def read_key_file(path: str) -> KeyBook:
    """The named keys in ``path`` (API_KEYS_FILE); ConfigError naming the file, line and problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("API_KEYS_FILE", f"cannot read {path}: {error}") from None
    return parse_key_file(text, path)


def _key_file(source: decouple.Config) -> dict:
    path = _read(source, "API_KEYS_FILE", "", str)
    return dict(api_keys_file=path or None, key_book=read_key_file(path) if path else KeyBook())


def load_firehose_config() -> TierConfig:
    """The firehose's configuration from the environment and ``.env``; raises ConfigError naming a bad variable."""
    source = _source()
    api_key = _required(source, "POLYGON_API_KEY")
    accepted = _read(source, "FIREHOSE_API_KEYS", "", _keys)
    return TierConfig(
        tier=TierKind.FIREHOSE,
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
        **_key_file(source),
        **_shared(source),
    )


def load_filtered_config() -> TierConfig:
    """The filtered proxy's configuration from the environment and ``.env``; raises ConfigError naming a bad variable."""
    source = _source()
    api_key = _read(source, "POLYGON_API_KEY", "", str)
    accepted = _read(source, "FILTERED_PROXY_API_KEYS", "", _keys)
    if not accepted and api_key:
        accepted = frozenset({api_key})
    firehose_key, firehose_key_source = _firehose_key(source, api_key)
    keys = _key_file(source)
    return TierConfig(
        tier=TierKind.FILTERED,
        upstream_url=_read(source, "FIREHOSE_URL", "ws://localhost:8767", _ws_url),
        upstream_api_key=firehose_key,
        upstream_api_key_source=firehose_key_source,
        upstream_extra=(EVERYTHING_CHANNEL,),
        static_channels=(),
        host=_read(source, "FILTERED_PROXY_HOST", "0.0.0.0", str),
        port=_read(source, "FILTERED_PROXY_PORT", "8765", _port),
        api_keys=accepted,
        allow_any_key=not accepted and not keys["key_book"],
        metrics_port=_read(source, "FILTERED_METRICS_PORT", "9765", _port) or None,
        **_tls(source, "FILTERED_PROXY"),
        **keys,
        **_shared(source),
    )


def _firehose_key(source: decouple.Config, polygon_key: str) -> tuple[str, str]:
    """The key the filtered proxy presents to the firehose, and the setting it came from.

    ``FILTERED_PROXY_FIREHOSE_KEY`` when set. Otherwise, when one ``.env`` serves both
    tiers and names the keys the firehose accepts (``FIREHOSE_API_KEYS``), the first of
    those: the firehose accepts it by definition. Otherwise ``POLYGON_API_KEY``, which a
    firehose with no ``FIREHOSE_API_KEYS`` accepts (the original single-key arrangement).
    """
    explicit = _read(source, "FILTERED_PROXY_FIREHOSE_KEY", "", str)
    if explicit:
        return explicit, "FILTERED_PROXY_FIREHOSE_KEY"
    raw_firehose_keys = _read(source, "FIREHOSE_API_KEYS", "", str)
    firehose_keys = [key.strip() for key in raw_firehose_keys.split(",") if key.strip()]
    if firehose_keys:
        return firehose_keys[0], "FIREHOSE_API_KEYS (its first key)"
    return polygon_key, "POLYGON_API_KEY"


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
    """The simulator's configuration from the environment and ``.env``; raises ConfigError naming a bad variable."""
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
        log_level=_read(source, "LOG_LEVEL", _default("log_level"), _choice(LOG_LEVELS)),
        library_log_level=_read(source, "LOG_LEVEL_LIBRARIES", "", _optional(_choice(LOG_LEVELS))),
        drop_after_seconds=_read(source, "SIMULATOR_DROP_AFTER_SECONDS", "", _optional(_seconds)),
        drop_after_frames=_read(source, "SIMULATOR_DROP_AFTER_FRAMES", "", _optional(_positive_int)),
        refuse_auth=_read(source, "SIMULATOR_REFUSE_AUTH", "0", _count),
        drop_abrupt=_read(source, "SIMULATOR_DROP_ABRUPT", "false", _bool),
        malformed_frames=_read(source, "SIMULATOR_MALFORMED_FRAMES", "0", _count),
        stall_after_seconds=_read(source, "SIMULATOR_STALL_AFTER_SECONDS", "", _optional(_seconds)),
        stall_seconds=_read(source, "SIMULATOR_STALL_SECONDS", "0", _seconds),
        force_max_connections=_read(source, "SIMULATOR_FORCE_MAX_CONNECTIONS", "false", _bool),
        prebuilt_events=_read(source, "SIMULATOR_PREBUILT_EVENTS", "0", _count),
        frame_events=_read(source, "SIMULATOR_FRAME_EVENTS", FRAME_ADAPTIVE, parse_frame_events),
    )


def parse_frame_events(raw: str) -> int | str:
    """``SIMULATOR_FRAME_EVENTS`` (and ``scripts/bench --frame-events``): ``adaptive``, ``tick``,
    or a whole number of events per frame from 1 to :data:`MAX_FRAME_EVENTS`."""
    value = raw.strip().lower()
    if value in (FRAME_ADAPTIVE, FRAME_TICK):
        return value
    if value.isdigit() and 1 <= int(value) <= MAX_FRAME_EVENTS:
        return int(value)
    raise ValueError(f"expected {FRAME_ADAPTIVE}, {FRAME_TICK} or a whole number of events "
                     f"per frame from 1 to {MAX_FRAME_EVENTS}")


def _count(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError("expected a whole number, 0 or more")
    return int(raw)


def _events_rate(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 5_000_000:
        raise ValueError("expected events per second above 0")
    return value


def setup_logging(level: str, library_level: str | None = None) -> None:
    """Log to stderr at ``level``; libraries' loggers (anything outside ``proxy``) at
    ``library_level``, by default ``level`` but never below info, so that
    ``LOG_LEVEL=debug`` shows the proxy's own lines rather than trio-websocket's line
    per message (``LOG_LEVEL_LIBRARIES=debug`` brings those back)."""
    own = logging.getLevelName(level.upper())
    libraries = (logging.getLevelName(library_level.upper()) if library_level
                 else max(own, logging.INFO))
    logging.basicConfig(
        level=min(own, libraries),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("proxy").setLevel(own)
    for name in set(logging.root.manager.loggerDict) | set(LIBRARY_LOGGERS):
        if name.split(".")[0] != "proxy":
            logging.getLogger(name).setLevel(libraries)


#: Third-party loggers set up before they first log (they are created on import).
LIBRARY_LOGGERS = ("trio-websocket", "trio_websocket", "wsproto", "h11", "hpack", "asyncio")


def bind_error(variable: str, host: str, port: int, error: OSError) -> ConfigError:
    """A listening socket that cannot be opened, as the one-line error a bad setting gives."""
    if error.errno == errno.EADDRINUSE:
        problem = f"port {port} on {host} is already in use (another program, or this tier running twice?)"
    elif error.errno == errno.EACCES:
        problem = f"not allowed to listen on port {port} on {host} (ports below 1024 need privileges)"
    elif error.errno == errno.EADDRNOTAVAIL:
        problem = f"{host} is not an address of this machine, so port {port} cannot be opened there"
    else:
        problem = f"cannot listen on {host}:{port}: {error.strerror or error}"
    return ConfigError(variable, problem)


def check_market_url(market: str, url: str, variable: str) -> str | None:
    """A warning when the upstream URL's path names another market than the one served."""
    path = urlsplit(url).path.strip("/")
    if path in MARKETS and path != market:
        return (f"{variable} ends in /{path} but MARKET={market}: clients of the {market} "
                f"market would get {path} data; set MARKET={path} or fix the URL")
    return None
