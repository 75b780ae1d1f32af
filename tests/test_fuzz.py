"""Hypothesis throws random bytes and random JSON at the client protocol of a live filtered proxy.

The chain (simulator → firehose → filtered proxy) runs in a Trio thread of its own,
with a ``*`` neighbour that must see a gapless stream throughout; each example is a
fresh synchronous ``websockets`` client. The server must answer every message with a
JSON array of events, or close with a defined code, and never crash.
"""

from __future__ import annotations

import json
import threading

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from tests.helpers import ALL_STREAM, CLIENT_KEY, LIVENESS_SECONDS, Neighbour, authed_client, start_chain

DEFINED_CLOSE_CODES = {1008, 1009, 1013}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
actions = st.fixed_dictionaries(
    {"action": st.sampled_from(["auth", "subscribe", "unsubscribe", "x", ""]) | st.text(max_size=10)},
    optional={"params": st.text(max_size=60) | json_values},
)
messages = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    json_values.map(json.dumps),
    actions.map(json.dumps),
)


@pytest.fixture(scope="module")
def live_chain():
    state: dict = {}
    ready = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, _, filtered = await start_chain(
                nursery, simulator=dict(events_per_second=1000), firehose=dict(static_channels=ALL_STREAM),
                filtered=dict(control_messages_per_second=1000))
            neighbour = Neighbour(await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*"))
            nursery.start_soon(neighbour.run)
            state.update(filtered=filtered, neighbour=neighbour, scope=nursery.cancel_scope,
                         token=trio.lowlevel.current_trio_token())
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(60), "the chain did not start"
    yield state
    trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
    thread.join(10)


def _answer_or_close(url: str, message: str | bytes, authenticate: bool) -> None:
    with sync_connect(url, open_timeout=LIVENESS_SECONDS, close_timeout=1, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=LIVENESS_SECONDS))[0]["status"] == "connected"
        if authenticate:
            ws.send(json.dumps({"action": "auth", "params": CLIENT_KEY}))
            assert json.loads(ws.recv(timeout=LIVENESS_SECONDS))[0]["status"] == "auth_success"
        ws.send(message)
        try:
            answer = json.loads(ws.recv(timeout=LIVENESS_SECONDS))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code in DEFINED_CLOSE_CODES, closed
            return
        assert isinstance(answer, list) and answer and all("ev" in event for event in answer), answer


def test_random_input_never_crashes_the_server_nor_disturbs_others(live_chain):
    filtered = live_chain["filtered"]
    url = f"ws://127.0.0.1:{filtered.port}/stocks"

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(message=messages, authenticate=st.booleans())
    def one_message(message, authenticate):
        _answer_or_close(url, message, authenticate)

    one_message()
    # the server is still whole: a new client works, and the neighbour saw no gap
    _answer_or_close(url, '{"action":"subscribe","params":"T.AAPL"}', authenticate=True)
    live_chain["neighbour"].assert_no_gap()
    assert filtered.link.state.value == "connected"
