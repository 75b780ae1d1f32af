"""Configuration of each tier, read with python-decouple from the environment and a ``.env``.

Both proxy tiers run the same code (:mod:`proxy.app.tier`) with a
:class:`~proxy.core.settings.TierConfig`;
:func:`load_firehose_config` and :func:`load_filtered_config` fill it from the
tier-prefixed variables, so one ``.env`` serves both tiers. The simulator has
:class:`SimulatorConfig`. Which variable sets which field, how its text is parsed and what
its default is are declared on the field (:func:`proxy.core.settings.setting`); this module
only reads what the fields name, checks paths on the file system, and derives the keys. The file is ``.env`` in the working directory, or the
one ``PROXY_ENV_FILE`` names; the environment wins over the file. A bad value
raises :class:`ConfigError`, which ``trio-run`` prints as one line (exit 2).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import decouple

from ..core.entitlements import KeyBook, parse_key_file
from ..core.errors import ConfigError
from ..core.protocol import EVERYTHING_CHANNEL
from ..core.setting_text import key_set
from ..core.settings import (
    LOG_LEVELS,
    MARKETS,
    PathCheck,
    ReplayConfig,
    SimulatorConfig,
    TierConfig,
    TierKind,
    Variable,
    connections_variable,
    parse_frame_events,
    variable_of,
)

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
    "connections_variable",
    "declared_variables",
    "parse_setting",
    "settings_source",
    "DERIVED_VARIABLES",
]

T = TypeVar("T")


# --- reading -------------------------------------------------------------------------


def settings_source() -> decouple.Config:
    """Where settings are read: the environment, then `.env` (or the file PROXY_ENV_FILE names;
    empty or ``/dev/null``: no file, the environment only)."""
    named = os.environ.get("PROXY_ENV_FILE")
    if named is not None and not named.strip():
        return decouple.Config(decouple.RepositoryEmpty())
    path = Path(".env" if named is None else named)
    if named is not None:
        if not path.exists():
            raise ConfigError("PROXY_ENV_FILE", f"no such file: {path}")
        if path.is_dir():
            raise ConfigError("PROXY_ENV_FILE", f"{path} is a directory, not a file of settings")
    # a named file is read whatever it is (/dev/null: nothing); `.env` only when there is one
    repository = (decouple.RepositoryEnv(str(path)) if named is not None or path.is_file()
                  else decouple.RepositoryEmpty())
    return decouple.Config(repository)


def _raw(source: decouple.Config, name: str) -> str:
    return str(source(name, default="")).strip()


def _declared(cls: type, source: decouple.Config, tier: TierKind | None = None) -> dict[str, Any]:
    """Every field of ``cls`` declared with a variable (:func:`~proxy.core.settings.setting`):
    its variable's value, parsed and validated, or the default (the tier's, else the
    field's) when the variable is unset or blank. ConfigError names the variable."""
    values: dict[str, Any] = {}
    for field in attrs.fields(cls):
        variable = variable_of(field)
        name = variable.name_for(tier) if variable is not None else None
        if variable is None or name is None:
            continue
        raw = _raw(source, name)
        if not raw:
            if tier is not None and tier in variable.defaults:
                values[field.name] = variable.defaults[tier]
            continue  # the field's own default
        value = parse_setting(field, variable, raw, name)
        if variable.path is not None:
            _check_path(name, value, variable.path)
        values[field.name] = value
    return values


def parse_setting(field: attrs.Attribute, variable: Variable, raw: str, where: str) -> Any:
    """``raw`` (stripped, not blank) as ``field``'s value: parsed by its variable's parser and
    checked by the field's validator; ConfigError naming ``where`` (the variable or option) if not."""
    try:
        value = variable.parse(raw)
        if field.validator is not None:
            field.validator(None, field, value)
    except (ValueError, TypeError) as error:
        raise ConfigError(where, f"{raw!r} is not valid: {error}") from None
    return value


def _check_path(name: str, path: str, check: PathCheck) -> None:
    found = Path(path)
    if check is PathCheck.FILE and not found.is_file():
        raise ConfigError(name, f"{path!r} is not valid: no such file")
    if check is PathCheck.DIRECTORY and found.exists() and not found.is_dir():
        raise ConfigError(name, f"{path!r} is not valid: exists and is not a directory")


def _check_tls_pair(values: dict[str, Any], tier: TierKind) -> None:
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        missing = "tls_key" if values.get("tls_cert") else "tls_cert"
        raise ConfigError(_name_of(missing, tier), "TLS needs both a certificate and its key; only one is set")


def _name_of(field: str, tier: TierKind) -> str:
    variable = variable_of(attrs.fields_dict(TierConfig)[field])
    assert variable is not None
    return variable.name_for(tier) or field


def _required(source: decouple.Config, name: str) -> str:
    value = _raw(source, name)
    if not value:
        raise ConfigError(name, "is required but not set (put it in the environment or in .env)")
    return value


def _connections(source: decouple.Config) -> dict[str, int]:
    """``POLYGON_CONNECTIONS_<MARKET>`` for every market that has one set."""
    counts: dict[str, int] = {}
    for market in MARKETS:
        name = connections_variable(market)
        raw = _raw(source, name)
        if raw:
            if not raw.isdigit() or not 1 <= int(raw) <= 100:
                raise ConfigError(name, f"{raw!r} is not valid: expected a whole number of connections from 1 to 100")
            counts[market] = int(raw)
    return counts


def _check_markets(values: dict[str, Any]) -> None:
    """MARKET is the one-market spelling of MARKETS: set both, and they must agree."""
    markets, market = values.get("markets", ()), values.get("market")
    if markets and market is not None and market not in markets:
        raise ConfigError("MARKET", f"MARKET={market} is not among MARKETS={','.join(markets)}; "
                                    "set one of them (MARKETS lists every market served)")
    if markets:
        values["market"] = markets[0]


def read_key_file(path: str) -> KeyBook:
    """The named keys in ``path`` (API_KEYS_FILE); ConfigError naming the file, line and problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("API_KEYS_FILE", f"cannot read {path}: {error}") from None
    return parse_key_file(text, path)


def _tier_settings(source: decouple.Config, tier: TierKind) -> dict[str, Any]:
    values = _declared(TierConfig, source, tier)
    _check_tls_pair(values, tier)
    _check_markets(values)
    values["upstream_connections"] = _connections(source)
    path = values.get("api_keys_file")
    values["key_book"] = read_key_file(path) if path else KeyBook()
    return values


def load_firehose_config() -> TierConfig:
    """The firehose's configuration from the environment and ``.env``; raises ConfigError naming a bad variable."""
    source = settings_source()
    api_key = _required(source, "POLYGON_API_KEY")
    accepted = key_set(_raw(source, "FIREHOSE_API_KEYS"))
    config = TierConfig(
        tier=TierKind.FIREHOSE,
        upstream_api_key=api_key,
        upstream_extra=(),
        api_keys=accepted or frozenset({api_key}),
        allow_any_key=False,
        **_tier_settings(source, TierKind.FIREHOSE),
    )
    shortfall = config.connection_shortfall()
    if shortfall is not None:
        raise ConfigError(*shortfall)
    return config


def load_filtered_config() -> TierConfig:
    """The filtered proxy's configuration from the environment and ``.env``; raises ConfigError naming a bad variable."""
    source = settings_source()
    api_key = _raw(source, "POLYGON_API_KEY")
    accepted = key_set(_raw(source, "FILTERED_PROXY_API_KEYS"))
    if not accepted and api_key:
        accepted = frozenset({api_key})
    firehose_key, firehose_key_source = _firehose_key(source, api_key)
    values = _tier_settings(source, TierKind.FILTERED)
    return TierConfig(
        tier=TierKind.FILTERED,
        upstream_api_key=firehose_key,
        upstream_api_key_source=firehose_key_source,
        upstream_extra=(EVERYTHING_CHANNEL,),
        api_keys=accepted,
        allow_any_key=not accepted and not values["key_book"],
        **values,
    )


def _firehose_key(source: decouple.Config, polygon_key: str) -> tuple[str, str]:
    """The key the filtered proxy presents to the firehose, and the setting it came from.

    ``FILTERED_PROXY_FIREHOSE_KEY`` when set. Otherwise, when one ``.env`` serves both
    tiers and names the keys the firehose accepts (``FIREHOSE_API_KEYS``), the first of
    those: the firehose accepts it by definition. Otherwise ``POLYGON_API_KEY``, which a
    firehose with no ``FIREHOSE_API_KEYS`` accepts (the original single-key arrangement).
    """
    explicit = _raw(source, "FILTERED_PROXY_FIREHOSE_KEY")
    if explicit:
        return explicit, "FILTERED_PROXY_FIREHOSE_KEY"
    firehose_keys = [key.strip() for key in _raw(source, "FIREHOSE_API_KEYS").split(",") if key.strip()]
    if firehose_keys:
        return firehose_keys[0], "FIREHOSE_API_KEYS (its first key)"
    return polygon_key, "POLYGON_API_KEY"


def load_simulator_config() -> SimulatorConfig:
    """The simulator's configuration from the environment and ``.env``; raises ConfigError naming a bad variable."""
    return SimulatorConfig(**_declared(SimulatorConfig, settings_source()))


#: Variables read beside the fields' own: keys and the files they come from, and the replay's
#: times (read relative to now by proxy.app.replay_config). README lists them too.
DERIVED_VARIABLES = ("POLYGON_API_KEY", "FIREHOSE_API_KEYS", "FILTERED_PROXY_API_KEYS",
                     "FILTERED_PROXY_FIREHOSE_KEY", "PROXY_ENV_FILE", "REPLAY_FROM", "REPLAY_TO",
                     *(connections_variable(market) for market in MARKETS))


def declared_variables() -> set[str]:
    """Every environment variable the tiers, the simulator and the replay read."""
    names = set(DERIVED_VARIABLES)
    for cls in (TierConfig, SimulatorConfig, ReplayConfig):
        for field in attrs.fields(cls):
            variable = variable_of(field)
            if variable is not None:
                names.update([variable.name] if isinstance(variable.name, str) else variable.name.values())
    return names


def setup_logging(level: str, library_level: str | None = None, *, tag: str | None = None) -> None:
    """Log to stderr at ``level``; libraries' loggers (anything outside ``proxy``) at
    ``library_level``, by default ``level`` but never below info, so that
    ``LOG_LEVEL=debug`` shows the proxy's own lines rather than trio-websocket's line
    per message (``LOG_LEVEL_LIBRARIES=debug`` brings those back). ``tag`` marks every
    line (``worker 2``: the workers of one tier share its stderr)."""
    own = logging.getLevelName(level.upper())
    libraries = (logging.getLevelName(library_level.upper()) if library_level
                 else max(own, logging.INFO))
    logging.basicConfig(
        level=min(own, libraries),
        format="%(asctime)s %(levelname)s " + (f"[{tag}] " if tag else "") + "%(name)s: %(message)s",
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
