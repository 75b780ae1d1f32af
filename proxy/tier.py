"""One proxy tier, as one nursery tree: upstream link → router → client sessions.

Both the firehose and the filtered proxy are :func:`run_tier` with a different
:class:`~proxy.config.TierConfig`. The tree (design.md): the upstream link
feeds a bounded frame channel; the router turns each frame into per-client
queues without waiting on any client; a grace task expires unsubscribes; the
accept loop runs one nursery per client. ``task_status.started`` hands the
running :class:`Tier` to the caller (tests read its port, link and hub).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Callable

import attrs
import trio

from prometheus_client import CollectorRegistry

from . import protocol
from .config import TierConfig
from .http import serve_http
from .metrics import TierCollector, TierStats
from .outbox import SlowClientPolicy
from .routing import FrameError, route_frame
from .server import Hub, serve_clients
from .session import CHANNELS_PER_STEP
from .subscriptions import SubscriptionRegistry
from .upstream import LinkState, UpstreamLink

log = logging.getLogger("proxy.tier")
FRAME_QUEUE = 256
SUMMARY_INTERVAL_SECONDS = 60.0
#: Channels expired from the grace period between two returns of freed memory to the system.
TRIM_AFTER_CHANNELS = 100_000
UPSTREAM_DISCONNECTED = "upstream_disconnected"
UPSTREAM_CONNECTED = "upstream_connected"
#: Statuses an upstream proxy tier sends about its own upstream; relayed to our clients.
RELAYED_STATUSES = frozenset({UPSTREAM_DISCONNECTED, UPSTREAM_CONNECTED})


@attrs.define(eq=False)
class Tier:
    config: TierConfig
    registry: SubscriptionRegistry
    hub: Hub
    link: UpstreamLink
    stats: TierStats
    metrics: CollectorRegistry
    port: int = 0
    metrics_port: int = 0

    def readiness(self) -> tuple[bool, str]:
        """Ready only while the upstream is connected and authenticated; else why not."""
        if self.link.state is LinkState.CONNECTED:
            return True, f"ready: {self.link.label} connected"
        return False, f"not ready: {self.link.label} {self.link.state.value} ({self.link.last_error})"


def _upstream_label(config: TierConfig) -> str:
    return "Polygon" if config.tier == "firehose" else "firehose proxy"


async def run_tier(
    config: TierConfig, *, task_status: trio.TaskStatus[Tier] = trio.TASK_STATUS_IGNORED
) -> None:
    registry = SubscriptionRegistry(
        clock=trio.current_time,
        grace_seconds=config.unsubscribe_grace_seconds,
        static=config.static_channels,
    )
    stats = TierStats()
    metrics = CollectorRegistry()
    hub = Hub(config=config, registry=registry, stats=stats)
    frames_send, frames_receive = trio.open_memory_channel[tuple[str | bytes, float]](FRAME_QUEUE)
    label = _upstream_label(config)

    outage_started: list[float] = []  # when the current outage began, if one is going on
    connections: list[float] = []  # when the link connected; no client hears of the first one

    def connected() -> None:
        connections.append(trio.current_time())
        if len(connections) == 1:
            return  # not a recovery: clients that came early were never told of an outage
        if outage_started:
            seconds = trio.current_time() - outage_started.pop()
            stats.outage_seconds += seconds
            log.warning("%s connection restored after a %.1fs outage; events sent upstream in that "
                        "window are lost (Polygon has no replay)", label, seconds)
            message = f"{label} connection restored after {seconds:.1f}s; events of that window are lost"
        else:
            message = f"{label} connection restored"
        hub.broadcast(protocol.status_frame(UPSTREAM_CONNECTED, message))

    def disconnected(reason: str) -> None:
        stats.outages += 1
        # The gap began with the last frame the link read, not when the keepalive noticed it.
        last = link.last_received_at
        outage_started.append(trio.current_time() if last is None else last)
        log.warning("lost the %s connection (%s); clients stay connected", label, reason)
        hub.broadcast(protocol.status_frame(
            UPSTREAM_DISCONNECTED,
            f"{label} connection lost ({reason}); reconnecting, events in the gap are not replayed",
        ))

    link = UpstreamLink(
        label=label,
        url=config.upstream_url,
        api_key=config.upstream_api_key,
        desired=lambda: registry.upstream,
        demand_changed=hub.demand_changed,
        frames=frames_send,
        changes=registry.take_upstream_changes,
        held=registry.held_upstream,
        extra=config.upstream_extra,
        # A filtered tier's upstream is a tier of ours: it says it carries many clients' demand.
        role=protocol.PROXY_ROLE if config.tier != "firehose" else None,
        on_connected=connected,
        on_disconnected=disconnected,
        on_refused=hub.refuse,
        backoff=config.backoff,
        keepalive_interval=config.keepalive_interval_seconds,
        keepalive_timeout=config.keepalive_timeout_seconds,
        ca_file=config.upstream_ca_file,
        close_seconds=config.shutdown_close_seconds,
    )
    tier = Tier(config=config, registry=registry, hub=hub, link=link, stats=stats, metrics=metrics)
    metrics.register(TierCollector(tier))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        nursery.start_soon(_route_frames, tier, frames_receive)
        nursery.start_soon(_expire_grace, tier)
        nursery.start_soon(_log_summary, tier)
        tier.port = await nursery.start(serve_clients, hub)
        log.info("Listening for clients on ws://%s:%d", config.host, tier.port)
        if config.metrics_port is not None:
            tier.metrics_port = await nursery.start(
                serve_http, config.host, config.metrics_port, tier.readiness, metrics
            )
        task_status.started(tier)


async def _route_frames(
    tier: Tier, frames: trio.MemoryReceiveChannel[tuple[str | bytes, float]]
) -> None:
    """Route every upstream frame, then write to the clients; the only await is for the next frame.

    Everything already queued is routed before the clients are written to, so
    under load a client gets several frames' worth of events in one message:
    per-send cost is paid less often exactly when it matters (design.md).
    """
    async for frame, received_at in frames:
        _route_one(tier, frame, received_at)
        while True:
            try:
                frame, received_at = frames.receive_nowait()
            except trio.WouldBlock:
                break
            _route_one(tier, frame, received_at)
        tier.hub.flush()


def _route_one(tier: Tier, frame: str | bytes, received_at: float) -> None:
    stats = tier.stats
    stats.bytes_in += len(frame)
    try:
        routed = route_frame(frame, tier.registry)
    except FrameError as error:
        stats.bad_frames += 1
        log.warning("dropped a malformed frame from upstream (%s): %.120r", error, frame)
        return
    stats.frames_in += 1
    stats.events_in += routed.event_count
    tier.hub.deliver(routed, received_at)
    for status in routed.statuses:
        _handle_upstream_status(tier, status)


def _handle_upstream_status(tier: Tier, status: dict) -> None:
    kind = status.get("status")
    if kind in RELAYED_STATUSES:
        log.warning("upstream reports %s: %s", kind, status.get("message"))
        tier.hub.broadcast(protocol.status_frame(str(kind), str(status.get("message", ""))))
    elif kind == "success":
        pass  # answers to our subscribes (hundreds a message): the link logs what it sent
    else:
        log.warning("upstream status %s: %s", kind, status.get("message"))


async def _expire_grace(tier: Tier) -> None:
    """Unsubscribe upstream what nobody needed for the whole grace period, a step at a time
    (after a crowd left, a million channels may be due at once); after every 100,000
    channels let go, hand the memory they held back to the system."""
    registry, demand = tier.registry, tier.hub.demand_changed
    released = 0
    while True:
        deadline = registry.next_deadline()
        if deadline is None:
            await demand.wait()
            continue
        with trio.move_on_at(deadline):
            await demand.wait()
            continue
        async with tier.hub.heavy_control:
            delta = registry.expire(limit=CHANNELS_PER_STEP)
            if delta:
                demand.pulse()
            released += len(delta.unsubscribe)
            if released >= TRIM_AFTER_CHANNELS:
                released = 0
                _trim_allocator()


def _trim_allocator() -> None:
    """Ask glibc to return the free memory inside its heap to the system (about 8 ms).

    After 100 clients with 10,000 channels each left, the registry had freed its objects and
    rebuilt its tables, yet the process stayed at 158 MB resident (366 MB at the peak, 34
    before): glibc keeps freed blocks inside its heap for reuse. malloc_trim brought it to
    50 MB (proxy/bench/subscribe_cost.py --rss). Without malloc_trim (not glibc), nothing is done.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


_malloc_trim = _find_malloc_trim()


async def _log_summary(tier: Tier, interval: float = SUMMARY_INTERVAL_SECONDS) -> None:
    """Once a minute, the figures an operator looks at first."""
    stats = tier.stats
    last_in, last_out, last_time = stats.events_in, stats.events_out, trio.current_time()
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        elapsed = max(now - last_time, 1e-9)
        drops = tier.hub.dropped(SlowClientPolicy.DISCONNECT) + tier.hub.dropped(SlowClientPolicy.DROP_OLDEST)
        log.info(
            "summary: %d clients, %.0f events/s in, %.0f events/s out, %d events dropped in all, "
            "%d slow-consumer disconnects, upstream %s, %d reconnects",
            len(tier.hub.sessions), (stats.events_in - last_in) / elapsed,
            (stats.events_out - last_out) / elapsed, drops, stats.slow_consumer_disconnects,
            tier.link.state.value, tier.link.reconnects,
        )
        last_in, last_out, last_time = stats.events_in, stats.events_out, now
