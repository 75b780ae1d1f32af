"""CPU per frame a tier spends reading its upstream link: ``python -m bench.upstream_read_cost``.

``python -m bench.upstream_read_cost [--events-per-frame 1,10,200] [--frames N] [--rounds R]``:
a writer process sends pre-built text frames (each a JSON array of ``E`` trade events, as
Polygon sends them) as fast as the socket takes them, after a WebSocket opening handshake;
a reader process takes them to a stand-in for the router, which counts them. The reader's
CPU (user + system, from ``getrusage``) over the frames is divided by their number. With
``--per-write K`` the writer sends K frames at a time, 100 µs apart, so that a read finds
few frames (as at a tier's usual rates) and the cost per wake-up shows. Each
reader is a process forked fresh for its round (see :mod:`bench.receive_cost` for why).

Readers compared:

- ``link``: the upstream link's own code (:meth:`~proxy.net.upstream.UpstreamLink._read_frames`
  on a :class:`~proxy.net.upstream_socket.UpstreamSocket`): one ``receive_some`` of up to 256 KiB
  a wake-up, the socket's protocol parses it (wsproto until 2026-12-07, websockets' sans-I/O
  ``ClientProtocol`` since, with each text frame decoded to check it is UTF-8), and its frames go
  to the router task as one batch;
- ``trio-websocket``: as the upstream link read until 2026-12-07: ``get_message()`` in the link's
  task, its ``may_hold_status`` check, one memory-channel ``send`` per frame, the router task
  receiving each frame (the link's check was added to this reader on 2026-12-07, so that it
  stands for the old link next to ``link``; the bare readers below skip it);
- ``wsproto``: wsproto's connection straight on a Trio socket stream: each ``receive_some``
  (up to 256 KiB) is parsed at once and its frames go to the router as one list, with
  no task switch or channel operation per frame;
- ``websockets``: the same loop with websockets' sans-I/O ``ClientProtocol`` in wsproto's place;
- ``frame-reader``: the benchmark clients' :class:`~bench.client_process.FrameReader`
  (cuts frames, checks nothing: not a candidate for the link, a floor for comparison).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import resource
import socket
import statistics
import sys
from typing import Callable

import trio

RECEIVE_BYTES = 256 * 1024
EVENT = (b'{"ev":"T","sym":"MSFT","i":"50578","x":4,"p":215.9721,"s":100,'
         b'"c":[37],"t":1611082428813,"q":3490,"z":3}')
READERS = ("link", "trio-websocket", "wsproto", "websockets", "frame-reader")
#: The message queue trio-websocket was given when the link read through it.
TRIO_WEBSOCKET_QUEUE = 64


def frames_blob(events_per_frame: int, frames: int) -> bytes:
    """``frames`` server text frames of ``events_per_frame`` events each, back to back."""
    from proxy.net.frames import text_frame

    one = text_frame(b"[" + b",".join([EVENT] * events_per_frame) + b"]")
    return one * frames


def serve_once(listener: socket.socket, blob: bytes, frame_size: int, per_write: int) -> None:
    """The writer: answer one opening handshake with 101, send ``blob`` (all at once, or
    ``per_write`` frames of ``frame_size`` bytes at a time, 100 µs apart), read to EOF."""
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = b""
    while b"\r\n\r\n" not in request:
        request += connection.recv(65536)
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    connection.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    if per_write:
        import time

        step = frame_size * per_write
        for start in range(0, len(blob), step):
            connection.sendall(blob[start:start + step])
            time.sleep(0.0001)
    else:
        connection.sendall(blob)
    while connection.recv(65536):
        pass


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def read_trio_websocket(port: int, frames: int) -> float:
    from trio_websocket import wrap_client_stream

    from proxy.core.routing import may_hold_status

    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{port}", "/", max_message_size=64 * 1024 * 1024,
                                      receive_buffer_size=RECEIVE_BYTES, message_queue_size=TRIO_WEBSOCKET_QUEUE)
        send, receive = trio.open_memory_channel[tuple[str | bytes, float]](256)
        started = cpu_now()

        async def link() -> None:  # as UpstreamLink._serve: one get_message and one send per frame
            for _ in range(frames):
                message = await ws.get_message()
                may_hold_status(message)
                await send.send((message, trio.current_time()))

        nursery.start_soon(link)
        seen = 0
        async for _ in receive:  # as the router
            seen += 1
            if seen == frames:
                break
        used = cpu_now() - started
        nursery.cancel_scope.cancel()
    return used


async def read_link(port: int, frames: int) -> float:
    """The link's reading code on its socket, batches to a stand-in for the router."""
    from proxy.app.tier import FRAME_QUEUE
    from proxy.net.beacon import Beacon
    from proxy.net.upstream import FrameBatch, UpstreamLink
    from proxy.net.upstream_socket import UpstreamSocket

    ws = UpstreamSocket(await trio.open_tcp_stream("127.0.0.1", port))
    await ws.open(f"127.0.0.1:{port}", "/")
    send, receive = trio.open_memory_channel[FrameBatch](FRAME_QUEUE)
    link = UpstreamLink("bench", f"ws://127.0.0.1:{port}", "key", desired=frozenset, demand_changed=Beacon(),
                        frames=send)
    started = cpu_now()
    seen = reads = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._read_frames, ws)
        async for batch, _ in receive:  # as the router
            seen += len(batch)
            reads += 1
            if seen >= frames:
                break
        used = cpu_now() - started
        nursery.cancel_scope.cancel()
    print(f"    {reads} batches, {seen / reads:.1f} frames a batch", file=sys.stderr)
    return used


async def read_batched(port: int, frames: int, make: Callable[[int], tuple[bytes, Callable[[bytes], list]]]) -> float:
    """A sans-I/O reader on a Trio socket stream: every read's frames handed on as one list."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request, parse = make(port)
    await stream.send_all(request)
    started = None
    seen = 0
    batches = []
    while seen < frames:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise RuntimeError("the writer closed early")
        messages = parse(data)
        if messages and started is None:
            started = cpu_now()  # the handshake is done: count from the first data
        batches.append(len(messages))
        seen += len(messages)
    used = cpu_now() - (started or cpu_now())
    await stream.aclose()
    print(f"    {len(batches)} reads, {seen / len(batches):.1f} frames a read", file=sys.stderr)
    return used


def wsproto_reader(port: int) -> tuple[bytes, Callable[[bytes], list]]:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Request, TextMessage

    ws = WSConnection(ConnectionType.CLIENT)
    request = ws.send(Request(host=f"127.0.0.1:{port}", target="/"))

    def parse(data: bytes) -> list:
        ws.receive_data(data)
        return [event.data for event in ws.events() if isinstance(event, TextMessage) and event.message_finished]

    return request, parse


def websockets_reader(port: int) -> tuple[bytes, Callable[[bytes], list]]:
    from websockets.client import ClientProtocol
    from websockets.frames import Opcode
    from websockets.uri import parse_uri

    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"), max_size=64 * 1024 * 1024)
    protocol.send_request(protocol.connect())
    request = b"".join(protocol.data_to_send())
    text = Opcode.TEXT

    def parse(data: bytes) -> list:
        protocol.receive_data(data)
        return [frame.data for frame in protocol.events_received() if getattr(frame, "opcode", None) is text]

    return request, parse


def frame_reader(port: int) -> tuple[bytes, Callable[[bytes], list]]:
    from bench.client_process import FrameReader

    reader = FrameReader()
    key = base64.b64encode(os.urandom(16))
    request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, key))
    head = bytearray()
    past_head = False

    def parse(data: bytes) -> list:
        nonlocal past_head
        if not past_head:
            head.extend(data)
            end = head.find(b"\r\n\r\n")
            if end < 0:
                return []
            past_head, data = True, bytes(head[end + 4:])
        return [payload for opcode, payload in reader.feed(data) if opcode == 1]

    return request, parse


def measure(reader: str, events_per_frame: int, frames: int, per_write: int = 0) -> float:
    """CPU seconds ``reader`` took over ``frames`` frames, in a fresh reader process."""
    blob = frames_blob(events_per_frame, frames)
    frame_size = len(blob) // frames
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    writer = os.fork()
    if writer == 0:
        try:
            serve_once(listener, blob, frame_size, per_write)
        finally:
            os._exit(0)
    listener.close()
    answer, report = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            if reader == "trio-websocket":
                used = trio.run(read_trio_websocket, port, frames)
            elif reader == "link":
                used = trio.run(read_link, port, frames)
            else:
                make = {"wsproto": wsproto_reader, "websockets": websockets_reader, "frame-reader": frame_reader}[reader]
                used = trio.run(read_batched, port, frames, make)
            os.write(report, repr(used).encode())
        finally:
            os._exit(0)
    os.close(report)
    with os.fdopen(answer) as result:
        used = float(result.read())
    os.waitpid(child, 0)
    os.waitpid(writer, 0)
    return used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_read_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events-per-frame", default="1,10,200")
    parser.add_argument("--events", type=int, default=400_000, help="events per round (default 400,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--per-write", type=int, default=0,
                        help="frames the writer sends at a time, 100 µs apart (default 0: all at once, "
                             "so that each read takes what fits in 256 KiB)")
    args = parser.parse_args(argv)
    print(f"{'reader':<16}{'ev/frame':>9}{'frames':>9}  µs per frame (best, median of rounds)  µs per event")
    for events_per_frame in (int(item) for item in args.events_per_frame.split(",")):
        frames = max(1000, args.events // events_per_frame)
        for reader in args.readers.split(","):
            per_frame = []
            for _ in range(args.rounds):
                per_frame.append(1e6 * measure(reader, events_per_frame, frames, args.per_write) / frames)
            best, median = min(per_frame), statistics.median(per_frame)
            print(f"{reader:<16}{events_per_frame:>9}{frames:>9}  {best:8.2f} {median:8.2f}"
                  f"{' ' * 26}{best / events_per_frame:8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
