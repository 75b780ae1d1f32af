"""Reading the settings of ``python -m proxy.replay``: an option on its command line, else a
``REPLAY_*`` variable from the environment and ``.env``, as the simulator's are read.

Kept apart from :mod:`proxy.app.config` (whose readers and parsers it uses) so that
the replay's few settings stay in one place. A bad value raises
:class:`~proxy.core.errors.ConfigError` naming the option when it came from the
command line, the variable otherwise.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, TypeVar

import decouple

from ..core.errors import ConfigError
from ..core.settings import ReplayConfig, SimulatorConfig
from .config import LOG_LEVELS, _bool, _choice, _keys, _port, _positive_int, _seconds, _source
from .journal_cli import parse_time

__all__ = ["REPLAY_OPTIONS", "parse_speed", "load_replay_config"]

T = TypeVar("T")

#: Each setting: its command-line option, its variable, and its default as text.
REPLAY_OPTIONS: dict[str, tuple[str, str, str]] = {
    "host": ("--host", "REPLAY_HOST", "127.0.0.1"),
    "port": ("--port", "REPLAY_PORT", "8766"),
    "api_keys": ("--api-keys", "REPLAY_API_KEYS", ""),
    "max_connections": ("--max-connections", "REPLAY_MAX_CONNECTIONS", "1"),
    "allow_star": ("--allow-star", "REPLAY_ALLOW_STAR", "false"),
    "speed": ("--speed", "REPLAY_SPEED", "1"),
    "from": ("--from", "REPLAY_FROM", ""),
    "to": ("--to", "REPLAY_TO", ""),
    "loop": ("--loop", "REPLAY_LOOP", "false"),
    "outage_statuses": ("--outage-statuses", "REPLAY_OUTAGE_STATUSES", "false"),
}


def parse_speed(raw: str) -> float | None:
    """``--speed`` / ``REPLAY_SPEED``: a number above 0 (2 = twice the recorded pace), or ``max``
    (None: as fast as the sockets take). Raises ValueError with a sentence otherwise."""
    text = raw.strip().lower()
    if text == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        raise ValueError("expected a number above 0 (2 = twice the recorded pace) or max") from None
    if not 0 < speed < float("inf"):
        raise ValueError("expected a number above 0 (2 = twice the recorded pace) or max")
    return speed


def load_replay_config(journal_dir: str, options: Mapping[str, str | None] | None = None, *,
                       now_ns: int | None = None) -> ReplayConfig:
    """The replay's configuration: ``options`` (keys of :data:`REPLAY_OPTIONS`, values as typed
    on the command line, None when not given) over the ``REPLAY_*`` variables. Times
    (``from``, ``to``) are read as ``python -m proxy.journal cat`` reads them, negative ones
    relative to ``now_ns`` (default: now). Raises ConfigError naming the option or variable."""
    source = _source()
    given = dict(options or {})
    now = time.time_ns() if now_ns is None else now_ns

    def read(name: str, parse: Callable[[str], T]) -> T:
        option, variable, default = REPLAY_OPTIONS[name]
        raw = given.get(name)
        where = option
        if raw is None:
            raw, where = str(source(variable, default=default)), variable
        raw = raw.strip()
        try:
            return parse(raw)
        except ValueError as error:
            raise ConfigError(where, f"{raw!r} is not valid: {error}") from None

    def moment(raw: str) -> int | None:
        return parse_time(raw, now) if raw else None

    server = SimulatorConfig(
        host=read("host", str),
        port=read("port", _port),
        api_keys=read("api_keys", _keys),
        max_connections=read("max_connections", _positive_int),
        allow_star=read("allow_star", _bool),
        auth_timeout_seconds=_variable(source, "AUTH_TIMEOUT_SECONDS", "10", _seconds),
        log_level=_variable(source, "LOG_LEVEL", "info", _choice(LOG_LEVELS)),
        library_log_level=_variable(source, "LOG_LEVEL_LIBRARIES", "",
                                    lambda raw: _choice(LOG_LEVELS)(raw) if raw else None),
        # One recorded frame is one frame out: never merged, whatever the socket does.
        frame_events=1,
    )
    from_ns, to_ns = read("from", moment), read("to", moment)
    if from_ns is not None and to_ns is not None and to_ns <= from_ns:
        raise ConfigError(_name_of("to", given), "must be later than the start (--from / REPLAY_FROM)")
    if not journal_dir:
        raise ConfigError("JOURNAL_DIR", "give the journal directory to replay")
    return ReplayConfig(
        journal_dir=journal_dir, server=server, speed=read("speed", parse_speed),
        from_ns=from_ns, to_ns=to_ns, loop=read("loop", _bool),
        outage_statuses=read("outage_statuses", _bool),
    )


def _name_of(name: str, given: Mapping[str, str | None]) -> str:
    option, variable, _default = REPLAY_OPTIONS[name]
    return option if given.get(name) is not None else variable


def _variable(source: decouple.Config, name: str, default: str, parse: Callable[[str], T]) -> T:
    raw = str(source(name, default=default)).strip()
    try:
        return parse(raw)
    except ValueError as error:
        raise ConfigError(name, f"{raw!r} is not valid: {error}") from None
