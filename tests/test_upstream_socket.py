"""The upstream link's own WebSocket reader (proxy.net.upstream_socket) against a scripted upstream on
127.0.0.1: a burst that one read brings reaches the router as one batch, fragments are joined, pings
answered, a message over the bound closed 1009 (in one frame or in fragments), a refused upgrade
named (and a 101 that is no valid upgrade), the goodbye's close code (1001 on shutdown, 1000
otherwise), backpressure when the router lags, reads paced by the read interval; and what
websockets' protocol leaves to the socket: text checked as UTF-8 (1007 otherwise, also across
fragments), frames that came with the 101, framing errors (1002), closes without a code (1005)
or without a frame (1006)."""

from __future__ import annotations

import json
from typing import Awaitable, Callable

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Pong, Request, TextMessage

from proxy.core import protocol
from proxy.net.beacon import Beacon
from proxy.net.frames import text_frame
from proxy.net.upstream import FrameBatch, UpstreamLink, UpstreamProtocolError
from proxy.net.upstream_socket import UpgradeRefused, UpstreamClosed, UpstreamSocket

CONNECTED = protocol.status_frame("connected", "Connected Successfully")
AUTHENTICATED = protocol.status_frame("auth_success", "authenticated")


class Upstream:
    """One accepted connection, server side: wsproto for the handshake and what the client sends;
    data frames are written raw (``text_frame``), as the tiers write them."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.SERVER)
        self.received: list[object] = []  # events from the client, in order

    async def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view):]

    async def accept(self) -> None:
        while True:
            self.ws.receive_data(await self.sock.recv(65536))
            if any(isinstance(event, Request) for event in self.ws.events()):
                break
        await self.send_raw(self.ws.send(AcceptConnection()))

    async def next_event(self) -> object:
        """The next event the client sent (messages whole), pings and closes answered by wsproto's rules."""
        while True:
            for event in self.ws.events():
                self.received.append(event)
                return event
            data = await self.sock.recv(65536)
            if not data:
                return None
            self.ws.receive_data(data)

    async def authenticate(self) -> None:
        await self.send_raw(text_frame(CONNECTED.encode()))
        auth = await self.next_event()
        assert isinstance(auth, TextMessage) and json.loads(auth.data)["action"] == "auth"
        await self.send_raw(text_frame(AUTHENTICATED.encode()))


async def serve_one(nursery: trio.Nursery, script: Callable[[Upstream], Awaitable[None]]) -> int:
    """Listen on 127.0.0.1 port 0; run ``script`` on the first connection; return the port."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    async def run() -> None:
        with listener:
            sock, _ = await listener.accept()
        with sock:
            await script(Upstream(sock))

    nursery.start_soon(run)
    return listener.getsockname()[1]


def make_link(port: int, capacity: int = 100, **kwargs: object) -> tuple[UpstreamLink, trio.MemoryReceiveChannel[FrameBatch]]:
    send, receive = trio.open_memory_channel[FrameBatch](capacity)
    link = UpstreamLink("Polygon", f"ws://127.0.0.1:{port}/stocks", "key", desired=frozenset,
                        demand_changed=Beacon(), frames=send, **kwargs)  # type: ignore[arg-type]
    return link, receive


def trade(n: int) -> bytes:
    return b'[{"ev":"T","sym":"MSFT","p":1,"s":%d,"t":1}]' % n


async def test_a_burst_that_one_read_brings_reaches_the_router_as_one_batch(nursery):
    """Before (trio-websocket, one channel send per frame): 200 batches of one frame."""
    burst = 200
    sent = trio.Event()

    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.authenticate()
        await trio.sleep(0.05)  # auth_success read on its own: the burst comes in a read of its own
        await upstream.send_raw(b"".join(text_frame(trade(n)) for n in range(burst)))  # ~9 KB, one segment
        sent.set()
        await trio.sleep_forever()

    link, frames = make_link(await serve_one(nursery, script))
    nursery.start_soon(link.run)
    await sent.wait()
    with trio.fail_after(5):
        batch, received_at = await frames.receive()
    assert [json.loads(frame)[0]["s"] for frame in batch] == list(range(burst))
    assert received_at <= trio.current_time()
    with pytest.raises(trio.WouldBlock):
        frames.receive_nowait()


async def open_socket(nursery: trio.Nursery, script: Callable[[Upstream], Awaitable[None]],
                      **kwargs: int) -> UpstreamSocket:
    port = await serve_one(nursery, script)
    ws = UpstreamSocket(await trio.open_tcp_stream("127.0.0.1", port), **kwargs)
    await ws.open(f"127.0.0.1:{port}", "/stocks")
    return ws


async def open_on_raw(nursery: trio.Nursery, raw: bytes, **kwargs: int) -> tuple[UpstreamSocket, list[object]]:
    """A socket to an upstream that sends ``raw`` after the upgrade, then records the next event
    it reads (our close frame, as the socket answers what ``raw`` did) and waits."""
    closes: list[object] = []

    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.send_raw(raw)
        closes.append(await upstream.next_event())
        await trio.sleep_forever()

    return await open_socket(nursery, script, **kwargs), closes


async def close_sent(closes: list[object]) -> object:
    """What the upstream of :func:`open_on_raw` read after ``raw``, once it has read it."""
    while not closes:
        await trio.sleep(0.01)
    return closes[0]


async def test_fragments_are_joined_and_pings_answered(nursery):
    answered = trio.Event()
    events: list[object] = []

    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        whole = trade(7)
        # a text message in three fragments (FIN clear, continuation, continuation with FIN), a ping between
        await upstream.send_raw(bytes([0x01, 10]) + whole[:10] + bytes([0x89, 4]) + b"beat"
                                + bytes([0x00, 10]) + whole[10:20] + bytes([0x80, len(whole) - 20]) + whole[20:])
        events.append(await upstream.next_event())
        answered.set()
        await trio.sleep_forever()

    with trio.fail_after(5):
        ws = await open_socket(nursery, script)
    assert await ws.get_messages() == [trade(7).decode()]
    with trio.fail_after(5):
        await answered.wait()
    assert isinstance(events[0], Pong) and events[0].payload == b"beat"
    with trio.move_on_after(1):  # the scripted upstream does not answer our close
        await ws.aclose()


async def test_a_message_over_the_bound_is_refused_with_1009(nursery):
    with trio.fail_after(5):
        ws, closes = await open_on_raw(nursery, text_frame(trade(1)) + text_frame(b"[" + b" " * 2000 + b"]"),
                                       max_message_bytes=1000)
    assert await ws.get_messages() == [trade(1).decode()]  # what came before it is handed on first
    with pytest.raises(UpstreamProtocolError, match="upstream sent a message over 1000 bytes"):
        await ws.get_messages()
    with trio.fail_after(5):
        close = await close_sent(closes)
    assert isinstance(close, CloseConnection) and close.code == 1009
    with trio.move_on_after(1):  # the scripted upstream does not answer our close
        await ws.aclose()


async def test_upstreams_close_is_answered_and_named(nursery):
    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.send_raw(text_frame(trade(1)) + upstream.ws.send(CloseConnection(code=1001, reason="bye")))
        await upstream.next_event()  # our answer
        await trio.sleep_forever()

    with trio.fail_after(5):
        ws = await open_socket(nursery, script)
    assert await ws.get_messages() == [trade(1).decode()]
    with pytest.raises(UpstreamClosed, match=r"connection closed \(1001 GOING_AWAY\): bye"):
        await ws.get_messages()
    with trio.move_on_after(1):  # the scripted upstream does not answer our close
        await ws.aclose()


async def test_a_refused_upgrade_is_named_with_its_status_and_body(nursery):
    async def script(upstream: Upstream) -> None:
        await upstream.sock.recv(65536)
        body = b"not found: this server serves /stocks\n"
        await upstream.send_raw(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    link, _ = make_link(await serve_one(nursery, script))
    with trio.move_on_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(link.run)
            while link.reconnects == 0:
                await trio.sleep(0.01)
            inner.cancel_scope.cancel()
    assert link.last_error == ("upstream refused the WebSocket upgrade: "
                               "HTTP 404 Not Found: not found: this server serves /stocks")


@pytest.mark.parametrize("shutting_down", [True, False], ids=["shutdown", "failure"])
async def test_the_goodbye_says_1001_on_shutdown_and_1000_otherwise(nursery, shutting_down):
    closes: list[CloseConnection] = []
    authenticated = trio.Event()

    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.authenticate()
        authenticated.set()
        while True:
            event = await upstream.next_event()
            if isinstance(event, CloseConnection):
                closes.append(event)
                await upstream.send_raw(upstream.ws.send(event.response()))
                return
            if isinstance(event, Ping) and shutting_down:
                await upstream.send_raw(upstream.ws.send(event.response()))
            if event is None:
                return

    # when not shutting down, the link fails by its keepalive: pings go unanswered
    link, _ = make_link(await serve_one(nursery, script), keepalive_interval=0.05, keepalive_timeout=0.2,
                        close_seconds=5.0)
    async with trio.open_nursery() as inner:
        inner.start_soon(link.run)
        await authenticated.wait()
        if shutting_down:
            inner.cancel_scope.cancel()
        else:
            while link.reconnects == 0:
                await trio.sleep(0.01)
            inner.cancel_scope.cancel()
    assert [(close.code, close.reason) for close in closes] == (
        [(1001, "proxy shutting down")] if shutting_down else [(1000, "")])


async def test_a_lagging_router_stops_the_reading_and_tcp_pushes_back(nursery):
    """The frames channel full, the link reads no more: upstream's socket fills up."""
    stuck = trio.Event()

    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.authenticate()
        frame = text_frame(b"[" + b'{"ev":"T","sym":"MSFT"},' * 400 + b'{"ev":"T"}]')  # ~10 KB
        written = 0
        while written < 64 * 1024 * 1024:  # more than any kernel buffers on loopback
            # a send that waits 0.5 s for room: the link had time to read, and took nothing
            with trio.move_on_after(0.5):
                written += await upstream.sock.send(frame)  # (a partial frame at the end is never read)
                continue
            stuck.set()
            break
        await trio.sleep_forever()

    link, frames = make_link(await serve_one(nursery, script), capacity=1)  # and nobody receives
    nursery.start_soon(link.run)
    with trio.fail_after(20):
        await stuck.wait()
    assert len(frames.receive_nowait()[0]) >= 1  # what was read waits for the router


async def test_reads_at_least_the_read_interval_apart_gather_a_trickle_into_one_batch(nursery):
    # Ten one-event frames written one at a time, 5 ms apart (a Polygon feed in normal flow):
    # with read_interval 0 each is a read and a batch of its own; with 400 ms the first is read
    # at once (a frame after a quiet spell waits for nothing) and the others together, counted as
    # received when the wait began (the latency histogram must not hide the wait).
    async def trickle(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.authenticate()
        await trio.sleep(0.05)
        for n in range(10):
            await upstream.send_raw(text_frame(trade(n)))
            await trio.sleep(0.005)
        await trio.sleep_forever()

    for interval, most_batches in ((0.0, None), (0.4, 2)):
        link, frames = make_link(await serve_one(nursery, trickle), read_interval=interval)
        nursery.start_soon(link.run)
        batches: list[tuple[list, float]] = []
        with trio.fail_after(5):
            while sum(len(batch) for batch, _ in batches) < 10:
                batches.append(await frames.receive())
        if most_batches is None:
            assert len(batches) > 2  # nothing gathers them (each read finds one or two frames)
        else:
            assert len(batches) <= most_batches, [len(batch) for batch, _ in batches]
            first_read_at = batches[0][1]
            assert batches[-1][1] - first_read_at < 0.1  # counted from the start of the wait
        assert [json.loads(frame)[0]["s"] for batch, _ in batches for frame in batch] == list(range(10))


async def test_frames_that_come_with_the_101_are_handed_out_first(nursery):
    """The 101 and the first frames in one segment: the protocol parses them with the handshake."""
    hosts: list[str] = []

    async def script(upstream: Upstream) -> None:
        while True:
            upstream.ws.receive_data(await upstream.sock.recv(65536))
            requests = [event for event in upstream.ws.events() if isinstance(event, Request)]
            if requests:
                hosts.append(requests[0].host)
                break
        await upstream.send_raw(upstream.ws.send(AcceptConnection()) + text_frame(trade(1)) + text_frame(trade(2)))
        await trio.sleep_forever()

    with trio.fail_after(5):
        ws = await open_socket(nursery, script)
        assert await ws.get_messages() == [trade(1).decode(), trade(2).decode()]
    assert hosts and hosts[0].startswith("127.0.0.1:")  # the Host header as the link gave it
    with trio.move_on_after(1):
        await ws.aclose()


async def test_text_split_inside_a_character_is_joined_and_binary_stays_bytes(nursery):
    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        text = '[{"ev":"status","message":"café ☕"}]'.encode()
        cut = text.index("é".encode()) + 1  # the fragment boundary falls inside é's two bytes
        await upstream.send_raw(bytes([0x01, cut]) + text[:cut] + bytes([0x80, len(text) - cut]) + text[cut:]
                                + bytes([0x82, 3]) + b"\x00\xff\x01")
        await trio.sleep_forever()

    with trio.fail_after(5):
        ws = await open_socket(nursery, script)
        messages = await ws.get_messages()
    assert messages == ['[{"ev":"status","message":"café ☕"}]', b"\x00\xff\x01"]
    with trio.move_on_after(1):
        await ws.aclose()


@pytest.mark.parametrize("fragmented", [False, True], ids=["one frame", "fragments"])
async def test_text_that_is_not_utf8_is_refused_with_1007(nursery, fragmented):
    """websockets' protocol does not check text; the socket does, as wsproto did, before a frame
    could reach clients."""
    bad = b'[{"ev":"T","sym":"\xff\xfe"}]'
    if fragmented:
        broken = bytes([0x01, 10]) + bad[:10] + bytes([0x80, len(bad) - 10]) + bad[10:]
    else:
        broken = text_frame(bad)
    with trio.fail_after(5):
        ws, closes = await open_on_raw(nursery, text_frame(trade(1)) + broken + text_frame(trade(2)))
        assert await ws.get_messages() == [trade(1).decode()]  # what came before it is handed on first
        with pytest.raises(UpstreamProtocolError, match=r"upstream broke the WebSocket protocol \(1007: 'utf-8' codec"):
            await ws.get_messages()
        close = await close_sent(closes)
    assert isinstance(close, CloseConnection) and close.code == 1007
    assert not ws.open_for_sending
    with trio.move_on_after(1):
        await ws.aclose()


async def test_a_message_over_the_bound_in_fragments_is_refused_with_1009(nursery):
    """The bound is on the whole message: fragments under it that add up to more are refused."""
    part = b" " * 100
    with trio.fail_after(5):
        ws, closes = await open_on_raw(
            nursery, bytes([0x01, 100]) + part + bytes([0x00, 100]) + part + bytes([0x80, 100]) + part,
            max_message_bytes=250)
        with pytest.raises(UpstreamProtocolError, match="upstream sent a message over 250 bytes"):
            await ws.get_messages()
        close = await close_sent(closes)
    assert isinstance(close, CloseConnection) and close.code == 1009
    with trio.move_on_after(1):
        await ws.aclose()


async def test_a_framing_error_is_named_and_closed_with_1002(nursery):
    with trio.fail_after(5):
        # a continuation frame with no message begun
        ws, closes = await open_on_raw(nursery, text_frame(trade(1)) + bytes([0x80, 2]) + b"[]")
        assert await ws.get_messages() == [trade(1).decode()]
        with pytest.raises(UpstreamProtocolError, match=r"upstream broke the WebSocket protocol \(1002: "
                                                         r"unexpected continuation frame\)"):
            await ws.get_messages()
        close = await close_sent(closes)
    assert isinstance(close, CloseConnection) and close.code == 1002
    with trio.move_on_after(1):
        await ws.aclose()


async def test_an_empty_close_frame_is_1005_and_an_end_without_one_1006(nursery):
    async def script(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.send_raw(bytes([0x88, 0]))
        await upstream.next_event()  # our answer
        await trio.sleep_forever()

    async def vanishing(upstream: Upstream) -> None:
        await upstream.accept()
        await upstream.send_raw(text_frame(trade(1)))

    with trio.fail_after(5):
        ws = await open_socket(nursery, script)
        with pytest.raises(UpstreamClosed, match=r"connection closed \(1005 NO_STATUS_RCVD\)$"):
            await ws.get_messages()
        await ws.aclose()
        ws = await open_socket(nursery, vanishing)
        assert await ws.get_messages() == [trade(1).decode()]
        with pytest.raises(UpstreamClosed, match=r"\(1006 ABNORMAL_CLOSURE\): connection lost without a close frame"):
            await ws.get_messages()
        await ws.aclose()


async def test_an_answer_that_is_no_valid_upgrade_is_named(nursery):
    """A 101 whose Sec-WebSocket-Accept is wrong; a refusal whose body runs to the stream's end."""
    async def wrong_accept(upstream: Upstream) -> None:
        await upstream.sock.recv(65536)
        await upstream.send_raw(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n")
        await trio.sleep_forever()

    async def refusal_to_eof(upstream: Upstream) -> None:
        await upstream.sock.recv(65536)
        await upstream.send_raw(b"HTTP/1.1 503 Service Unavailable\r\n\r\nback soon")

    with trio.fail_after(5):
        with pytest.raises(UpstreamProtocolError, match="answer to the WebSocket upgrade is not valid: .*Sec-WebSocket-Accept"):
            await open_socket(nursery, wrong_accept)
        with pytest.raises(UpgradeRefused, match="HTTP 503 Service Unavailable: back soon"):
            await open_socket(nursery, refusal_to_eof)
