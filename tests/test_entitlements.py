"""Named keys and entitlements: the key file's parsing, its errors, and what a key may subscribe."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.entitlements import KeyBook, KeyEntry, hash_key, parse_key_file
from proxy.core.errors import ConfigError
from proxy.core.protocol import Channel, parse_channel

RESEARCH_KEY, TRADING_KEY = "research-secret", "trading-secret"
KEY_FILE = f"""
# who may use this proxy
[keys.research]
sha256 = "{hash_key(RESEARCH_KEY)}"
channels = ["T.*", "Q.AAPL"]
markets = ["stocks"]
max_connections = 5

[keys.trading]
sha256 = "{hash_key(TRADING_KEY).upper()}"
"""


def test_hash_key_is_sha256_hex():
    assert hash_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_a_key_file_parses_into_named_entries():
    book = parse_key_file(KEY_FILE)
    assert book.names() == ["research", "trading"]
    research = book.identify(RESEARCH_KEY)
    assert research is not None and research.name == "research"
    assert research.max_connections == 5 and research.markets == {"stocks"}
    assert research.channels == (Channel("T", "*"), Channel("Q", "AAPL"))
    trading = book.identify(TRADING_KEY)  # upper-case hex in the file is fine
    assert trading is not None and trading.channels is None and trading.markets is None
    assert book.identify("nobody") is None and book.identify("") is None


@pytest.mark.parametrize("channel, allowed", [
    ("T.AAPL", True), ("T.*", True), ("Q.AAPL", True), ("Q.MSFT", False), ("Q.*", False),
    ("*", False), ("LULD.AAPL", False),
])
def test_a_key_allows_exactly_its_patterns(channel, allowed):
    research = parse_key_file(KEY_FILE).identify(RESEARCH_KEY)
    assert research is not None
    assert research.allows(parse_channel(channel)) is allowed


def test_an_unrestricted_key_allows_everything_and_star_only_by_star():
    assert KeyEntry("x", "0" * 64).allows(parse_channel("*"))
    assert KeyEntry("x", "0" * 64, channels=(parse_channel("*"),)).allows(parse_channel("*"))
    assert not KeyEntry("x", "0" * 64, channels=(parse_channel("T.*"),)).allows(parse_channel("*"))
    entry = KeyEntry("x", "0" * 64, markets=frozenset({"stocks"}))
    assert entry.serves("stocks") and not entry.serves("options")
    assert entry.refused([parse_channel("T.A")]) == []


@pytest.mark.parametrize("text, fragment", [
    ("[keys.a\nsha256 = 1", "API_KEYS_FILE: keys.toml: not valid TOML"),
    ('[other]\nx = 1', "only [keys.NAME] tables belong here, not other"),
    ('\n\n[keys.a]\nsha256 = "abc"', "keys.toml:3: [keys.a]: sha256 must be"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nchannels = "T.*"', "channels must be a list"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nchannels = ["T AAPL"]', "channels: bad channel"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nmarkets = "stocks"', "markets must be a list"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nmax_connections = 0', "max_connections must be"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nmax_connections = true', "max_connections must be"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nchanels = ["T.*"]', "unknown field chanels"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\n[keys.b]\nsha256 = "{"0" * 64}"',
     "keys.toml:3: [keys.b] has the same sha256 as [keys.a]"),
    (f'[keys."a b"]\nsha256 = "{"0" * 64}"', "a key's name is"),
])
def test_a_malformed_key_file_names_the_file_the_line_and_the_problem(text, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_key_file(text, "keys.toml")
    assert fragment in str(caught.value)
    assert str(caught.value).startswith("configuration error: API_KEYS_FILE: keys.toml")


PATTERNS = st.sampled_from(["*", "T.*", "Q.*", "T.AAPL", "Q.AAPL", "T.MSFT", "LULD.*"])


@given(patterns=st.one_of(st.none(), st.lists(PATTERNS, max_size=4)), wanted=PATTERNS)
def test_allows_agrees_with_a_reference_reading_of_the_patterns(patterns, wanted):
    entry = KeyEntry("k", "0" * 64, channels=None if patterns is None else tuple(map(parse_channel, patterns)))

    def reference(pattern: str) -> bool:  # written from the README's rules, not from the code
        if pattern == "*":
            return True
        kind, _, symbol = pattern.partition(".")
        wanted_kind, _, wanted_symbol = wanted.partition(".")
        return wanted != "*" and kind == wanted_kind and symbol in ("*", wanted_symbol)

    expected = patterns is None or any(reference(pattern) for pattern in patterns)
    assert entry.allows(parse_channel(wanted)) is expected


def test_the_hash_command_prints_the_line_for_the_key_file():
    result = subprocess.run([sys.executable, "-m", "proxy.keys", "hash", "--name", "research"],
                            input="test\n", capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "[keys.research]", 'sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"']
    book = parse_key_file(result.stdout)
    assert isinstance(book, KeyBook) and book.identify("test") is not None
    empty = subprocess.run([sys.executable, "-m", "proxy.keys", "hash"], input="", capture_output=True, text=True)
    assert empty.returncode == 2 and "no key" in empty.stderr
