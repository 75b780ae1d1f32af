"""CPU per input event of a filtered tier's fan-out, by framing and CLIENT_FLUSH_MS: ``python -m bench.fanout_cost``.

``python -m bench.fanout_cost [--framings 1,10,200] [--flush-ms 0,5] [--rate 20000] [--seconds 5]``:
the filtered scenario of ``scripts/bench`` (100 clients, its Zipf plan over T and Q, 5 % on
``T.*``) with everything but the tier's own fan-out taken away, so that a machine shared with
other work still gives a figure: frames from the simulator's market model arrive at ``--rate``
events a second in *virtual* time (Trio's MockClock, evenly paced, ``F`` events a frame), and
the tier's code handles them as it does live: ``route_frame``, ``Hub.deliver`` and ``Hub.flush``
per frame, ``Hub.run_flusher`` for the writes the pacer puts off, each client's own writer for
backlogs, writing into real local sockets (real ``WsConnection`` s after a real opening
handshake) that a child process drains. What is measured is the CPU of the tier's thread
(``time.thread_time``: user and system, so the kernel's ``send`` counts) per input event, and
the writes made. The upstream read is not in it: :mod:`bench.upstream_read_cost` measures that.

``--star N`` measures the firehose-star scenario's relay instead: N clients holding ``*`` (no
filtered plan), every frame routed whole to all of them; the figures add CPU per input frame.
The thread's CPU includes the harness's own Trio checkpoints (two per frame, as a router woken
per frame pays); "tier µs/frame" is the wall time inside the tier's code alone (``route_frame``,
``Hub.deliver``, ``Hub.flush`` and the flusher's writes), which on a quiet machine is its CPU.
"""

from __future__ import annotations

import argparse
import random
import selectors
import socket
import os
import sys
import time

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from proxy.core.protocol import EVERYTHING_CHANNEL
from proxy.core.routing import route_frame
from proxy.core.settings import TierConfig
from proxy.core.subscriptions import SubscriptionRegistry
from proxy.net.connection import WsConnection
from proxy.net.server import ClientSession, Hub, _write_loop
from proxy.net.transport import SocketTransport
from proxy.sim.market import MarketModel, frame_of, prebuild, stamp, synthetic_symbols

CLIENT_KEY = "bench"
SYMBOLS = 3000


def zipf_plan(clients: int, seed: int) -> list[str]:
    """The same plan as ``scripts/bench``'s filtered scenario."""
    from bench.runner import zipf_plan as plan

    return plan(clients, seed)


class TimedHub(Hub):
    """A Hub whose flusher's writes are timed (flush's own are inside the timed block already)."""

    tier_seconds = 0.0
    in_block = False

    def _write_due(self, now: float) -> None:
        if self.in_block:
            return super()._write_due(now)
        started = time.perf_counter()
        super()._write_due(now)
        self.tier_seconds += time.perf_counter() - started


def socket_pairs(count: int) -> list[socket.socket]:
    """``count`` loopback socket pairs whose client ends have sent an opening handshake and are
    read (and discarded) by a child process, so that reading costs this process nothing;
    returns the server ends."""
    pairs = [socket.socketpair() for _ in range(count)]
    handshake = WSConnection(ConnectionType.CLIENT).send(Request(host="bench", target="/"))
    for _, client_end in pairs:
        client_end.sendall(handshake)
    if os.fork() == 0:  # the drainer: until every server end is closed
        try:
            selector = selectors.DefaultSelector()
            for server_end, client_end in pairs:
                server_end.close()
                selector.register(client_end, selectors.EVENT_READ)
            open_ends = count
            while open_ends:
                for key, _ in selector.select():
                    if not key.fileobj.recv(1 << 20):  # type: ignore[union-attr]
                        selector.unregister(key.fileobj)
                        open_ends -= 1
        finally:
            os._exit(0)
    for _, client_end in pairs:
        client_end.close()
    return [server_end for server_end, _ in pairs]


async def open_client(hub: Hub, nursery: trio.Nursery, server_end: socket.socket, channels: str) -> ClientSession:
    """A session on a real socket, past a real opening handshake, authenticated and subscribed."""
    server_end.setblocking(False)
    connection = WsConnection(SocketTransport(server_end), max_message_bytes=1 << 20)
    await connection.read_request()
    connection.accept()
    session = hub.open_session("127.0.0.1:1", connection)
    now = trio.current_time()
    hub.react_at_once(session, session.state.receive('{"action":"auth","params":"%s"}' % CLIENT_KEY, now))
    hub.react_at_once(session, session.state.receive('{"action":"subscribe","params":"%s"}' % channels, now))
    nursery.start_soon(_write_loop, hub, session, lambda: None)
    return session


async def run(framing: int, flush_ms: float, rate: float, seconds: float, plan: list[str],
              ends: list[socket.socket], clock: trio.testing.MockClock) -> dict:
    config = TierConfig(
        tier="filtered", upstream_url="ws://unused", upstream_api_key="unused", upstream_extra=(EVERYTHING_CHANNEL,),
        static_channels=(), host="127.0.0.1", port=0, api_keys=frozenset({CLIENT_KEY}), allow_any_key=False,
        metrics_port=None, client_flush_ms=flush_ms, max_connections_per_ip=100_000,
    )
    registry: SubscriptionRegistry[ClientSession] = SubscriptionRegistry(
        clock=trio.current_time, grace_seconds=5.0, static=())
    hub = TimedHub(config=config, registry=registry)
    model = MarketModel(synthetic_symbols(SYMBOLS), seed=1)
    events = int(rate * seconds)
    frames = [stamp(frame_of(chunk), 1_700_000_000_000) for chunk in prebuild(model, events, framing)]
    interval = framing / rate
    async with trio.open_nursery() as nursery:
        sessions = [await open_client(hub, nursery, end, channels) for end, channels in zip(ends, plan)]
        if flush_ms:
            nursery.start_soon(hub.run_flusher)
        await trio.testing.wait_all_tasks_blocked()
        writes_before, events_in = hub.stats.frames_out, 0
        start = trio.current_time()
        cpu = time.thread_time()
        for index, frame in enumerate(frames):
            clock.jump(max(0.0, start + index * interval - trio.current_time()))
            await trio.lowlevel.checkpoint()  # the flusher (and writers) run if due, as between frames live
            started = time.perf_counter()
            hub.in_block = True
            routed = route_frame(frame, registry)
            events_in += routed.event_count
            hub.deliver(routed, trio.current_time())
            hub.flush()
            hub.in_block = False
            hub.tier_seconds += time.perf_counter() - started
            await trio.lowlevel.checkpoint()
        clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        used = time.thread_time() - cpu
        writes = hub.stats.frames_out - writes_before
        nursery.cancel_scope.cancel()
    for end in ends:
        end.close()
    os.wait()
    return {"framing": framing, "flush_ms": flush_ms, "events": events_in,
            "us_per_event": 1e6 * used / events_in, "us_per_frame": 1e6 * used / len(frames),
            "tier_us_per_frame": 1e6 * hub.tier_seconds / len(frames),
            "writes_per_s": writes / seconds,
            "events_per_write": hub.stats.events_out / max(hub.stats.frames_out, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framings", default="1,10,200")
    parser.add_argument("--flush-ms", default="0,5")
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="virtual seconds of feed per measurement")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--star", type=int, default=0, metavar="N",
                        help="N clients holding `*` instead of the filtered plan (the firehose-star relay)")
    args = parser.parse_args(argv)
    plan = ["*"] * args.star if args.star else zipf_plan(args.clients, 1)
    random.seed(1)
    print(f"{'ev/frame':>9}{'flush ms':>9}{'events':>9}  {'µs/event':>9}{'µs/frame':>9}{'tier µs/frame':>14}{'writes/s':>10}{'ev/write':>9}")
    for framing in (int(item) for item in args.framings.split(",")):
        for flush_ms in (float(item) for item in args.flush_ms.split(",")):
            for _ in range(args.rounds):
                clock = trio.testing.MockClock()
                ends = socket_pairs(len(plan))
                result = trio.run(run, framing, flush_ms, args.rate, args.seconds, plan, ends, clock, clock=clock)
                print(f"{framing:>9}{flush_ms:>9g}{result['events']:>9}  {result['us_per_event']:>9.2f}"
                      f"{result['us_per_frame']:>9.2f}{result['tier_us_per_frame']:>14.2f}{result['writes_per_s']:>10,.0f}{result['events_per_write']:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
