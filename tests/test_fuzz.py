"""Hypothesis throws random input at a live chain's client protocol, at the WebSocket wire and on a tier link.

The chain (simulator → firehose → filtered proxy) runs in a Trio thread of its own, with a
``*`` neighbour on the filtered proxy that must see a gapless stream throughout; each example is
a fresh synchronous client:

- random bytes and random JSON, as messages through a WebSocket library: answered with a JSON
  array of events, or closed with a defined code;
- the wire itself, through a raw socket (issue 13's hostile paths): frames pipelined with the
  opening handshake and cut anywhere, messages fragmented with control frames between the
  fragments, ping floods, unsolicited pongs, binary messages, ending (or not) in garbage, invalid
  UTF-8 or an oversized message. A model of the protocol says what must come back: one answer
  per message, a pong for the last ping, and exactly the close code the violation calls for;
- a downstream proxy's link (``role`` proxy at auth) to the firehose churning thousands of
  channels a message, under its own, lowered, limits: every message is answered, refused only
  for the rate or the channel limit (as a model of the link's set predicts), the link is never
  closed, and the firehose holds exactly what the answers said.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import attrs

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Pong, Request, TextMessage

from tests.helpers import ALL_STREAM, CLIENT_KEY, FIREHOSE_KEY, LIVENESS_SECONDS, Neighbour, authed_client, start_chain

DEFINED_CLOSE_CODES = {1008, 1009, 1013}
#: The filtered proxy's largest message here: an oversized message costs an example little.
MAX_MESSAGE_BYTES = 8192
#: The firehose's limits for a downstream proxy's link here, lowered so that examples reach them.
PROXY_MAX_CHANNELS = 6_000
PROXY_RATE = 10.0  # messages a second, bursts of 20

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
            sim, firehose, filtered = await start_chain(
                nursery, simulator=dict(events_per_second=1000),
                firehose=dict(static_channels=ALL_STREAM, downstream_proxy_max_channels=PROXY_MAX_CHANNELS,
                              downstream_proxy_control_messages_per_second=PROXY_RATE),
                filtered=dict(control_messages_per_second=1000, max_message_bytes=MAX_MESSAGE_BYTES))
            neighbour = Neighbour(await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*"))
            nursery.start_soon(neighbour.run)
            state.update(sim=sim, firehose=firehose, filtered=filtered, neighbour=neighbour,
                         scope=nursery.cancel_scope, token=trio.lowlevel.current_trio_token())
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


# --- the wire: raw frames, cut anywhere, after (or with) the handshake -------------------------------

PING, PONG, TEXT, BINARY, CONTINUATION = 0x9, 0xA, 0x1, 0x2, 0x0


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"\x5a\x0f\xc3\x96") -> bytes:
    """One client frame, masked, written here: what a library would refuse to send is the point."""
    size = len(payload)
    if size < 126:
        length = bytes([0x80 | size])
    elif size < 1 << 16:
        length = bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + size.to_bytes(8, "big")
    key = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big") if size else b""
    return bytes([(0x80 if fin else 0) | opcode]) + length + mask + masked


@attrs.frozen
class Control:
    """A ping or an unsolicited pong."""

    opcode: int
    payload: bytes

    def wire(self) -> bytes:
        return frame(self.opcode, self.payload)


@attrs.frozen
class Message:
    """A text or binary message, cut into fragments at ``cuts`` with control frames between them.
    ``auth`` is True for an auth with the right key, False for one with a wrong key, None otherwise."""

    payload: bytes
    text: bool
    cuts: tuple[int, ...] = ()
    between: tuple[Control, ...] = ()
    auth: bool | None = None

    def _pieces(self) -> list[bytes]:
        bounds = [0, *sorted(set(cut for cut in self.cuts if 0 < cut < len(self.payload))), len(self.payload)]
        return [self.payload[start:end] for start, end in zip(bounds, bounds[1:])]

    def _gaps(self) -> list[tuple[Control, ...]]:
        """The control frames sent after each fragment but the last (all of ``between``, spread out)."""
        gaps = len(self._pieces()) - 1
        return [self.between[number::gaps] for number in range(gaps)]

    def controls(self) -> list[Control]:
        return [control for gap in self._gaps() for control in gap]

    def wire(self) -> bytes:
        pieces, gaps = self._pieces(), self._gaps()
        out = b""
        for number, piece in enumerate(pieces):
            opcode = (TEXT if self.text else BINARY) if number == 0 else CONTINUATION
            out += frame(opcode, piece, fin=number == len(pieces) - 1)
            if number < len(gaps):
                out += b"".join(control.wire() for control in gaps[number])
        return out


@attrs.frozen
class Violation:
    """What must end the connection with ``code``."""

    name: str
    data: bytes
    code: int


def _is_auth(payload: bytes) -> bool:
    try:
        value = json.loads(payload)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("action") == "auth"


channel_texts = st.sampled_from(["T.AAPL", "Q.MSFT", "T.*", "LULD.*", "FMV.AAPL", "A.ZZZ", "BENCH.NONE"])
structured = st.builds(
    lambda action, channels: json.dumps({"action": action, "params": ",".join(channels)}),
    st.sampled_from(["subscribe", "unsubscribe"]), st.lists(channel_texts, min_size=1, max_size=4),
)
# A channel with lowercase letters is answered with a warning frame besides the answer: the model
# counts answers as frames that are not warnings.
payloads = st.one_of(structured, st.text(max_size=200), json_values.map(json.dumps)).map(str.encode) | st.binary(max_size=200)
controls = st.builds(Control, st.sampled_from([PING, PONG]), st.binary(max_size=125))


@st.composite
def messages_on_the_wire(draw) -> Message:
    payload = draw(payloads.filter(lambda p: not _is_auth(p)))
    try:
        payload.decode()
        text = draw(st.booleans())
    except UnicodeDecodeError:
        text = False  # invalid UTF-8 in a text message is a violation, drawn as one
    cuts = tuple(draw(st.lists(st.integers(0, max(0, len(payload))), max_size=4)))
    return Message(payload, text, cuts, tuple(draw(st.lists(controls, max_size=4))))


auths = st.builds(lambda right: Message(json.dumps({"action": "auth", "params": CLIENT_KEY if right else "nope"}).encode(),
                                        True, auth=right), st.booleans())
ping_floods = st.integers(1, 3000).map(lambda count: [Control(PING, b"flood %d" % n) for n in range(count)])
operations = st.lists(st.one_of(messages_on_the_wire(), auths, controls, ping_floods), max_size=12)
violations = st.one_of(
    st.none(),
    # a frame with a reserved opcode, then anything: bad framing, whatever follows (a lone first
    # byte would be no violation yet: the header is not complete)
    st.builds(lambda op, payload, rest: Violation("reserved opcode", frame(op, payload) + rest, 1002),
              st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), st.binary(max_size=20), st.binary(max_size=300)),
    st.builds(lambda rest: Violation("unmasked frame", bytes([0x81, len(rest)]) + rest, 1002), st.binary(max_size=100)),
    st.builds(lambda cut: Violation("invalid UTF-8", Message("café ".encode() + b"\xff\xfe" + b"!" * 10, True, (cut,)).wire(), 1007),
              st.integers(0, 20)),
    st.builds(lambda cuts: Violation("oversized", Message(b"x" * (MAX_MESSAGE_BYTES + 1), True, tuple(cuts)).wire(), 1009),
              st.lists(st.integers(0, MAX_MESSAGE_BYTES), max_size=3)),
)


def expected_outcome(ops: list, violation: Violation | None) -> tuple[int, int | None]:
    """The protocol's rules: (answers to expect, close code to expect or None)."""
    authenticated, answers = False, 0
    for op in ops:
        if isinstance(op, Message):
            answers += 1
            if op.auth is not None and not authenticated:
                if not op.auth:
                    return answers, 1008  # auth_failed
                authenticated = True
    return answers, violation.code if violation else None


SENTINEL = b"the last ping"


def _wire_exchange(port: int, ops: list, violation: Violation | None, cuts: list[int]) -> None:
    flat = [item for op in ops for item in (op if isinstance(op, list) else [op])]
    answers_due, close_due = expected_outcome(flat, violation)
    client = WSConnection(ConnectionType.CLIENT)
    stream = client.send(Request(host="127.0.0.1", target="/stocks"))
    stream += b"".join(op.wire() for op in flat)
    if violation is not None:
        stream += violation.data
    elif close_due is None:  # an answer and a pong at the end: everything before them was handled
        answers_due += 1
        stream += Message(b'{"action":"unsubscribe","params":"Z.END"}', True).wire() + frame(PING, SENTINEL)
    controls = [c for op in flat for c in ((op,) if isinstance(op, Control) else op.controls())]
    pings = [control.payload for control in controls if control.opcode == PING]
    bounds = [0, *sorted(set(cut % len(stream) for cut in cuts)), len(stream)]
    answers, pongs, close, data_events = 0, [], None, 0
    with socket.create_connection(("127.0.0.1", port), timeout=LIVENESS_SECONDS) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:  # in pieces cut anywhere: inside the request, the request with frames (pipelined), frames cut
            for start, end in zip(bounds, bounds[1:]):
                sock.sendall(stream[start:end])
        except OSError:
            assert close_due is not None, "the proxy stopped reading a well-behaved client"
        deadline = time.monotonic() + LIVENESS_SECONDS
        parts: list[str] = []
        while close is None and not (close_due is None and answers >= answers_due and pongs and pongs[-1] == SENTINEL):
            assert time.monotonic() < deadline, (f"no end after {answers}/{answers_due} answers, pongs "
                                                 f"{[p[:12] for p in pongs[-3:]]}, close due {close_due}")
            try:
                data = sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            client.receive_data(data)
            for event in client.events():
                if isinstance(event, AcceptConnection):
                    continue
                if isinstance(event, CloseConnection):
                    close = event.code
                elif isinstance(event, Pong):
                    pongs.append(event.payload)
                elif isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        events = json.loads("".join(parts))
                        parts = []
                        statuses = [e for e in events if e.get("ev") == "status"]
                        data_events += len(events) - len(statuses)
                        if statuses and statuses[0]["status"] not in ("warning", "connected") \
                                and not statuses[0]["status"].startswith("upstream_"):
                            answers += 1
    if close_due is None:
        assert close is None, f"closed {close} where the protocol calls for no close"
        assert answers == answers_due, (answers, answers_due)
        # Pongs answer pings in order; one may answer several (RFC 6455 §5.5.3: only the latest
        # ping of a backlog needs one), never a ping that was not sent.
        pings.append(SENTINEL)
        assert pongs and pongs[-1] == SENTINEL
        remaining = iter(pings)
        assert all(any(ping == pong for ping in remaining) for pong in pongs), "pongs out of step with the pings"
    else:
        assert close == close_due, f"closed {close}, the protocol calls for {close_due}"
        assert answers <= answers_due


def _sessions(live_chain, tier: str) -> int:
    return trio.from_thread.run_sync(lambda: len(live_chain[tier].hub.sessions), trio_token=live_chain["token"])


def test_the_wire_pipelined_fragmented_flooded_or_broken_gets_what_the_protocol_says(live_chain):
    port = live_chain["filtered"].port
    baseline = _sessions(live_chain, "filtered")

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ops=operations, violation=violations, cuts=st.lists(st.integers(0, 1 << 30), max_size=6))
    def exchange(ops, violation, cuts):
        _wire_exchange(port, ops, violation, cuts)
        # the session is gone with its connection: nothing of it is left behind
        deadline = time.monotonic() + LIVENESS_SECONDS
        while _sessions(live_chain, "filtered") > baseline:
            assert time.monotonic() < deadline, "a session outlived its connection"
            time.sleep(0.01)

    exchange()
    live_chain["neighbour"].assert_no_gap()
    assert live_chain["filtered"].link.state.value == "connected"


# --- a downstream proxy's link, churning ----------------------------------------------------------------

churn = st.tuples(st.sampled_from(["subscribe", "unsubscribe"]), st.integers(0, 40), st.integers(1, 4000))


def _link_channels(live_chain, peer_port: int) -> tuple[set[str], set[str]] | None:
    """What the firehose holds for the link from ``peer_port``: its session's set and the registry's."""
    def read():
        for session in live_chain["firehose"].hub.sessions:
            if session.peer.endswith(f":{peer_port}"):
                registry = live_chain["firehose"].registry
                return ({c.text for c in session.state.channels}, {c.text for c in registry.channels_of(session)})
        return None
    return trio.from_thread.run_sync(read, trio_token=live_chain["token"])


def _read_answers(sock: socket.socket, client: WSConnection, count: int) -> list[list[dict]]:
    """The next ``count`` answers (frames of statuses), in order; AssertionError on a close."""
    answers: list[list[dict]] = []
    parts: list[str] = []
    deadline = time.monotonic() + 30
    while len(answers) < count:
        assert time.monotonic() < deadline, f"{len(answers)} of {count} answers came"
        data = sock.recv(1 << 20)
        assert data, "the firehose closed the link"
        client.receive_data(data)
        for event in client.events():
            assert not isinstance(event, CloseConnection), f"the firehose closed the link: {event.code} {event.reason}"
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    statuses = [e for e in json.loads("".join(parts)) if e.get("ev") == "status"]
                    parts = []
                    if statuses and not statuses[0]["status"].startswith("upstream_"):
                        answers.append(statuses)
    return answers


def test_a_proxy_link_churning_big_subscribes_is_answered_limited_and_never_closed(live_chain):
    port = live_chain["firehose"].port
    totals = {"messages": 0, "rate limited": 0, "channel limit": 0, "channels applied": 0}

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bursts=st.lists(st.lists(churn, min_size=1, max_size=12), min_size=1, max_size=3))
    # Always tried, whatever is drawn: over the channel limit, then far over the burst of messages.
    @example(bursts=[[("subscribe", 0, 4000), ("subscribe", 10, 4000)] + [("unsubscribe", 30, 1)] * 40])
    def link(bursts):
        held: set[str] = set()  # the model: what the link holds, from the answers
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            client = WSConnection(ConnectionType.CLIENT)
            sock.sendall(client.send(Request(host="127.0.0.1", target="/stocks"))
                         + frame(TEXT, json.dumps({"action": "auth", "params": FIREHOSE_KEY, "role": "proxy"}).encode()))
            assert [s["status"] for answer in _read_answers(sock, client, 2) for s in answer] == ["connected", "auth_success"]
            for burst in bursts:
                wanted = [(action, [f"FMV.P{block * 500 + n}" for n in range(count)]) for action, block, count in burst]
                sock.sendall(b"".join(frame(TEXT, json.dumps({"action": action, "params": ",".join(channels)}).encode())
                                      for action, channels in wanted))
                for (action, channels), answer in zip(wanted, _read_answers(sock, client, len(wanted))):
                    sent += 1
                    totals["messages"] += 1
                    if answer[0]["status"] == "error":
                        message = answer[0]["message"]
                        if message.startswith("rate limited"):
                            # A fresh link gets a burst of twice its rate: the first 20 always pass.
                            assert sent > 2 * PROXY_RATE, (sent, message)
                            totals["rate limited"] += 1
                            continue
                        assert message.startswith("channel limit") and action == "subscribe", message
                        assert len(held | set(channels)) > PROXY_MAX_CHANNELS, (len(held), message)
                        totals["channel limit"] += 1
                        continue
                    verb = "subscribed" if action == "subscribe" else "unsubscribed"
                    assert [s["message"] for s in answer] == [f"{verb} to: {c}" for c in channels]
                    assert action == "unsubscribe" or len(held | set(channels)) <= PROXY_MAX_CHANNELS
                    held = held | set(channels) if action == "subscribe" else held - set(channels)
                    totals["channels applied"] += len(channels)
            # The firehose holds exactly what the answers said (its registry once the steps are done).
            peer_port = sock.getsockname()[1]
            deadline = time.monotonic() + 30
            while (found := _link_channels(live_chain, peer_port)) != (held, held):
                assert time.monotonic() < deadline, (len(held), found and (len(found[0]), len(found[1])))
                time.sleep(0.02)

    link()
    print(f"proxy link fuzz: {totals}")
    assert totals["rate limited"] and totals["channel limit"]  # the limits were reached, and answered
    # Every link gone, the firehose lets go of their channels (after its grace period) upstream too.
    deadline = time.monotonic() + 60
    while any(c.startswith("FMV.P") for c in live_chain["sim"].subscribed_channels()):
        assert time.monotonic() < deadline, "the firehose kept a closed link's channels at the simulator"
        time.sleep(0.05)
    live_chain["neighbour"].assert_no_gap()
    assert live_chain["filtered"].link.state.value == "connected" and live_chain["filtered"].link.reconnects == 0
