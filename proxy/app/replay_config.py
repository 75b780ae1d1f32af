"""Reading the settings of ``python -m proxy.replay``: an option on its command line, else the
variable its :class:`~proxy.core.settings.ReplayConfig` field declares (``REPLAY_*``), from
the environment and ``.env``, as :mod:`proxy.app.config` reads the tiers' and the simulator's.

Kept apart from :mod:`proxy.app.config` so that the replay's few settings stay in one
place. ``REPLAY_FROM`` / ``REPLAY_TO`` are read here rather than declared on the fields:
a negative time means "before now", which only a reader with a clock can resolve. A bad
value raises :class:`~proxy.core.errors.ConfigError` naming the option when it came from
the command line, the variable otherwise.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import attrs

from ..core.errors import ConfigError
from ..core.settings import ReplayConfig, parse_speed, variable_of
from .config import parse_setting, settings_source
from .journal_cli import parse_time

__all__ = ["REPLAY_OPTIONS", "REPLAY_TIME_VARIABLES", "parse_speed", "load_replay_config"]

#: The command-line option of each setting, by the field (or, for times, the key) it sets.
REPLAY_OPTIONS: dict[str, str] = {
    "host": "--host",
    "port": "--port",
    "api_keys": "--api-keys",
    "max_connections": "--max-connections",
    "allow_star": "--allow-star",
    "speed": "--speed",
    "from": "--from",
    "to": "--to",
    "loop": "--loop",
    "outage_statuses": "--outage-statuses",
}
#: The variables of the two times, read beside the fields' own.
REPLAY_TIME_VARIABLES = {"from": "REPLAY_FROM", "to": "REPLAY_TO"}


def load_replay_config(journal_dir: str, options: Mapping[str, str | None] | None = None, *,
                       now_ns: int | None = None) -> ReplayConfig:
    """The replay's configuration: ``options`` (keys of :data:`REPLAY_OPTIONS`, values as typed
    on the command line, None when not given) over the variables. Times (``from``, ``to``)
    are read as ``python -m proxy.journal cat`` reads them, negative ones relative to
    ``now_ns`` (default: now). Raises ConfigError naming the option or the variable."""
    source = settings_source()
    given = {name: value for name, value in (options or {}).items() if value is not None}
    now = time.time_ns() if now_ns is None else now_ns
    values: dict[str, Any] = {}
    for field in attrs.fields(ReplayConfig):
        variable = variable_of(field)
        if variable is None or not isinstance(variable.name, str):
            continue
        if field.name in given:
            raw, where = given[field.name].strip(), REPLAY_OPTIONS[field.name]
        else:
            raw, where = str(source(variable.name, default="")).strip(), variable.name
        if not raw:
            continue  # the field's default
        values[field.name] = parse_setting(field, variable, raw, where)
    for key, variable_name in REPLAY_TIME_VARIABLES.items():
        raw, where = (given[key], REPLAY_OPTIONS[key]) if key in given else (
            str(source(variable_name, default="")), variable_name)
        if raw.strip():
            try:
                values[f"{key}_ns"] = parse_time(raw, now)
            except ValueError as error:
                raise ConfigError(where, f"{raw.strip()!r} is not valid: {error}") from None
    if values.get("from_ns") is not None and values.get("to_ns") is not None and values["to_ns"] <= values["from_ns"]:
        where = REPLAY_OPTIONS["to"] if "to" in given else REPLAY_TIME_VARIABLES["to"]
        raise ConfigError(where, "must be later than the start (--from / REPLAY_FROM)")
    if not journal_dir:
        raise ConfigError("JOURNAL_DIR", "give the journal directory to replay")
    return ReplayConfig(journal_dir=journal_dir, **values)
