"""Named API keys and what each may do, from a TOML key file: parsed and checked, no I/O.

A key file (``API_KEYS_FILE``) has one table per key under ``keys``::

    [keys.research]                  # the key's name: logs, metrics and /clients show it
    sha256 = "9f86d0...15b0f00a08"   # SHA-256 of the key, hex: the file holds no secret
    channels = ["T.*", "Q.AAPL"]     # optional: allowed channel patterns (default: all, and "*")
    markets = ["stocks"]             # optional: allowed markets (default: all served)
    max_connections = 5              # optional: connections this key may hold at once

:func:`parse_key_file` turns the file's text into a :class:`KeyBook` or raises
:class:`~proxy.core.errors.ConfigError` naming the file, the line and the problem;
:meth:`KeyBook.identify` finds the entry for a presented key by its hash; and
:meth:`KeyEntry.allows` says whether a channel is within the key's entitlement.
The text is read by the caller (this module touches no files); TOML is parsed by
the standard library's ``tomllib``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from typing import Any, Iterable

import attrs

from .errors import ClientMessageError, ConfigError
from .protocol import Channel, parse_channel

__all__ = ["KeyBook", "KeyEntry", "hash_key", "parse_key_file"]

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FIELDS = {"sha256", "channels", "markets", "max_connections"}


def hash_key(key: str) -> str:
    """The SHA-256 of ``key`` as lowercase hex: what a key file stores instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


@attrs.frozen
class KeyEntry:
    """One named key and its entitlements; ``None`` means unrestricted."""

    name: str
    sha256: str
    channels: tuple[Channel, ...] | None = None
    markets: frozenset[str] | None = None
    max_connections: int | None = None

    def allows(self, channel: Channel) -> bool:
        """Whether subscribing ``channel`` is within this key's channel patterns.

        ``*`` is allowed only by ``*`` (or no list at all); ``T.*`` only by ``T.*``;
        ``T.AAPL`` by ``T.AAPL`` or ``T.*``.
        """
        if self.channels is None:
            return True
        return any(pattern.covers(channel) for pattern in self.channels)

    def refused(self, channels: Iterable[Channel]) -> list[Channel]:
        """The channels of ``channels`` this key may not subscribe, in order."""
        return [channel for channel in channels if not self.allows(channel)]

    def serves(self, market: str) -> bool:
        """Whether this key may use ``market``."""
        return self.markets is None or market in self.markets


@attrs.frozen
class KeyBook:
    """Every named key, found by the hash of what a client presents."""

    entries: tuple[KeyEntry, ...] = ()

    def identify(self, presented: str) -> KeyEntry | None:
        """The entry whose hash matches ``presented``, or None.

        Every entry is compared (no early exit), in constant time per comparison,
        so the answer's timing says nothing about which key came close.
        """
        digest = hash_key(presented).encode()
        found: KeyEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.sha256.encode()):
                found = entry
        return found

    def names(self) -> list[str]:
        """The keys' names, in file order."""
        return [entry.name for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)


def parse_key_file(text: str, filename: str = "API_KEYS_FILE") -> KeyBook:
    """A :class:`KeyBook` from a key file's text; ConfigError naming the file, line and problem."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("API_KEYS_FILE", f"{filename}: not valid TOML: {error}") from None
    unknown = set(document) - {"keys"}
    if unknown:
        raise ConfigError("API_KEYS_FILE", f"{filename}: only [keys.NAME] tables belong here, "
                          f"not {', '.join(sorted(unknown))}")
    tables = document.get("keys", {})
    if not isinstance(tables, dict):
        raise ConfigError("API_KEYS_FILE", f"{filename}: `keys` must be tables like [keys.research]")
    entries: list[KeyEntry] = []
    seen_hashes: dict[str, str] = {}
    for name, table in tables.items():
        where = f"{filename}:{_line_of(text, name)}"
        entry = _entry(name, table, where)
        if entry.sha256 in seen_hashes:
            raise ConfigError("API_KEYS_FILE", f"{where}: [keys.{name}] has the same sha256 as "
                              f"[keys.{seen_hashes[entry.sha256]}]: one key, one name")
        seen_hashes[entry.sha256] = name
        entries.append(entry)
    return KeyBook(tuple(entries))


def _entry(name: str, table: Any, where: str) -> KeyEntry:
    def problem(text: str) -> ConfigError:
        return ConfigError("API_KEYS_FILE", f"{where}: [keys.{name}]: {text}")

    if not _NAME.fullmatch(name):
        raise problem("a key's name is 1 to 64 letters, digits, '.', '_' or '-'")
    if not isinstance(table, dict):
        raise problem("must be a table with at least sha256 = \"...\"")
    extra = set(table) - _FIELDS
    if extra:
        raise problem(f"unknown field {', '.join(sorted(extra))} (known: {', '.join(sorted(_FIELDS))})")
    digest = table.get("sha256")
    if not isinstance(digest, str) or not _HEX_SHA256.fullmatch(digest.lower()):
        raise problem("sha256 must be the key's SHA-256 in hex, 64 characters "
                      "(python -m proxy.keys hash prints it)")
    channels = table.get("channels")
    parsed: tuple[Channel, ...] | None = None
    if channels is not None:
        if not isinstance(channels, list) or not all(isinstance(item, str) for item in channels):
            raise problem('channels must be a list of channel patterns like ["T.*", "Q.AAPL"]')
        try:
            parsed = tuple(parse_channel(item) for item in channels)
        except ClientMessageError as error:
            raise problem(f"channels: {error.message}") from None
    markets = table.get("markets")
    if markets is not None and (not isinstance(markets, list)
                                or not all(isinstance(item, str) and item for item in markets)):
        raise problem('markets must be a list of market names like ["stocks"]')
    limit = table.get("max_connections")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise problem("max_connections must be a whole number of at least 1")
    return KeyEntry(
        name=name, sha256=digest.lower(), channels=parsed,
        markets=frozenset(markets) if markets is not None else None, max_connections=limit,
    )


def _line_of(text: str, name: str) -> int:
    """The line of ``[keys.NAME]`` in the file (1-based), for error messages; 1 if not found."""
    pattern = re.compile(r"^\s*\[\s*keys\s*\.\s*(?:\"%s\"|'%s'|%s)\s*\]" % ((re.escape(name),) * 3))
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return 1
