"""One proxy tier, as one nursery tree: upstream link → router → client sessions.

Both the firehose and the filtered proxy are :func:`run_tier` with a different
:class:`~proxy.config.TierConfig`. The tree (design.md): the upstream link
feeds a bounded frame channel; the router turns each frame into per-client
queues without waiting on any client; a grace task expires unsubscribes; the
accept loop runs one nursery per client. ``task_status.started`` hands the
running :class:`Tier` to the caller (tests read its port, link and hub).
"""

from __future__ import annotations

import logging

import attrs
import trio

from . import protocol
from .config import TierConfig
from .routing import FrameError, route_frame
from .server import Hub, serve_clients
from .subscriptions import SubscriptionRegistry
from .upstream import LinkState, UpstreamLink

log = logging.getLogger("proxy.tier")
FRAME_QUEUE = 256
#: Statuses an upstream proxy tier sends about its own upstream; relayed to our clients.
RELAYED_STATUSES = frozenset({"upstream_disconnected", "upstream_connected"})
UPSTREAM_DISCONNECTED = "upstream_disconnected"
UPSTREAM_CONNECTED = "upstream_connected"


@attrs.define(eq=False)
class Tier:
    config: TierConfig
    registry: SubscriptionRegistry
    hub: Hub
    link: UpstreamLink
    port: int = 0
    frames_in: int = 0
    events_in: int = 0
    bad_frames: int = 0


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
    hub = Hub(config=config, registry=registry)
    frames_send, frames_receive = trio.open_memory_channel[str | bytes](FRAME_QUEUE)
    label = _upstream_label(config)

    def connected() -> None:
        hub.broadcast(protocol.status_frame(UPSTREAM_CONNECTED, f"{label} connection restored"))

    def disconnected(reason: str) -> None:
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
        extra=config.upstream_extra,
        on_connected=connected,
        on_disconnected=disconnected,
        backoff=config.backoff,
        keepalive_interval=config.keepalive_interval_seconds,
        keepalive_timeout=config.keepalive_timeout_seconds,
        ca_file=config.upstream_ca_file,
    )
    tier = Tier(config=config, registry=registry, hub=hub, link=link)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        nursery.start_soon(_route_frames, tier, frames_receive)
        nursery.start_soon(_expire_grace, tier)
        tier.port = await nursery.start(serve_clients, hub)
        log.info("Listening for clients on ws://%s:%d", config.host, tier.port)
        task_status.started(tier)


async def _route_frames(tier: Tier, frames: trio.MemoryReceiveChannel[str | bytes]) -> None:
    """Route every upstream frame; the only await is for the next frame."""
    registry, hub = tier.registry, tier.hub
    async for frame in frames:
        try:
            routed = route_frame(frame, registry)
        except FrameError as error:
            tier.bad_frames += 1
            log.warning("dropped a malformed frame from upstream (%s): %.120r", error, frame)
            continue
        tier.frames_in += 1
        tier.events_in += routed.event_count
        hub.deliver(routed)
        for status in routed.statuses:
            _handle_upstream_status(tier, status)


def _handle_upstream_status(tier: Tier, status: dict) -> None:
    kind = status.get("status")
    if kind in RELAYED_STATUSES:
        log.warning("upstream reports %s: %s", kind, status.get("message"))
        tier.hub.broadcast(protocol.status_frame(str(kind), str(status.get("message", ""))))
    elif kind == "success":
        log.debug("upstream: %s", status.get("message"))
    else:
        log.warning("upstream status %s: %s", kind, status.get("message"))


async def _expire_grace(tier: Tier) -> None:
    """Unsubscribe upstream what nobody needed for the whole grace period."""
    registry, demand = tier.registry, tier.hub.demand_changed
    while True:
        deadline = registry.next_deadline()
        if deadline is None:
            await demand.wait()
            continue
        with trio.move_on_at(deadline):
            await demand.wait()
            continue
        if registry.expire():
            demand.pulse()


def is_ready(tier: Tier) -> bool:
    return tier.link.state is LinkState.CONNECTED
