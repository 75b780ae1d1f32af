"""Named keys on a running tier: entitlements enforced on subscribe, per-key connection limits,
markets, and the key file reloaded (SIGHUP or a change) without dropping anyone entitled."""

from __future__ import annotations

import logging
import os
import signal

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.core.entitlements import KeyBook, KeyEntry, hash_key, parse_key_file
from proxy.core.protocol import parse_channel
from proxy.core.session import Phase, SessionState
from tests.helpers import FIREHOSE_KEY, authed_client, connect, selects, start_firehose, wait_until

RESEARCH, TRADING, OPTIONS_ONLY = "research-key-1", "trading-key-22", "options-key-333"


def key_file(research_channels: str = '["T.*", "Q.AAPL"]', *, trading: bool = True) -> str:
    text = f"""
[keys.research]
sha256 = "{hash_key(RESEARCH)}"
channels = {research_channels}
max_connections = 2

[keys.options-desk]
sha256 = "{hash_key(OPTIONS_ONLY)}"
markets = ["options"]
"""
    if trading:
        text += f'\n[keys.trading]\nsha256 = "{hash_key(TRADING)}"\n'
    return text


async def keyed_firehose(nursery, tmp_path, text: str | None = None):
    path = tmp_path / "keys.toml"
    path.write_text(text or key_file())
    sim, firehose = await start_firehose(nursery, api_keys_file=str(path),
                                         key_book=parse_key_file(path.read_text(), str(path)))
    return sim, firehose, path


async def test_a_subscribe_outside_the_entitlement_is_refused_whole_and_names_key_and_channel(nursery, tmp_path):
    _, firehose, _ = await keyed_firehose(nursery, tmp_path)
    client = await authed_client(nursery, firehose.port, RESEARCH)
    answer = await client.request("subscribe", "T.AAPL,Q.MSFT")
    assert answer[0]["status"] == "error"
    assert "key 'research' may not subscribe Q.MSFT" in answer[0]["message"]
    assert "nothing of this subscribe was applied" in answer[0]["message"]
    session = next(iter(firehose.hub.sessions))
    assert firehose.registry.channels_of(session) == frozenset()
    assert [s["message"] for s in await client.request("subscribe", "T.*,Q.AAPL")] == [
        "subscribed to: T.*", "subscribed to: Q.AAPL"]
    events = await client.wait_events(200)
    assert all(selects("T.*,Q.AAPL", event) for event in events)
    assert session.key_name == "research"


async def test_unnamed_keys_and_named_keys_work_side_by_side(nursery, tmp_path):
    _, firehose, _ = await keyed_firehose(nursery, tmp_path)
    unnamed = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="Q.*")
    trading = await authed_client(nursery, firehose.port, TRADING, subscribe="*")
    await unnamed.wait_events(5)
    await trading.wait_events(5)
    assert sorted(s.key_name for s in firehose.hub.sessions) == ["trading", "unnamed"]


async def test_a_key_over_its_connection_limit_is_refused_like_one_over_the_address_limit(nursery, tmp_path):
    _, firehose, _ = await keyed_firehose(nursery, tmp_path)
    await authed_client(nursery, firehose.port, RESEARCH)
    await authed_client(nursery, firehose.port, RESEARCH)
    third = await connect(nursery, firehose.port)
    await third.send("auth", RESEARCH)
    refusal = (await third.next_status())[0]
    assert refusal["status"] == "max_connections" and "at most 2 connections" in refusal["message"]
    assert await third.close_code() == 1013
    assert firehose.stats.refused_per_key == 1


async def test_a_key_not_entitled_to_the_market_fails_auth(nursery, tmp_path):
    _, firehose, _ = await keyed_firehose(nursery, tmp_path)
    client = await connect(nursery, firehose.port)
    answer = (await client.auth(OPTIONS_ONLY))[0]
    assert answer["status"] == "auth_failed" and "not entitled to the stocks market" in answer["message"]
    assert await client.close_code() == 1008


async def test_a_reload_closes_removed_keys_narrows_channels_and_leaves_the_rest(nursery, tmp_path, caplog):
    _, firehose, path = await keyed_firehose(nursery, tmp_path)
    research = await authed_client(nursery, firehose.port, RESEARCH, subscribe="T.*,Q.AAPL")
    trading = await authed_client(nursery, firehose.port, TRADING, subscribe="Q.*")
    unnamed = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.MSFT")
    path.write_text(key_file('["Q.AAPL"]', trading=False))
    os.kill(os.getpid(), signal.SIGHUP)
    revoked = (await trading.next_status(timeout=10))[0]
    assert revoked["status"] == "auth_revoked" and "'trading' was removed" in revoked["message"]
    assert await trading.close_code() == 1008
    narrowed = (await research.next_status(timeout=10))[0]
    assert narrowed["status"] == "error" and "lost T.*" in narrowed["message"]
    session = next(s for s in firehose.hub.sessions if s.key_name == "research")
    assert {c.text for c in firehose.registry.channels_of(session)} == {"Q.AAPL"}
    start = len(research.events)
    await research.wait_events(start + 20, timeout=15)
    assert all(e["ev"] == "Q" and e["sym"] == "AAPL" for e in research.events[start + 5:])
    assert len(firehose.hub.sessions) == 2 and unnamed.statuses[-1]["message"] == "subscribed to: T.MSFT"
    # a malformed file is refused on reload and the keys in force stay
    with caplog.at_level(logging.ERROR):
        path.write_text("[keys.research\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: any("not reloaded" in r.getMessage() for r in caplog.records), timeout=10)
    assert firehose.hub.key_book.names() == ["research", "options-desk"]


async def test_a_changed_file_is_reloaded_without_a_signal(nursery, tmp_path):
    _, firehose, path = await keyed_firehose(nursery, tmp_path)
    path.write_text(key_file(trading=False) + "\n# changed\n")
    await wait_until(lambda: firehose.hub.key_book.names() == ["research", "options-desk"], timeout=10,
                     what="the file's change noticed")


# --- a client never holds a channel outside its entitlement (stateful) -----------------------

PATTERNS = ["*", "T.*", "Q.*", "T.AAPL", "Q.AAPL", "T.MSFT", "LULD.*"]
CHANNELS = ["T.AAPL", "T.MSFT", "Q.AAPL", "Q.MSFT", "T.*", "Q.*", "LULD.AAPL", "*"]


def entry_for(patterns: list[str] | None) -> KeyEntry:
    return KeyEntry("k", hash_key("k"), channels=None if patterns is None else tuple(map(parse_channel, patterns)))


class EntitledSession(RuleBasedStateMachine):
    """Subscribes, unsubscribes and key-file reloads in any order: the session's channels, and
    every channel any reaction asks the registry for, stay within the key's entitlement."""

    def __init__(self) -> None:
        super().__init__()
        self.entry = entry_for(["T.*", "Q.AAPL"])
        self.state = SessionState(accepted_keys=frozenset(), key_book=KeyBook((self.entry,)))
        assert self.state.receive('{"action":"auth","params":"k"}').outcome == "authenticated"
        self.held: set[str] = set()

    @rule(channels=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=4))
    def subscribe(self, channels):
        reaction = self.state.receive('{"action":"subscribe","params":"%s"}' % ",".join(channels), 0.0)
        assert all(self.entry.allows(channel) for channel in reaction.subscribe)
        if reaction.subscribe:
            self.held |= {channel.text for channel in reaction.subscribe}
        else:  # refused (nothing of it applied), or nothing new: a reaction carries only the channels it added
            assert reaction.outcome == "error" or {parse_channel(c).text for c in channels} <= self.held

    @rule(channels=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=4))
    def unsubscribe(self, channels):
        reaction = self.state.receive('{"action":"unsubscribe","params":"%s"}' % ",".join(channels), 0.0)
        self.held -= {channel.text for channel in reaction.unsubscribe}

    @rule(patterns=st.one_of(st.none(), st.lists(st.sampled_from(PATTERNS), max_size=3)))
    def reload(self, patterns):
        self.entry = entry_for(patterns)
        reaction = self.state.revoke(KeyBook((self.entry,)))
        if reaction is not None:
            self.held -= {channel.text for channel in reaction.unsubscribe}

    @invariant()
    def only_entitled_channels_are_held(self):
        assert self.state.phase is Phase.AUTHENTICATED
        assert {c.text for c in self.state.channels} == self.held
        assert all(self.entry.allows(channel) for channel in self.state.channels)


EntitledSession.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
test_entitled_session = EntitledSession.TestCase


def test_a_malformed_key_file_stops_start_up_with_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.research]\nsha256 = "{hash_key(RESEARCH)}"\n\n[keys.trading]\nsha256 = "short"\n')
    (tmp_path / "none.env").write_text("")
    env = {**os.environ, "PROXY_ENV_FILE": str(tmp_path / "none.env"), "POLYGON_API_KEY": "k",
           "API_KEYS_FILE": str(keys), "FIREHOSE_PORT": "0", "FIREHOSE_METRICS_PORT": "0"}
    result = subprocess.run([str(Path(sys.executable).parent / "trio-run"), "proxy.firehose"], env=env,
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"configuration error: API_KEYS_FILE: {keys}:4: [keys.trading]: sha256 must be the key's SHA-256 "
        "in hex, 64 characters (python -m proxy.keys hash prints it)"]
