"""The server-side WebSocket layer: our text frames, the backlog's order, pings, closes, bad handshakes."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, RejectConnection, Request, TextMessage

from proxy.core.protocol import parse_channel_list
from proxy.core.errors import WebSocketClosed
from proxy.net.connection import WsConnection
from proxy.net.frames import text_frame
from proxy.net.transport import SocketTransport as _SocketTransport

from .conftest import FIREHOSE_KEY, firehose_config, start_simulator, start_tier, wait_until


def _parsed_by_wsproto(data: bytes) -> list[str]:
    """What a wsproto client makes of bytes a server sent after its handshake."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    client.receive_data(data)
    texts, parts = [], []
    for event in client.events():
        assert isinstance(event, TextMessage), event
        parts.append(event.data)
        if event.message_finished:
            texts.append("".join(parts))
            parts = []
    return texts


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frames_parse_as_text_at_every_length_boundary(size):
    payload = ("é" * size).encode()[:size] if size % 2 == 0 else b"x" * size
    assert _parsed_by_wsproto(text_frame(payload) + text_frame(b"[]")) == [payload.decode(), "[]"]


async def _open_pair(max_message_bytes: int = 1 << 20) -> tuple[WsConnection, trio.SocketStream, WSConnection]:
    """A server WsConnection on one end of a socket pair, a handshaken wsproto client on the other."""
    server_sock, client_sock = socket.socketpair()
    server_sock.setblocking(False)
    server = WsConnection(_SocketTransport(server_sock), max_message_bytes=max_message_bytes)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(client_sock))
    client = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(client.send(Request(host="x", target="/stocks")))
    request = await server.read_request()
    assert request.target == "/stocks"
    server.accept()
    while True:
        client.receive_data(await stream.receive_some(65536))
        if any(isinstance(event, AcceptConnection) for event in client.events()):
            return server, stream, client


async def _client_events(stream: trio.SocketStream, client: WSConnection, until: type) -> list:
    events: list = []
    while not any(isinstance(event, until) for event in events):
        data = await stream.receive_some(1 << 20)
        client.receive_data(data or None)
        events.extend(client.events())
    return events


async def test_what_the_kernel_does_not_take_waits_in_order_and_drains():
    server, stream, client = await _open_pair()
    woken = []
    server.notify = lambda: woken.append(True)
    messages = [f'[{{"n":{n},"pad":"{"x" * 5000}"}}]' for n in range(200)]  # ~1 MB: more than a socket buffer
    for message in messages:
        server.send_texts([message])
    assert server.backlogged and woken  # the kernel took part; the rest waits and the writer was told
    received: list[str] = []

    async def read_all() -> None:
        parts: list[str] = []
        while len(received) < len(messages):
            client.receive_data(await stream.receive_some(1 << 20))
            for event in client.events():
                parts.append(event.data)
                if event.message_finished:
                    received.append("".join(parts))
                    parts = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await server.drain()
    assert not server.backlogged
    assert received == messages  # every byte, in order, nothing interleaved


async def test_send_text_says_whether_the_kernel_took_it_at_once_and_sends_nothing_once_closing():
    server, stream, client = await _open_pair()
    assert server.send_text(b'[{"n":0}]')  # an empty socket takes it at once
    events = await _client_events(stream, client, TextMessage)
    assert [event.data for event in events if isinstance(event, TextMessage)] == ['[{"n":0}]']
    pad = "x" * 5000
    taken = [server.send_text(f'[{{"n":{n},"pad":"{pad}"}}]'.encode()) for n in range(1, 200)]
    assert not all(taken) and server.backlogged  # ~1 MB: the socket backed up, and it said so
    server._close_now(1000, "")  # our close frame, queued
    assert not server.send_text(b"[]") and not server.open


async def test_pings_are_answered_and_messages_reassembled():
    server, stream, client = await _open_pair()
    await stream.send_all(client.send(Ping(payload=b"hi")))
    await stream.send_all(client.send(TextMessage(data='{"action":', message_finished=False)))
    await stream.send_all(client.send(TextMessage(data='"auth"}')))
    assert await server.get_message() == '{"action":"auth"}'
    await stream.send_all(client.send(BytesMessage(data=b'{"action":', message_finished=False)))
    await stream.send_all(client.send(BytesMessage(data=b'"subscribe"}')))
    assert await server.get_message() == b'{"action":"subscribe"}'
    events = await _client_events(stream, client, Pong)
    assert [event.payload for event in events if isinstance(event, Pong)] == [b"hi"]


async def test_a_message_over_the_limit_closes_1009():
    server, stream, client = await _open_pair(max_message_bytes=100)
    await stream.send_all(client.send(TextMessage(data="x" * 101)))
    with pytest.raises(WebSocketClosed) as closed:
        await server.get_message()
    assert closed.value.code == 1009
    events = await _client_events(stream, client, CloseConnection)
    assert events[-1].code == 1009


async def test_a_protocol_error_closes_with_its_code():
    server, stream, client = await _open_pair()
    await stream.send_all(bytes([0x81, 0x80 | 2, 0, 0, 0, 0]) + b"\xff\xfe")  # text frame, not UTF-8
    with pytest.raises(WebSocketClosed) as closed, trio.fail_after(5):
        await server.get_message()
    assert closed.value.code == 1007
    events = await _client_events(stream, client, CloseConnection)
    assert events[-1].code == 1007


async def test_the_peers_close_is_answered_and_ours_reaches_it():
    server, stream, client = await _open_pair()
    await stream.send_all(client.send(CloseConnection(code=1000, reason="bye")))
    with pytest.raises(WebSocketClosed) as closed:
        await server.get_message()
    assert (closed.value.code, server.close_code) == (1000, 1000)
    events = await _client_events(stream, client, CloseConnection)
    assert events[-1].code == 1000  # our answer

    server, stream, client = await _open_pair()
    server.send_texts(["[]"])

    async def answer_close() -> None:
        events = await _client_events(stream, client, CloseConnection)
        assert [type(event) for event in events] == [TextMessage, CloseConnection]
        assert events[-1].code == 4000
        await stream.send_all(client.send(events[-1].response()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_close)
        await server.aclose(4000, "test", timeout=5)
    assert server.close_code == 4000


async def test_a_plain_http_request_gets_400_and_the_server_carries_on(nursery, caplog):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim, shutdown_close_seconds=0.5))
    stream = await trio.open_tcp_stream("127.0.0.1", firehose.port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = await stream.receive_some(65536)
    await stream.send_all(b"and then bytes that are no HTTP at all\r\n\r\n")  # while it waits for our end
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")
    # and a WebSocket client right after is served as usual
    stream = await trio.open_tcp_stream("127.0.0.1", firehose.port)
    client = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(client.send(Request(host="x", target="/")))
    events = await _client_events(stream, client, TextMessage)
    assert not any(isinstance(event, RejectConnection) for event in events)
    assert '"status":"connected"' in next(e.data for e in events if isinstance(e, TextMessage))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # refused quietly, no traceback


async def test_a_peer_that_never_sends_a_handshake_is_dropped(nursery):
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim, auth_timeout_seconds=0.3))
    stream = await trio.open_tcp_stream("127.0.0.1", firehose.port)
    with trio.fail_after(3):
        assert await stream.receive_some(100) == b""  # closed by the proxy, without a word


async def test_a_client_that_stops_reading_altogether_is_closed_and_forgotten(nursery):
    """Its writer waits on a socket that never drains; the overflow must still end the session."""
    # (prebuilt events: cheap to send, so a starved machine still fills the kernel's buffers soon)
    sim = await start_simulator(nursery, events_per_second=20000, prebuilt_events=20000)
    firehose = await start_tier(nursery, firehose_config(
        sim, client_queue_events=2000, slow_client_close_seconds=0.5,
        static_channels=parse_channel_list("T.*,Q.*"),
    ))
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    await sock.connect(("127.0.0.1", firehose.port))
    stream = trio.SocketStream(sock)
    client = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(client.send(Request(host="x", target="/")))
    await _client_events(stream, client, TextMessage)  # connected
    await stream.send_all(client.send(TextMessage(data='{"action":"auth","params":"%s"}' % FIREHOSE_KEY)))
    await stream.send_all(client.send(TextMessage(data='{"action":"subscribe","params":"*"}')))
    # ...and never reads again
    await wait_until(lambda: firehose.stats.slow_consumer_disconnects == 1, timeout=60, what="the overflow")
    await wait_until(lambda: not firehose.hub.sessions, timeout=15, what="the session to end")
    assert firehose.registry.subscribers() == frozenset()
