"""Hostile and heavy clients (issue 13, client I/O): what a client sends can cost the proxy only bounded memory.

Memory is measured in-process with tracemalloc, which sees every buffer the
proxy allocates (bytearrays included); the test client reuses one block, so
what grows is the proxy's.
"""

from __future__ import annotations

import gc
import os
import socket
import tracemalloc
import weakref

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from .conftest import firehose_config, start_simulator, start_tier, wait_until

MB = 1 << 20


async def handshake(port: int, *, rcvbuf: int | None = None) -> tuple[trio.socket.SocketType, WSConnection]:
    """A raw socket that completed the WebSocket opening handshake, and its wsproto client."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    client = WSConnection(ConnectionType.CLIENT)
    await sock.send(client.send(Request(host="127.0.0.1", target="/")))
    while True:
        data = await sock.recv(65536)
        assert data, "the proxy closed during the handshake"
        client.receive_data(data)
        if any(isinstance(event, AcceptConnection) for event in client.events()):
            return sock, client


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
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim, shutdown_close_seconds=5))
    flood_bytes = 256 * MB
    sock, _ = await handshake(firehose.port)
    block = os.urandom(64 * 1024)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with trio.fail_after(90):
            await flood(sock, block, flood_bytes)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        sock.close()
    assert peak < 16 * MB, f"the proxy held {peak / MB:.0f} MB of a client's flood"


async def test_a_closed_session_is_freed_without_waiting_for_the_cycle_collector(nursery):
    """What a connection held comes back when it closes, not whenever a full collection happens to run.

    The session and its connection pointed at each other (the connection's
    ``notify`` is the session's): freed only by the cycle collector, which an
    idle server may not run for minutes, so a flood's buffers stayed.
    """
    sim = await start_simulator(nursery)
    firehose = await start_tier(nursery, firehose_config(sim))
    await wait_until(lambda: firehose.link.state.value == "connected")
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
