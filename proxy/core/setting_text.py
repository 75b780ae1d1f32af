"""How a setting's text (from the environment or a ``.env``) becomes its value.

Pure functions, one per kind of value, each raising ``ValueError`` that says what was
expected. They convert; ranges are the fields' validators in :mod:`proxy.core.settings`,
which hold for configurations built in code too. Which variable feeds which field, with
which of these, is declared on the field itself (:func:`proxy.core.settings.setting`).
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Iterable, TypeVar
from urllib.parse import urlsplit

from .errors import ClientMessageError
from .markets import MARKET_NAMES, MARKET_TABLE
from .protocol import Channel, parse_channel_list

__all__ = [
    "admin_token",
    "as_tuple",
    "boolean",
    "channel_list",
    "choice",
    "enum_choice",
    "gigabytes_or_unbounded",
    "hours_or_unbounded",
    "key_set",
    "market_caps",
    "megabytes",
    "names",
    "number",
    "port",
    "port_or_off",
    "symbols",
    "text",
    "whole_number",
    "ws_url",
]

E = TypeVar("E", bound=enum.Enum)


def text(raw: str) -> str:
    """The text as it is (already stripped by the reader)."""
    return raw


def whole_number(raw: str) -> int:
    """``0``, ``1``, ...: digits only (no sign, no point)."""
    if not raw.isdigit():
        raise ValueError("expected a whole number")
    return int(raw)


def number(raw: str) -> float:
    """Any finite decimal number (``2``, ``0.5``, ``1e3``)."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def port(raw: str) -> int:
    """A port number (its range is the field's validator)."""
    if not raw.isdigit():
        raise ValueError("expected a port number from 0 to 65535")
    return int(raw)


def port_or_off(raw: str) -> int | None:
    """A port number; ``0`` turns the listener off (None)."""
    return port(raw) or None


def choice(options: tuple[str, ...]) -> Callable[[str], str]:
    """One of ``options``, in any case."""

    def parse(raw: str) -> str:
        if raw.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return raw.lower()

    return parse


def enum_choice(kind: type[E]) -> Callable[[str], E]:
    """A member of the string enum ``kind``, by its value, in any case."""
    options = tuple(str(member.value) for member in kind)
    pick = choice(options)
    return lambda raw: kind(pick(raw))


def boolean(raw: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0``."""
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def key_set(raw: str) -> frozenset[str]:
    """Comma-separated keys (blanks around them ignored)."""
    return frozenset(key.strip() for key in raw.split(",") if key.strip())


def channel_list(raw: str) -> tuple[Channel, ...]:
    """Channels as a client's ``params`` spells them: ``T.*,Q.AAPL``."""
    try:
        return parse_channel_list(raw)
    except ClientMessageError as error:
        raise ValueError(str(error)) from None


def ws_url(raw: str) -> str:
    """A ``ws://`` or ``wss://`` URL with a host."""
    parts = urlsplit(raw)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("expected a ws:// or wss:// URL")
    return raw


def _amount(raw: str) -> float:
    value = number(raw)
    if value < 0:
        raise ValueError("expected a number, 0 or more")
    return value


def megabytes(raw: str) -> int:
    """Megabytes (10^6 bytes, fractions allowed) as bytes."""
    return int(_amount(raw) * 1e6)


def hours_or_unbounded(raw: str) -> float | None:
    """Hours as seconds; ``0`` means no bound (None)."""
    return _amount(raw) * 3600 or None


def gigabytes_or_unbounded(raw: str) -> int | None:
    """Gigabytes (10^9 bytes) as bytes; ``0`` means no bound (None)."""
    return int(_amount(raw) * 1e9) or None


def admin_token(raw: str) -> str:
    """A token for the admin pages: long enough to guard them, and safe in a cookie."""
    if len(raw) < 16:
        raise ValueError("use at least 16 characters (it guards client addresses and key names)")
    if any(character in raw for character in ";, \t\"\\"):
        raise ValueError("a token goes into a cookie: no spaces, commas, semicolons, quotes or backslashes")
    return raw


def symbols(raw: str) -> tuple[str, ...] | int:
    """How many symbols to make up (a count), or which (a comma-separated list)."""
    if raw.isdigit():
        return int(raw)
    listed = tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    if not listed:
        raise ValueError("expected a count or a comma-separated list of symbols")
    return listed



def names(raw: str) -> tuple[str, ...]:
    """Comma-separated names (``stocks,options``), in lowercase, each once, in the order given."""
    return tuple(dict.fromkeys(name.strip().lower() for name in raw.split(",") if name.strip()))


def as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    """A converter for fields holding a list of names: any iterable becomes a tuple (typed, where
    ``converter=tuple`` would be generic to mypy)."""
    return tuple(value)


def market_caps(raw: str) -> dict[str, dict[str, int]]:
    """Per-connection caps by market and event type: ``options.Q=1000,crypto.XL2=50``."""
    caps: dict[str, dict[str, int]] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        market_name, _, code = name.strip().partition(".")
        if market_name not in MARKET_NAMES or not code or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"expected MARKET.TYPE=COUNT items such as options.Q=1000 (markets: "
                             f"{', '.join(MARKET_NAMES)}; COUNT at least 1), not {item!r}")
        codes = MARKET_TABLE[market_name].codes
        if code.strip() not in codes:
            raise ValueError(f"{market_name} has no event type {code.strip()!r} (its types: {', '.join(codes)})")
        caps.setdefault(market_name, {})[code.strip()] = int(value)
    return caps
