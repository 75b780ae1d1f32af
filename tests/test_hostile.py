"""Hostile and heavy clients (issue 13, client I/O): what a client sends can cost the proxy only bounded memory.

Memory is measured in-process with tracemalloc, which sees every buffer the
proxy allocates (bytearrays included); the test client reuses one block, so
what grows is the proxy's.
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import tracemalloc
import weakref

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Ping, Pong, Request

from proxy.core.errors import ClientMessageError
from proxy.core.outbox import SlowClientPolicy
from proxy.core.protocol import Auth, parse_client_message
from proxy.net.listener import accept_connections

from tests.helpers import (
    ALL_STREAM,
    CLIENT_KEY,
    FIREHOSE_KEY,
    Neighbour,
    SlowReader,
    authed_client,
    firehose_config,
    handshake,
    masked,
    read_statuses,
    send_all,
    start_chain,
    start_firehose,
    start_simulator,
    start_tier,
    wait_until,
)

MB = 1 << 20


class PeakMemory:
    """``with PeakMemory() as memory:``: afterwards ``memory.peak`` is the most that was allocated
    (traced by tracemalloc) above what was allocated at the start, in bytes."""

    peak = 0

    def __enter__(self) -> PeakMemory:
        tracemalloc.start()
        self._base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.peak = tracemalloc.get_traced_memory()[1] - self._base
        tracemalloc.stop()


async def flood(sock: trio.socket.SocketType, block: bytes, total: int) -> int:
    """Send ``block`` over and over, ``total`` bytes at most; stop early when the proxy closes."""
    sent = 0
    try:
        while sent < total:
            sent += await sock.send(block)
    except OSError:
        pass  # reset by the proxy: it stopped reading, as it should
    return sent


async def test_random_bytes_after_the_handshake_cost_bounded_memory(nursery):
    """Random bytes break the framing at once (close 1002); what follows must not be buffered.

    The close timeout is long, so that a proxy which kept reading into a failed
    parser would take what the client sends in those seconds (it took ~550 MB in 2 s before the fix).
    """
    _, firehose = await start_firehose(nursery, shutdown_close_seconds=5)
    flood_bytes = 256 * MB
    sock, _ = await handshake(firehose.port)
    block = os.urandom(64 * 1024)
    with PeakMemory() as memory, trio.fail_after(90):
        await flood(sock, block, flood_bytes)
    sock.close()
    assert memory.peak < 16 * MB, f"the proxy held {memory.peak / MB:.0f} MB of a client's flood"



async def test_a_frame_declaring_a_huge_length_is_refused_at_the_message_limit(nursery):
    """A text frame that announces 2**62 bytes and then streams them: 1009 once MAX_MESSAGE_BYTES have come.

    A guard, not a fix: wsproto hands a data frame's payload on in pieces as
    they arrive (only control frames, at most 125 bytes, are buffered whole),
    so the declared length costs nothing and our message-size check bounds
    what is kept. This passed before this branch too.
    """
    _, firehose = await start_firehose(nursery, max_message_bytes=100_000, shutdown_close_seconds=5)
    sock, client = await handshake(firehose.port)
    header = bytes([0x81, 0x80 | 127]) + (2**62).to_bytes(8, "big") + b"\0\0\0\0"  # masked with a zero key
    with PeakMemory() as memory, trio.fail_after(90):
        await send_all(sock, header + b"a" * 120_000)  # past the limit, within what is read after a close
        closes: list[int] = []
        while not closes:
            client.receive_data(await sock.recv(65536) or None)
            closes = [event.code for event in client.events() if isinstance(event, CloseConnection)]
        assert closes == [1009]
        await flood(sock, b"a" * 65536, 256 * MB)  # and the rest of the frame, regardless
    sock.close()
    assert memory.peak < 16 * MB, f"the proxy held {memory.peak / MB:.0f} MB of one frame"

async def test_a_closed_session_is_freed_without_waiting_for_the_cycle_collector(nursery):
    """What a connection held comes back when it closes, not whenever a full collection happens to run.

    The session and its connection pointed at each other (the connection's
    ``notify`` is the session's): freed only by the cycle collector, which an
    idle server may not run for minutes, so a flood's buffers stayed.
    """
    _, firehose = await start_firehose(nursery)
    gc.collect()
    gc.disable()
    try:
        sock, _ = await handshake(firehose.port)
        await wait_until(lambda: len(firehose.hub.sessions) == 1)
        session = next(iter(firehose.hub.sessions))
        references = [weakref.ref(session), weakref.ref(session.connection)]
        del session
        sock.close()
        await wait_until(lambda: not firehose.hub.sessions, what="the session to end")
        await wait_until(lambda: all(reference() is None for reference in references), timeout=10,
                         what="the session and its connection to be freed by reference counting")
    finally:
        gc.enable()


AUTH = json.dumps({"action": "auth", "params": FIREHOSE_KEY})
SUBSCRIBE = json.dumps({"action": "subscribe", "params": "T.AAPL"})


async def test_frames_sent_with_the_handshake_are_not_lost(nursery):
    """A client may send its first frames without waiting for the 101: in the same segment, or cut anywhere."""
    _, firehose = await start_firehose(nursery)  # connected: else an upstream status comes first
    frames = masked(AUTH) + masked(SUBSCRIBE)
    for cut in (len(frames), 3, len(masked(AUTH)) + 5):  # all of it, inside a header, inside the second payload
        client = WSConnection(ConnectionType.CLIENT)
        request = client.send(Request(host="127.0.0.1", target="/"))
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", firehose.port))
        await send_all(sock, request + frames[:cut])
        await trio.sleep(0.05)  # let the proxy read the first part alone, when there is a second
        if cut < len(frames):
            await send_all(sock, frames[cut:])
        statuses = await read_statuses(sock, client, 3)
        assert [s["status"] for s in statuses] == ["connected", "auth_success", "success"], cut
        assert statuses[2]["message"] == "subscribed to: T.AAPL"
        sock.close()


async def http_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the whole answer, to the proxy's close."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    reply = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            reply += chunk
    await stream.aclose()
    return reply


UPGRADE = (b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


async def test_refused_handshakes_have_reason_phrases_and_say_why(nursery):
    _, firehose = await start_firehose(nursery)
    old_version = await http_exchange(firehose.port, b"GET / HTTP/1.1\r\n" + UPGRADE + b"Sec-WebSocket-Version: 8\r\n\r\n")
    assert old_version.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nsec-websocket-version: 13\r\n" in old_version.lower()
    # (a market not served is a WebSocket refused as Polygon refuses a plan without it, not an
    # HTTP refusal: tests/test_tier_markets.py)
    post = await http_exchange(firehose.port, b"POST / HTTP/1.1\r\n" + UPGRADE + b"Sec-WebSocket-Version: 13\r\n"
                               b"Content-Length: 2\r\n\r\n{}")
    assert post.startswith(b"HTTP/1.1 400 ") and post.endswith(b"a WebSocket opening handshake is a GET without a body\n")
    no_key = await http_exchange(firehose.port, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert no_key.startswith(b"HTTP/1.1 400 ") and b"Sec-WebSocket-Key" in no_key


async def test_a_client_that_pings_and_never_reads_costs_one_pong(nursery):
    """Pongs wait for the kernel like data does; one waiting answers every ping before it (RFC 6455 §5.5.3).

    Before: every ping queued its own pong behind the full socket (+80-130 MB
    for a million pings); here 25,000 pings of 125 bytes would queue over 3 MB,
    where the proxy holds about 0.4 MB in all (tracemalloc makes each ping slow:
    more would only make the test longer).
    """
    sim = await start_simulator(nursery, events_per_second=1)  # no data is asked for: the pings are the load
    firehose = await start_tier(nursery, firehose_config(sim, auth_timeout_seconds=120))
    sock, client = await handshake(firehose.port, rcvbuf=4096)
    pings = 25_000
    batch = b"".join(client.send(Ping(payload=b"%09d" % n + b"p" * 116)) for n in range(1000))
    last = b"last ping" + b"p" * 116
    with PeakMemory() as memory, trio.fail_after(120):
        for _ in range(pings // 1000):
            await send_all(sock, batch)  # never reading what comes back
        await send_all(sock, client.send(Ping(payload=last)) + masked(AUTH))
        # Frames are handled in order: once the auth after them is, every ping was answered.
        await wait_until(lambda: any(s.state.phase.value == "authenticated" for s in firehose.hub.sessions),
                         timeout=60, what="the pings and the auth after them to be handled")
    assert memory.peak < 1 * MB, f"the proxy held {memory.peak / MB:.1f} MB of pongs"
    answers = []
    with trio.fail_after(60):
        while not answers or answers[-1] != last:
            client.receive_data(await sock.recv(1 << 20))
            answers += [event.payload for event in client.events() if isinstance(event, Pong)]
    assert len(answers) < pings  # what the socket could not take at once was answered by one pong
    sock.close()


@pytest.mark.parametrize("text, reason", [
    (r'{"action":"auth","params":"\ud800"}', r"lone surrogate \ud800 in a string"),
    (r'{"action":"auth","params":"k\udc00ey"}', r"lone surrogate \udc00 in a string"),
    (r'{"action":"auth","params":"\uD800\u0041"}', r"lone surrogate \uD800 in a string"),
    (r'{"action":"auth","params":"\\ud800', "Input data was truncated"),  # an escaped backslash, then truly cut
    (r'{"action":"auth","params":"key', "Input data was truncated"),
])
def test_a_lone_surrogate_is_named_not_called_truncated(text, reason):
    with pytest.raises(ClientMessageError) as error:
        parse_client_message(text)
    assert error.value.message == f"message is not valid JSON ({reason})"
    assert parse_client_message(r'{"action":"auth","params":"\ud83d\ude00"}') == Auth("\U0001f600")


async def test_a_failed_tls_handshake_is_logged_with_the_ssl_error(nursery, certificates, caplog):
    caplog.set_level(logging.INFO, logger="proxy.net.server")
    _, firehose = await start_firehose(nursery, tls_cert=certificates["cert"], tls_key=certificates["key"])
    await http_exchange(firehose.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS port
    await wait_until(lambda: any("refused" in r.getMessage() for r in caplog.records), what="the refusal's log line")
    line = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    assert "[SSL: HTTP_REQUEST]" in line.rsplit("during the handshake:", 1)[1], line  # it said nothing


# --- running out of file descriptors -------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent


async def _log_shows(path: pathlib.Path, text: str, timeout: float) -> str:
    with trio.move_on_after(timeout):
        while text not in (log := path.read_text()):
            await trio.sleep(0.05)
        return log
    raise AssertionError(f"{text!r} never appeared in the tier's log:\n{path.read_text()[-3000:]}")


async def test_out_of_descriptors_a_client_that_authenticates_still_gets_in_and_the_log_says_so_once(tmp_path):
    """600 connections that never authenticate, against a tier allowed 200 descriptors.

    Before: the accept loop logged an ERROR every 0.1 s, the metrics listener a
    traceback per retry, and a real client waited in the kernel's queue until
    the crowd's auth timeout (2 minutes here) freed descriptors. Now the oldest
    unauthenticated connections are closed to make room, one per failed accept.
    """
    stderr = tmp_path / "tier.log"
    overrides = {"metrics_port": 0, "auth_timeout_seconds": 120}
    with open(stderr, "w") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.limited_tier", "200", json.dumps(overrides)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    crowd: list[trio.socket.SocketType] = []
    try:
        assert process.stdout is not None
        with trio.fail_after(60):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(100)
        port, metrics_port = map(int, line.split())
        for _ in range(600):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))  # the kernel completes it, accepted or not
            crowd.append(sock)
        await _log_shows(stderr, "Too many open files", timeout=60)
        # A probe gets through...
        assert (await http_exchange(metrics_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")
        # ...and so does a client that authenticates, long before the crowd's auth timeout.
        with trio.fail_after(60):
            sock, client = await handshake(port)
            await send_all(sock, masked(AUTH))
            assert [s["status"] for s in await read_statuses(sock, client, 2)] == ["connected", "auth_success"]
        for sock in crowd:
            sock.close()
        log = await _log_shows(stderr, "client listener 127.0.0.1:%d: accepting again" % port, timeout=60)
    finally:
        for sock in crowd:
            sock.close()
        process.kill()
        await process.wait()
    log = stderr.read_text()
    client_listener = [line for line in log.splitlines() if line.startswith("ERROR") and "client listener" in line]
    assert len(client_listener) == 1 and "EMFILE" in client_listener[0], client_listener[:5]
    recovered = next(line for line in log.splitlines() if "client listener" in line and "accepting again" in line)
    assert "unauthenticated connections closed to make room" in recovered
    assert "Traceback" not in log
    assert sum(line.startswith("ERROR") for line in log.splitlines()) <= 2  # the client and metrics listeners


class _Listener(socket.socket):
    """A listening socket whose accept() first fails ``failures`` times with ``error``."""

    def __init__(self, error: int, failures: int) -> None:
        super().__init__()
        self.error, self.failures, self.calls = error, failures, 0
        self.other_task_ran_meanwhile = 0  # counted by the test: did anything else run between the failures?
        self.seen_by_failure: list[int] = []

    def accept(self):  # type: ignore[override]
        self.calls += 1
        if self.error == errno.EINVAL and self.calls > 50:
            raise AssertionError("accept was retried after an error that does not go away")
        if self.calls <= self.failures:
            self.seen_by_failure.append(self.other_task_ran_meanwhile)
            raise OSError(self.error, os.strerror(self.error))
        return super().accept()


def _flatten(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _flatten(inner)]
    return [error]


async def test_accept_errors_are_retried_only_when_they_concern_one_connection():
    async def handler(connection: object, peer: str) -> None:
        pass

    # Bound and not listening: EINVAL forever. It used to be retried without a checkpoint (a spin).
    listener = _Listener(errno.EINVAL, failures=10**9)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    with pytest.raises(BaseException) as raised:
        with trio.fail_after(10):
            await accept_connections(listener, handler, max_message_bytes=1000)
    assert [getattr(e, "errno", e) for e in _flatten(raised.value)] == [errno.EINVAL]

    # A connection aborted before it was accepted: the next one is; other tasks run in between.
    listener = _Listener(errno.ECONNABORTED, failures=100)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    accepted = trio.Event()

    async def count_turns() -> None:
        while True:
            listener.other_task_ran_meanwhile += 1
            await trio.lowlevel.checkpoint()

    async def served(connection: object, peer: str) -> None:
        accepted.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_turns)
        nursery.start_soon(functools.partial(accept_connections, listener, served, max_message_bytes=1000))
        with trio.fail_after(10):
            await trio.lowlevel.checkpoint()
            client = trio.socket.socket()
            await client.connect(listener.getsockname())
            await accepted.wait()
        nursery.cancel_scope.cancel()
    client.close()
    assert listener.calls > 100
    turns = listener.seen_by_failure[-1] - listener.seen_by_failure[0]
    assert turns > 0, "the accept loop retried 100 times without letting anything else run"


# --- slow clients under load ----------------------------------------------------------------------


# drop_oldest is a load test of 8 s: with --slow (the default suite keeps disconnect)
@pytest.mark.parametrize("policy", ["disconnect", pytest.param("drop_oldest", marks=pytest.mark.slow)])
async def test_slow_client_policies_fire_under_load_and_the_neighbour_loses_nothing(nursery, policy):
    """A reader far slower than its feed, while the kernel's buffers take what they can.

    Checked: the policy fires; what the proxy holds for the slow client
    (queued, plus written but still in the connection's backlog) stays within
    CLIENT_QUEUE_EVENTS, give or take the one batch being queued; under
    drop_oldest every event the client misses is one the proxy counted as
    dropped, exactly; the `*` neighbour sees a gapless stream.
    """
    capacity = 2000
    _, _, filtered = await start_chain(
        nursery, simulator=dict(events_per_second=5000, symbols=200), firehose=dict(static_channels=ALL_STREAM),
        filtered=dict(client_queue_events=capacity, slow_client_policy=SlowClientPolicy(policy)))
    neighbour = Neighbour(await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*"))
    nursery.start_soon(neighbour.run)
    slow = await SlowReader.subscribe(filtered.port, CLIENT_KEY, "T.*,Q.*,LULD.*")
    nursery.start_soon(slow.run)
    await wait_until(lambda: "subscribed to: LULD.*" in slow.statuses, what="the subscription")
    session = max(filtered.hub.sessions, key=lambda s: s.id)
    largest_put = 0
    frames_seen = 0

    def check_what_the_proxy_holds() -> None:
        nonlocal largest_put, frames_seen
        for frame in neighbour.client.frames[frames_seen:]:  # no single put is larger than an upstream frame
            largest_put = max(largest_put, frame.count('"ev":'))
        frames_seen = len(neighbour.client.frames)
        held = session.outbox.queued_events + session.outbox.unsent_events
        assert held <= capacity + largest_put, (held, largest_put)

    if policy == "disconnect":
        with trio.move_on_after(30):
            while filtered.stats.slow_consumer_disconnects == 0:
                check_what_the_proxy_holds()
                await trio.sleep(0.01)
        assert filtered.stats.slow_consumer_disconnects == 1, "the slow client was never disconnected"
        slow.fast = True
        await wait_until(lambda: slow.close_code is not None, timeout=30, what="the slow consumer's close")
        assert slow.close_code == 1008 and slow.statuses[-1] == "slow_consumer"
        first = slow.sequence[0]
        assert slow.sequence == list(range(first, first + len(slow.sequence)))  # a gapless prefix, then the status
        await wait_until(lambda: session not in filtered.hub.sessions, what="the session to end")
        assert filtered.stats.dropped_slow_consumer >= session.outbox.dropped_events > 0
    else:
        with trio.move_on_after(30):
            while session.outbox.dropped_events < 5 * capacity:
                check_what_the_proxy_holds()
                await trio.sleep(0.01)
        assert session.outbox.dropped_events >= 5 * capacity, "the slow client never lost events"
        slow.fast = True  # catch up with the neighbour, then stop the feed and read to its end
        target = neighbour.sequence[-1]
        await wait_until(lambda: slow.sequence and slow.sequence[-1] > target, timeout=30, what="catching up")
        await send_all(slow.sock, masked(json.dumps({"action": "unsubscribe", "params": "T.*,Q.*,LULD.*"})))
        await wait_until(lambda: "unsubscribed to: LULD.*" in slow.statuses, timeout=30, what="the unsubscribe")
        assert slow.close_code is None and session in filtered.hub.sessions
        received = slow.sequence
        assert received == sorted(set(received))  # in order, never repeated
        missing = (received[-1] - received[0] + 1) - len(received)
        assert missing == session.outbox.dropped_events  # every loss counted, and only losses
    neighbour.assert_no_gap()


async def test_an_accept_episode_ends_only_after_a_settled_quiet_moment(autojump_clock, caplog):
    # Between the connections of a crowd still arriving, the kernel's queue is empty for moments:
    # that must not end the episode (each new failure would log a new ERROR). It ends once no
    # accept has failed for SETTLE_SECONDS, with one line counting the whole episode.
    from proxy.net.accepting import SETTLE_SECONDS, AcceptTrouble

    trouble = AcceptTrouble("client listener test", logging.getLogger("test.accepting"))
    full = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    assert trouble.unsettled_for() == 0  # no episode
    with caplog.at_level(logging.INFO, "test.accepting"):
        trouble.failed(full)
        assert trouble.unsettled_for() == SETTLE_SECONDS
        await trio.sleep(SETTLE_SECONDS / 2)
        assert trouble.unsettled_for() == pytest.approx(SETTLE_SECONDS / 2)
        trouble.failed(full)  # the crowd goes on: the wait starts again
        assert trouble.unsettled_for() == SETTLE_SECONDS
        await trio.sleep(SETTLE_SECONDS)
        assert trouble.unsettled_for() == 0
        trouble.recovered()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and "accept failed (EMFILE" in lines[0], lines
    assert "accepting again after 1.5s: 2 accepts failed" in lines[1]
    assert trouble.unsettled_for() == 0 and trouble.failures == 0
