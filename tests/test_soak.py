"""Soaks: churn and upstream drops; hostile clients beside a healthy one.

Marked slow: ``scripts/test --slow`` runs them (``SOAK_SECONDS`` sets the length of each, 600 by
default).

- Simulator traffic, clients joining and leaving at random, an upstream drop every minute: a
  ``*`` neighbour loses nothing outside the outage windows the proxy announced, memory stays
  flat, and the counters agree with what happened.
- Hostile clients all the while (flooders of random bytes, pingers that never read, a churner of
  big subscribes, never-readers of everything, control-message flooders) beside a healthy client
  that must get every event of every window the simulator's marks delimit; RSS from ``/proc``
  has a bounded peak and each hostile client gets the close code the protocol gives it.
"""

from __future__ import annotations

import array
import collections
import itertools
import json
import os
import random
import tracemalloc

import attrs
import msgspec
import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto import WSConnection
from wsproto.events import CloseConnection, Ping

from proxy.net.server import Hub
from tests.helpers import (
    ALL_STREAM,
    CLIENT_KEY,
    Client,
    SlowReader,
    authed_client,
    handshake,
    masked,
    send_all,
    start_chain,
    wait_until,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SYMBOLS = ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "SPY", "QQQ", "AAA", "AAB"]


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
async def test_soak(nursery):
    rnd = random.Random(2026)
    sim, firehose, filtered = await start_chain(nursery, firehose=dict(static_channels=ALL_STREAM),
                                                filtered=dict(unsubscribe_grace_seconds=1.0))
    neighbour = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*")
    # In arrival order: q as a non-negative number, an announced outage as -1. Compact on
    # purpose: the test's own bookkeeping must not be what the memory check measures.
    timeline = array.array("q")
    decode = msgspec.json.Decoder(list[dict]).decode

    async def watch() -> None:
        while True:
            for event in decode(await neighbour.ws.get_message()):
                if "q" in event:
                    timeline.append(event["q"])
                elif event.get("status") == "upstream_disconnected":
                    timeline.append(-1)

    joins = 0

    async def one_client() -> None:
        nonlocal joins
        joins += 1
        channels = ",".join(f"{rnd.choice('TQ')}.{rnd.choice(SYMBOLS)}" for _ in range(rnd.randint(1, 6)))
        async with trio.open_nursery() as own:
            client = await authed_client(own, filtered.port, CLIENT_KEY, subscribe=channels)
            with trio.move_on_after(rnd.uniform(0.5, 8)):
                try:
                    while True:
                        await client.receive()
                except ConnectionClosed:
                    pass
            await client.ws.aclose()
            own.cancel_scope.cancel()

    async def churn() -> None:
        async with trio.open_nursery() as clients:
            while True:
                clients.start_soon(one_client)
                await trio.sleep(rnd.uniform(0.05, 0.5))

    async def drops(interval: float) -> None:
        while True:
            await trio.sleep(interval)
            sim.drop_all(abrupt=rnd.random() < 0.5)

    tracemalloc.start()
    async with trio.open_nursery() as soak:
        soak.start_soon(watch)
        soak.start_soon(churn)
        soak.start_soon(drops, min(60.0, SOAK_SECONDS / 5))
        await trio.sleep(SOAK_SECONDS / 4)
        early = tracemalloc.get_traced_memory()[0] - timeline.buffer_info()[1] * timeline.itemsize
        await trio.sleep(SOAK_SECONDS * 3 / 4)
        late = tracemalloc.get_traced_memory()[0] - timeline.buffer_info()[1] * timeline.itemsize
        soak.cancel_scope.cancel()
    tracemalloc.stop()
    await wait_until(lambda: len(filtered.hub.sessions) == 1, what="the churned clients' sessions to end")

    # no loss outside announced outages: every gap in `q` has an upstream_disconnected before it
    outages = 0
    previous_q = None
    disconnected_since_previous = False
    for value in timeline:
        if value == -1:
            disconnected_since_previous = True
            outages += 1
        else:
            if previous_q is not None and value != previous_q + 1:
                assert disconnected_since_previous, f"events {previous_q + 1}..{value - 1} lost outside an outage"
            previous_q, disconnected_since_previous = value, False
    assert outages >= 4
    assert sum(1 for value in timeline if value >= 0) > SOAK_SECONDS * 1000

    # flat memory: what the second three quarters added is small next to the first quarter
    assert late - early < max(5_000_000, 0.2 * early), (early, late)

    # counters consistent with what happened
    assert filtered.stats.clients_total == joins + 1
    assert len(filtered.hub.sessions) == 1  # the neighbour
    assert filtered.registry.subscribers() == frozenset(filtered.hub.sessions)
    assert firehose.stats.outages >= 4 and filtered.stats.outages == 0
    assert outages == firehose.stats.outages  # each one announced to the clients
    in_flight = 5 * sim.config.events_per_second
    assert abs(filtered.stats.events_in - firehose.stats.events_out) < in_flight


# --- hostile clients beside a healthy one ---------------------------------------------------------------

HEALTHY = "T.*,Q.*,LULD.*,BENCH.MARK"


def rss_bytes() -> int:
    """This process's resident memory from /proc: the simulator, both tiers and every client live in it."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def _read_close(sock: trio.socket.SocketType, client: WSConnection, limit: float = 30) -> int | None:
    """Read (and drop) until the proxy's close frame; its code, or None if the connection just ended."""
    with trio.fail_after(limit):
        while True:
            try:
                data = await sock.recv(1 << 20)
            except OSError:
                return None
            if not data:
                return None
            client.receive_data(data)
            for event in client.events():
                if isinstance(event, CloseConnection):
                    return event.code


@attrs.define
class Hostiles:
    """Hostile clients, each kind in a loop until cancelled; ``closes[kind]`` holds the close code each got."""

    port: int
    hub: Hub
    closes: dict[str, list[int | None]] = attrs.field(factory=lambda: collections.defaultdict(list))
    churned: int = 0
    pings: int = 0
    errors: list[str] = attrs.field(factory=list)  # what a well-behaved churner must never be told

    async def flooder(self) -> None:
        """Handshake, then random bytes after a frame with a reserved opcode: closed 1002, whatever follows."""
        while True:
            sock, client = await handshake(self.port)
            with sock:
                block = bytes([0x83, 0x80]) + b"\0" * 4 + os.urandom(64 * 1024)
                try:
                    for _ in range(2):
                        await send_all(sock, block)
                except OSError:
                    pass  # it stopped reading, as it should
                self.closes["flooder"].append(await _read_close(sock, client))
            await trio.sleep(0.5)

    async def pinger(self) -> None:
        """Authenticated, 500 pings a second, never reads (a 4 KiB receive buffer), 5 s a connection."""
        while True:
            sock, client = await handshake(self.port, rcvbuf=4096)
            with sock:
                await send_all(sock, masked(json.dumps({"action": "auth", "params": CLIENT_KEY})))
                batch = b"".join(client.send(Ping(payload=b"%08d" % n)) for n in range(500))
                with trio.move_on_after(5):
                    while True:
                        await send_all(sock, batch)
                        self.pings += 500
                        await trio.sleep(1.0)

    async def churner(self) -> None:
        """Subscribes 5,000 new channels and drops the previous 5,000, every second, within its limits."""
        async with trio.open_nursery() as own:
            client = await authed_client(own, self.port, CLIENT_KEY)
            own.start_soon(self._collect_errors, client)
            previous = None
            for cycle in itertools.count():
                channels = ",".join(f"FMV.C{cycle % 7}X{n}" for n in range(5000))
                await client.send("subscribe", channels)
                if previous is not None:
                    await client.send("unsubscribe", previous)
                previous = channels
                self.churned += 1
                await trio.sleep(1.0)

    async def _collect_errors(self, client: Client) -> None:
        while True:
            for event in json.loads(await client.ws.get_message()):
                if event.get("ev") == "status" and event["status"] != "success":
                    self.errors.append(event.get("message", event["status"]))

    async def never_reader(self) -> None:
        """Subscribes everything and never reads: the slow-consumer policy closes it (1008)."""
        while True:
            slow = await SlowReader.subscribe(self.port, CLIENT_KEY, "*")
            with slow.sock:
                port = slow.sock.getsockname()[1]
                await wait_until(lambda: any(s.peer.endswith(f":{port}") for s in self.hub.sessions),
                                 what="the never-reader's session")
                # its queue fills at the feed's rate; then it is closed
                await wait_until(lambda: not any(s.peer.endswith(f":{port}") for s in self.hub.sessions),
                                 timeout=120, what="the never-reader to be closed")
                slow.fast = True
                with trio.move_on_after(30):
                    await slow.run()
                self.closes["never-reader"].append(slow.close_code)

    async def control_flooder(self) -> None:
        """Authenticated, then subscribes as fast as it can: refused over the rate, then closed 1008."""
        while True:
            sock, client = await handshake(self.port)
            with sock:
                message = masked(json.dumps({"action": "subscribe", "params": "T.AAPL"}))
                await send_all(sock, masked(json.dumps({"action": "auth", "params": CLIENT_KEY})) + message * 400)
                self.closes["control flooder"].append(await _read_close(sock, client))
            await trio.sleep(2.0)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
async def test_soak_hostile_clients_beside_a_healthy_one(nursery):
    """Flooders, pingers, churners, never-readers and control flooders, all the while, on the filtered
    proxy; a healthy client beside them must get every event of every window (the simulator's marks
    delimit them, a minute or a tenth of the soak each), RSS must peak below a bound, each hostile
    client must get the close code the protocol gives it, and the tier link is never dropped."""
    sim, firehose, filtered = await start_chain(
        nursery, simulator=dict(events_per_second=500), firehose=dict(static_channels=ALL_STREAM),
        filtered=dict(client_queue_events=10_000, slow_client_close_seconds=1.0))
    healthy = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe=HEALTHY)
    await wait_until(lambda: "BENCH.MARK" in sim.subscribed_channels(), what="the healthy client's demand upstream")
    received: collections.Counter = collections.Counter()  # window number → events received in it
    statuses: list[str] = []
    marks: list[int] = []
    decode = msgspec.json.Decoder(list[dict]).decode

    async def watch() -> None:
        window = 0  # the open window's number, 0 between windows
        while True:
            for event in decode(await healthy.ws.get_message()):
                ev = event.get("ev")
                if ev == "BENCH":
                    marks.append(event["n"])
                    window = (event["n"] + 1) // 2 if event["n"] % 2 else 0
                elif ev == "status":
                    statuses.append(event["status"])
                elif window:
                    received[window] += 1

    nursery.start_soon(watch)
    hostiles = Hostiles(filtered.port, filtered.hub)
    windows = max(4, min(10, int(SOAK_SECONDS // 60)))
    sent: dict[int, int] = {}
    samples: list[int] = []
    async with trio.open_nursery() as soak:
        for kind in (hostiles.flooder, hostiles.flooder, hostiles.pinger, hostiles.pinger, hostiles.churner,
                     hostiles.never_reader, hostiles.never_reader, hostiles.control_flooder):
            soak.start_soon(kind)

        async def sample() -> None:
            while True:
                samples.append(rss_bytes())
                await trio.sleep(1.0)

        soak.start_soon(sample)
        counted = 0
        for window in range(1, windows + 1):
            sim.mark()  # opens window
            await trio.sleep(SOAK_SECONDS / windows)
            sim.mark()  # closes it
            # what the healthy client holds of it (the firehose holds FMV too)
            total = sum(count for channel, count in sim.window_counts.items() if channel.split(".")[0] in ("T", "Q", "LULD"))
            sent[window], counted = total - counted, total
        soak.cancel_scope.cancel()
    with trio.move_on_after(120):
        while len(marks) < 2 * windows:
            await trio.sleep(0.1)
    assert len(marks) == 2 * windows, (f"the healthy client saw marks {marks} of {sim.marks}; received {dict(received)} "
                                       f"of {sent}; statuses {statuses}; sessions {len(filtered.hub.sessions)}")
    await wait_until(lambda: len(filtered.hub.sessions) == 1, timeout=60, what="the hostile sessions to end")

    early = max(samples[len(samples) // 4: len(samples) // 2])
    late = max(samples[len(samples) // 2:])  # (reported: how RSS moved)
    print(f"hostile soak, {SOAK_SECONDS:.0f}s: windows sent {sent}, received {dict(received)}; "
          f"closes { {kind: collections.Counter(codes) for kind, codes in hostiles.closes.items()} }, "
          f"{hostiles.pings} pings, {hostiles.churned} churn cycles; RSS MB first quarter max "
          f"{max(samples[:len(samples) // 4]) / 1e6:.0f}, second {early / 1e6:.0f}, second half {late / 1e6:.0f}; "
          f"by tenths {[round(max(samples[i * len(samples) // 10:(i + 1) * len(samples) // 10]) / 1e6) for i in range(10)]}")
    for window in range(1, windows + 1):
        assert received[window] == sent[window], (window, received[window], sent[window])
    assert statuses == [] and filtered.link.reconnects == 0 and firehose.link.reconnects == 0
    # every hostile client got what the protocol gives it
    assert set(hostiles.closes["flooder"]) <= {1002} and hostiles.closes["flooder"]
    assert set(hostiles.closes["control flooder"]) <= {1008} and hostiles.closes["control flooder"]
    # A never-reader is closed as a slow consumer (1008) once its queue overflows, or as gone (1011)
    # when it leaves the server's ping unanswered first (the kernel's buffers take a minute of
    # the feed before its queue even starts to fill): whichever comes first, nothing else.
    assert set(hostiles.closes["never-reader"]) <= {1008, 1011} and hostiles.closes["never-reader"]
    assert hostiles.errors == [] and hostiles.churned > windows
    # Bounded memory. What the tiers hold stays small (tracemalloc saw a few MB grow in a minute of
    # this); RSS moves with the allocator, which keeps freed blocks until the tier trims it after a
    # big release of channels: here it climbed in steps to 335 MB and fell back to 137 MB within
    # 300 s. So the peak is bounded, far below what floods took before issue 13 (0.55-3 GB).
    assert max(samples) < 512e6, f"RSS peaked at {max(samples) / 1e6:.0f} MB"
