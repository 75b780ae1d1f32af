"""One proxy tier, as one nursery tree: upstream link → router → client sessions.

Both the firehose and the filtered proxy are :func:`run_tier` with a different
:class:`~proxy.core.settings.TierConfig`. The tree (docs/architecture.md): the upstream link
feeds a bounded frame channel; the router turns each frame into per-client
queues without waiting on any client; a grace task expires unsubscribes; the
accept loop runs one nursery per client. ``task_status.started`` hands the
running :class:`Tier` to the caller (tests read its port, link and hub).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import os
import secrets
import signal
import threading
import time
from typing import Callable

import attrs
import trio

from prometheus_client import CollectorRegistry

from ..core import markets, protocol
from ..core.errors import ConfigError
from ..core.journal import Journal
from ..core.outbox import SlowClientPolicy
from ..core.routing import FrameError, route_frame
from ..core.session import CHANNELS_PER_STEP
from ..core.routes import Route
from ..core.settings import TierConfig, TierKind
from ..core.shards import ChannelShards
from ..core.journal import format_ns
from ..core.replay import RELAYED_STATUSES, UPSTREAM_CONNECTED, UPSTREAM_DISCONNECTED, relayed_status_frame
from ..core.resume import LinkResume, ResumeOutcome
from ..core.stats import JournalFigures, TierHistory, TierSnapshot, TierStats
from ..core.subscriptions import SubscriptionRegistry
from ..net.allocator import hold_freed_memory, return_free_memory
from ..net.http import serve_http
from ..net.journal_store import journal_lineage
from ..net.accepting import PendingConnections
from ..net.journal_writer import JournalWriter
from ..net.replay import JournalSource
from ..net.server import ClientSession, Hub, serve_clients
from ..net.upstream import NOT_CONNECTED_YET, FrameBatch, LinkState, UpstreamLink
from .admin import make_handler
from .config import bind_error, check_market_url, connections_variable, read_key_file
from .exposition import TierCollector

__all__ = [
    "log_start_up",
    "FRAME_QUEUE",
    "SUMMARY_INTERVAL_SECONDS",
    "TRIM_AFTER_CHANNELS",
    "UPSTREAM_DISCONNECTED",
    "UPSTREAM_CONNECTED",
    "RELAYED_STATUSES",
    "Tier",
    "run_tier",
]

log = logging.getLogger(__name__)
#: How a tier says its upstream refused it (not entitled, the key's connection in use): a downstream
#: tier that reads these words in a relayed status counts the market as refused, not as down.
REFUSED_WORDS = "refused us"
#: Batches the link may queue for the router (each is what one upstream read completed, at most
#: about 256 KiB unless one message is bigger): past them the link stops reading, and TCP pushes
#: back on upstream.
FRAME_QUEUE = 32
SUMMARY_INTERVAL_SECONDS = 60.0
#: Channels expired from the grace period between two returns of freed memory to the system.
TRIM_AFTER_CHANNELS = 100_000


@attrs.define(eq=False)
class Tier:
    """A running tier's parts, handed to whoever started it (tests read its ports, link and hub)."""
    config: TierConfig
    registry: SubscriptionRegistry[ClientSession]
    hub: Hub
    link: UpstreamLink
    stats: TierStats
    metrics: CollectorRegistry
    history: TierHistory = attrs.field(factory=TierHistory)
    port: int = 0
    metrics_port: int = 0
    #: The journal (docs/journal.md) and what serves replays from it; None when the tier keeps
    #: none (JOURNAL_MEMORY_SECONDS=0 and no JOURNAL_DIR): then the router pays nothing for it.
    journal: Journal | None = None
    journal_source: JournalSource | None = None
    #: Batches (the frames of one upstream read) the router has taken from the link(s) so far,
    #: and what waits to be told to clients once the router has taken a given count
    #: (:func:`_route_frames`): an outage status goes to clients after the frames the link read
    #: before it, as it happened.
    batches_routed: int = 0
    notices: collections.deque[tuple[int, Callable[[], None]]] = attrs.field(factory=collections.deque)
    #: The market of the feed this part serves (its path: ``stocks``, ``delayed/stocks``).
    route: Route = Route("stocks")
    #: The last ``upstream_disconnected`` an upstream tier of ours relayed about its own upstream,
    #: until its ``upstream_connected``: a filtered proxy's link is up, but the firehose's market is not.
    upstream_reports: dict | None = None
    #: Every route's part of this tier by path, this one included, the first one (also served
    #: at ``/``) first; they share the client port, the metrics port and the key file.
    markets: dict[str, "Tier"] = attrs.field(factory=dict)
    #: The upstream links beyond ``link`` where the market's channels are spread over several
    #: connections (POLYGON_CONNECTIONS_<MARKET>).
    more_links: list[UpstreamLink] = attrs.field(factory=list)

    @property
    def links(self) -> list[UpstreamLink]:
        """This route's upstream links: ``link``, then any more the market's connections allow."""
        return [self.link, *self.more_links]

    @property
    def parts(self) -> list["Tier"]:
        """Every route's part of the tier (just this one when it serves one market)."""
        return list(self.markets.values()) or [self]

    def snapshot(self) -> TierSnapshot:
        """The tier's figures now, for the exposition and anything else that reports on it."""
        hub, registry = self.hub, self.registry
        return TierSnapshot(
            tier=self.config.tier,
            stats=self.stats,
            clients_connected=len(hub.sessions),
            client_channels=sum(registry.count_of(session) for session in hub.sessions),
            upstream_channels=registry.upstream_count + len(self.config.upstream_extra),
            dropped_drop_oldest=hub.dropped(SlowClientPolicy.DROP_OLDEST),
            dropped_slow_consumer=hub.dropped(SlowClientPolicy.DISCONNECT),
            upstream_connected=all(link.state is LinkState.CONNECTED for link in self.links),
            upstream_reconnects=sum(link.reconnects for link in self.links),
            keys=hub.key_totals(),
            journal=None if self.journal_source is None else self.journal_source.figures(),
            market=self.route.path,
            upstream_refused=any(link.state is LinkState.REFUSED for link in self.links),
            upstream_evictions=sum(link.evictions for link in self.links),
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready while every market's upstream is connected and authenticated, else why not.

        A market whose upstream refused us (not entitled, say) is reported but does not hold
        the others back: the tier is ready while at least one market is connected and every
        other one is either connected or refused."""
        states = [(part, link) for part in self.parts for link in part.links]
        connected = refused = 0
        lines = []
        for part, link in states:
            where = f"{part.route.label}: " if len(states) > 1 else ""
            reported = part.upstream_reports
            if link.state is LinkState.CONNECTED and reported is None:
                connected += 1
                lines.append(f"{where}{link.label} connected")
            elif link.state is LinkState.CONNECTED and reported is not None:
                # our link is up; the upstream tier's is not (refused, in its words, or down)
                message = str(reported.get("message", ""))
                refused += REFUSED_WORDS in message
                lines.append(f"{where}{link.label} connected, and reports: {message}")
            else:
                refused += link.state is LinkState.REFUSED
                lines.append(f"{where}{link.label} {link.state.value} ({link.last_error})")
        ready = connected > 0 and connected + refused == len(states)
        return ready, ("ready: " if ready else "not ready: ") + "; ".join(lines)


def _upstream_label(config: TierConfig, route: Route) -> str:
    """How log lines and statuses name the upstream: ``Polygon``, or ``Polygon options`` (and
    ``Polygon stocks (delayed)``) where a tier serves several markets."""
    label = "Polygon" if config.tier is TierKind.FIREHOSE else "firehose proxy"
    return label if len(config.routes) == 1 else f"{label} {route.label}"


def _within_market_rules(config: TierConfig) -> TierConfig:
    """``config`` without the static channels (FIREHOSE_SUBSCRIPTIONS, held in every market) that
    Polygon refuses in this market (options ``Q.*``); each one left out is logged once."""
    screened = markets.screen(markets.market(config.market), frozenset(), config.static_channels,
                              caps=config.market_caps(config.market))
    for channel, reason in screened.refused:
        log.warning("%s: FIREHOSE_SUBSCRIPTIONS' %s is not held in this market: %s", config.market, channel.text, reason)
    return config if not screened.refused else attrs.evolve(config, static_channels=screened.allowed)


def _spread_over_links(tier: Tier, connections: int) -> None:
    """Give the market ``connections`` upstream links, its channels spread over them within each
    connection's caps (:class:`~proxy.core.shards.ChannelShards`): more links like the first."""
    config, registry, link = tier.config, tier.registry, tier.link
    caps = config.connection_caps(config.market)
    shards = ChannelShards(connections, caps, take_changes=registry.take_upstream_changes,
                           held=registry.held_upstream)

    def share(index: int) -> UpstreamLink:
        label = f"{link.label} (connection {index + 1} of {connections})"
        return attrs.evolve(
            link, label=label, desired=lambda: frozenset(shards.held_by(index)),
            changes=lambda: shards.changes_for(index), held=lambda: shards.held_by(index),
            extra=link.extra if index == 0 else ())

    links = [share(index) for index in range(connections)]
    tier.link, tier.more_links = links[0], links[1:]
    log.info("%s: channels spread over %d upstream connections (%s); caps per "
             "connection: %s", config.market, connections, connections_variable(config.market),
             ", ".join(f"{code} {cap:,}" for code, cap in caps.items()) or "none known")


def log_start_up(log: logging.Logger, config: TierConfig, title: str, url_setting: str) -> None:
    """The lines an operator reads first: what runs, its upstream, its market (warned when the
    upstream URL names another), its port."""
    log.info("Starting %s", title)
    routes = config.routes
    if len(routes) == 1:
        log.info("%s: %s", url_setting, config.upstream_url)
        log.info("Market: %s (clients connect at / and /%s)", config.market, config.market)
        mismatch = check_market_url(config.market, config.upstream_url, url_setting)
        if mismatch:
            log.warning("%s", mismatch)
    else:
        for route in routes:
            connections = config.connections_for_route(route) if config.tier is TierKind.FIREHOSE else 1
            log.info("Market %s at /%s%s: upstream %s%s", route.label, route.path,
                     " (and /)" if route == routes[0] else "", config.upstream_url_for(route),
                     f" ({connections} connections)" if connections > 1 else "")
    log.info("Listening port: %d", config.port)


async def run_tier(
    config: TierConfig, *, task_status: trio.TaskStatus[Tier] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one tier until cancelled: a part per market and feed it serves (each with its upstream
    link, router, grace timer and journal), one client port for them all (each market at its
    path), one metrics port, one key file.

    Reports the running :class:`Tier` of the first market (the one also served at ``/``)
    through ``task_status`` once it listens; every part is in its ``markets``.
    Raises ConfigError when a port cannot be opened (named by its variable)."""
    hold_freed_memory()  # reads, frames and blocks reuse their pages instead of faulting new ones in
    routes = config.routes
    metrics = CollectorRegistry()
    pending = PendingConnections()
    session_ids = itertools.count(1)  # one numbering for the clients of every market (/clients)
    async with trio.open_nursery() as nursery:
        parts: dict[str, Tier] = {}
        for route in routes:
            parts[route.path] = await nursery.start(
                _run_route, config.for_route(route), route, metrics, pending, session_ids)
        for part in parts.values():
            part.markets = parts
        tier = parts[routes[0].path]
        metrics.register(TierCollector(lambda: [part.snapshot() for part in parts.values()]))
        nursery.start_soon(_reload_keys, tier, config.api_keys_file)
        try:
            port = await nursery.start(serve_clients, {route: parts[route.path].hub for route in routes})
        except OSError as error:
            raise bind_error(config.port_setting, config.host, config.port, error) from None
        log.info("Listening for clients on ws://%s:%d (%s)", config.host, port,
                 ", ".join(f"/{route.path}" for route in routes))
        metrics_port = 0
        if config.metrics_port is not None:
            try:
                metrics_port = await nursery.start(
                    functools.partial(serve_http, name=config.tier, pending=pending),
                    config.metrics_host or config.host, config.metrics_port, make_handler(tier, metrics),
                )
            except OSError as error:
                raise bind_error(config.metrics_port_setting, config.host, config.metrics_port, error) from None
        for part in parts.values():
            part.port, part.metrics_port = port, metrics_port
        task_status.started(tier)


async def _run_route(
    config: TierConfig, route: Route, metrics: CollectorRegistry, pending: PendingConnections,
    session_ids: itertools.count, *, task_status: trio.TaskStatus[Tier] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One route's part of the tier (``config`` is the route's own, :meth:`TierConfig.for_route`):
    its registry, hub, journal, upstream link(s), router and timers; reports its :class:`Tier`."""
    config = _within_market_rules(config)
    registry: SubscriptionRegistry[ClientSession] = SubscriptionRegistry(
        clock=trio.current_time,
        grace_seconds=config.unsubscribe_grace_seconds,
        static=config.static_channels,
    )
    stats = TierStats()
    hub = Hub(config=config, registry=registry, stats=stats, key_book=config.key_book, pending=pending,
              ids=session_ids)
    frames_send, frames_receive = trio.open_memory_channel[FrameBatch](FRAME_QUEUE)
    label = _upstream_label(config, route)

    history = TierHistory()
    outage_started: list[float] = []  # when the current outage began, if one is going on
    connections: list[float] = []  # when the link connected; no client hears of the first one
    journal: Journal | None = None  # made below, once the disk writer (if any) has recovered

    def tell_clients(status: str, message: str) -> None:
        """Broadcast an outage status, journaled first (a replay shows it where it happened), once
        the router has routed the frames the link read before it (they are older news)."""

        def tell() -> None:
            seq = None
            if journal is not None:
                now_ns = time.time_ns()
                record = (journal.upstream_restored if status == UPSTREAM_CONNECTED else journal.upstream_lost)(
                    message, now_ns)
                seq = record.seq
            hub.broadcast(protocol.status_frame(status, message), seq)

        waiting = frames_receive.statistics().current_buffer_used
        if waiting or tier.notices:
            tier.notices.append((tier.batches_routed + waiting, tell))
        else:
            tell()

    #: True while an outage's end waits for the link's resume by the firehose's journal: told
    #: once the resume says whether the outage cost the clients anything (:func:`resumed`).
    resuming = False

    def end_outage(logged: str, told: str) -> None:
        """The outage going on is over: counted, kept in the history, logged and told to the
        clients with its length and what it cost (``logged``, ``told``)."""
        seconds = trio.current_time() - outage_started.pop()
        stats.outage_seconds += seconds
        history.outage_ended(seconds)
        log.warning("%s connection restored after a %.1fs outage; %s", label, seconds, logged)
        tell_clients(UPSTREAM_CONNECTED, f"{label} connection restored after {seconds:.1f}s; {told}")

    def connected() -> None:
        nonlocal resuming
        connections.append(trio.current_time())
        if len(connections) == 1:
            # Not a recovery; but any client already here was told the upstream was down.
            tell_clients(UPSTREAM_CONNECTED, f"{label} connected")
            return
        if outage_started and link.resume is not None and link.resume.position is not None:
            # This connection asks the firehose for what the link missed: the clients hear of the
            # end of the outage when it says whether that worked (resumed).
            resuming = True
            return
        if outage_started:
            end_outage("events sent upstream in that window are lost (Polygon has no replay)",
                       "events of that window are lost")
        else:
            tell_clients(UPSTREAM_CONNECTED, f"{label} connection restored")

    def upstream_notice() -> str | None:
        """What a client that authenticates now is told, when the upstream is not connected (or
        is, and the upstream tier reported that its own upstream is not)."""
        if link.state is LinkState.CONNECTED:
            reported = tier.upstream_reports
            return None if reported is None else relayed_status_frame(reported)
        if link.state is LinkState.REFUSED:
            # not a blip: upstream said no, and the link asks again only after the long backoff
            return protocol.status_frame(UPSTREAM_DISCONNECTED, (
                f"{label} {REFUSED_WORDS} ({link.last_error}); asking again every "
                f"{config.backoff.refused_seconds:g}s; your subscriptions are kept, and "
                "upstream_connected follows if it accepts"))
        if not connections:
            situation = f"{label} not connected yet"
            if link.last_error != NOT_CONNECTED_YET:
                situation += f" ({link.last_error})"
        else:
            situation = f"{label} connection lost ({link.last_error})"
        return protocol.status_frame(
            UPSTREAM_DISCONNECTED,
            f"{situation}; your subscriptions are kept, and upstream_connected follows when it is up",
        )

    def resumed(outcome: ResumeOutcome) -> None:
        """The link's resume ended: the outage is over, and cost the clients nothing, or not."""
        nonlocal resuming
        if not resuming or not outage_started:
            return
        resuming = False
        if outcome.complete:
            end_outage(f"resumed from seq {outcome.asked.from_seq} of the firehose's journal "
                       f"{outcome.asked.journal}: no events were lost",
                       "resumed from the firehose's journal: no events were lost")
        else:
            why = "; ".join(outcome.lost)
            lost = f"the firehose's journal could not resume all of it ({why}): events of that window are lost"
            end_outage(lost, lost)

    def disconnected(reason: str) -> None:
        nonlocal resuming
        tier.upstream_reports = None  # the upstream tier says again at the next auth, if it still holds
        if resuming:
            # Lost again before the resume ended: the clients have not heard the outage was over,
            # so it goes on (the next connection resumes from the last mark read).
            resuming = False
            log.warning("lost the %s connection again while resuming (%s)", label, reason)
            return
        stats.outages += 1
        # The gap began when upstream was last heard from (a frame, or an answered ping), not
        # when the keepalive noticed it.
        now, last = trio.current_time(), link.last_heard_at
        began = now if last is None else last
        outage_started.append(began)
        history.outage_began(int((time.time() - (now - began)) * 1000), reason)
        log.warning("lost the %s connection (%s); clients stay connected", label, reason)
        if link.resume is not None:  # a link to a tier of ours: it resumes by that tier's journal
            then = ("reconnecting; the link resumes where it left off in the firehose's journal, and "
                    "upstream_connected will say whether any event was lost")
        else:
            then = "reconnecting, events in the gap are not replayed"
        tell_clients(UPSTREAM_DISCONNECTED, f"{label} connection lost ({reason}); {then}")

    link = UpstreamLink(
        label=label,
        url=config.upstream_url,
        api_key=config.upstream_api_key,
        api_key_source=config.upstream_api_key_source,
        desired=lambda: registry.upstream,
        demand_changed=hub.demand_changed,
        frames=frames_send,
        changes=registry.take_upstream_changes,
        held=registry.held_upstream,
        extra=config.upstream_extra,
        # A filtered tier's upstream is a tier of ours: it says it carries many clients' demand.
        role=protocol.PROXY_ROLE if config.tier is not TierKind.FIREHOSE else None,
        on_connected=connected,
        on_disconnected=disconnected,
        on_refused=hub.refuse,
        # ... and it resumes by the firehose's journal seq after an outage between the tiers
        resume=LinkResume() if config.tier is not TierKind.FIREHOSE else None,
        on_resumed=resumed,
        backoff=config.backoff,
        keepalive_interval=config.keepalive_interval_seconds,
        keepalive_timeout=config.keepalive_timeout_seconds,
        ca_file=config.upstream_ca_file,
        close_seconds=config.shutdown_close_seconds,
        market=route.label,
        read_interval=config.upstream_read_ms / 1000,
    )
    hub.upstream_notice = upstream_notice
    tier = Tier(config=config, registry=registry, hub=hub, link=link, stats=stats, metrics=metrics,
                history=history, route=route)
    connection_count = config.connections_for(route.market) if config.tier is TierKind.FIREHOSE else 1
    if connection_count > 1:
        _spread_over_links(tier, connection_count)
        link = tier.link  # what the callbacks above read: the first of the links
    async with trio.open_nursery() as nursery:
        journal, writer, journal_id = await _open_journal(config, nursery)
        if journal is not None:
            tier.journal = journal
            tier.journal_source = hub.journal_source = JournalSource(
                journal, writer, started_ns=time.time_ns(), replay_max_seconds=_replay_reach(config),
                journal_id=journal_id)
        for each in tier.links:
            nursery.start_soon(each.run)
        nursery.start_soon(_route_frames, tier, frames_receive)
        if hub.pacer.interval > 0:
            nursery.start_soon(hub.run_flusher)
        nursery.start_soon(_expire_grace, tier)
        nursery.start_soon(_log_summary, tier)
        nursery.start_soon(_sample_rates, tier)
        task_status.started(tier)


def _replay_reach(config: TierConfig) -> float:
    """How far back a replay may ask: REPLAY_MAX_SECONDS, capped by what the journal keeps
    (its memory's seconds, or its disk's retention when that is longer)."""
    kept = config.journal_memory_seconds if config.journal_memory_bytes > 0 else 0.0
    if config.journal_dir is not None:
        kept = max(kept, math.inf if config.journal_retention_seconds is None else config.journal_retention_seconds)
    return min(config.replay_max_seconds, kept)


async def _open_journal(config: TierConfig,
                        nursery: trio.Nursery) -> tuple[Journal | None, JournalWriter | None, str]:
    """The tier's journal, or None when it keeps none (no cost on the router then).

    With ``journal_dir``, the disk writer starts in ``nursery`` first: it locks and recovers
    the directory, and the journal goes on from the seq and time recovery found. A journal
    that continues one on disk begins with an ``UPSTREAM_LOST`` record saying the tier was
    not running, so a replay across the restart shows the hole. Raises ConfigError (naming
    JOURNAL_DIR) when the directory cannot be used. The third value is the journal's id
    (:func:`~proxy.net.journal_store.journal_lineage`: kept in the directory; random for a
    journal in memory only), which downstream proxies resume by.
    """
    memory = config.journal_memory_seconds > 0 and config.journal_memory_bytes > 0
    if not memory and config.journal_dir is None:
        return None, None, ""
    next_seq, not_before_ns, writer = 1, 0, None
    journal_id = secrets.token_hex(16)
    if config.journal_dir is not None:
        writer = JournalWriter(config.journal_dir, retention_seconds=config.journal_retention_seconds,
                               max_bytes=config.journal_max_bytes)
        recovered = await nursery.start(writer.run)
        next_seq, not_before_ns = recovered.next_seq, recovered.last_ns
        try:
            journal_id = await trio.to_thread.run_sync(
                functools.partial(journal_lineage, config.journal_dir, continuing=next_seq > 1))
        except OSError as error:
            raise ConfigError("JOURNAL_DIR", f"cannot keep the journal's id in {config.journal_dir}: {error}") from None
    journal = Journal(next_seq=next_seq, not_before_ns=not_before_ns,
                      memory_seconds=config.journal_memory_seconds if memory else 0,
                      memory_bytes=config.journal_memory_bytes if memory else 0,
                      sink=None if writer is None else writer.offer)
    if next_seq > 1:
        journal.upstream_lost(f"this {config.tier} tier was not running (restarted): events received "
                              f"upstream after {format_ns(not_before_ns)} until now are not in the journal",
                              time.time_ns())
    return journal, writer, journal_id


async def _route_frames(tier: Tier, frames: trio.MemoryReceiveChannel[FrameBatch]) -> None:
    """Journal and route every upstream frame, then write to the clients; the only await is for
    the next batch (the frames one upstream read completed).

    Every batch already queued is routed before the clients are written to, so
    under load a client gets several frames' worth of events in one message:
    per-send cost is paid less often exactly when it matters (docs/architecture.md).
    A frame's receive time in ns since the epoch (the journal's) is its trio receive time
    moved onto the wall clock, with one clock reading per pass, not per frame.
    """
    journal = tier.journal
    async for batch, received_at in frames:
        offset_ns = time.time_ns() - int(trio.current_time() * 1e9) if journal is not None else 0
        _route_batch(tier, batch, received_at, offset_ns)
        while True:
            try:
                batch, received_at = frames.receive_nowait()
            except trio.WouldBlock:
                break
            _route_batch(tier, batch, received_at, offset_ns)
        tier.hub.flush()


def _route_batch(tier: Tier, batch: list[str | bytes], received_at: float, offset_ns: int) -> None:
    """Journal one read's frames, route them, then tell the clients what waited for them (outage
    statuses, in order)."""
    journal = tier.journal
    if journal is None:
        for frame in batch:
            _route_one(tier, frame, received_at, None)
    else:
        # Journaled as received, before routing and whatever routing makes of them: a replay must
        # see what live clients saw, in the same order, malformed frames included. The whole read
        # at once (they share their receive time): per frame, that is a few list operations in C.
        seq = journal.frames(batch, int(received_at * 1e9) + offset_ns)
        for frame in batch:
            _route_one(tier, frame, received_at, seq)
            seq += 1
    tier.batches_routed += 1
    notices = tier.notices
    while notices and notices[0][0] <= tier.batches_routed:
        notices.popleft()[1]()


def _route_one(tier: Tier, frame: str | bytes, received_at: float, seq: int | None) -> None:
    """Route one frame (journaled under ``seq``, when there is a journal) to the clients."""
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
    tier.hub.deliver(routed, received_at, seq)
    for status in routed.statuses:
        _handle_upstream_status(tier, status, seq)


def _handle_upstream_status(tier: Tier, status: dict, seq: int | None = None) -> None:
    kind = status.get("status")
    if kind in RELAYED_STATUSES:
        log.warning("upstream reports %s: %s", kind, status.get("message"))
        # kept for clients that connect later and for /readyz: our link is up, but the upstream
        # tier's own upstream is not
        tier.upstream_reports = status if kind == UPSTREAM_DISCONNECTED else None
        tier.hub.broadcast(relayed_status_frame(status), seq)
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
    """Hand the memory freed by the expired channels back to the system (a seam for tests)."""
    return_free_memory()


#: How often the key file's modification time is checked (SIGHUP reloads at once).
KEY_FILE_POLL_SECONDS = 2.0


async def _reload_keys(tier: Tier, path: str | None, poll_seconds: float = KEY_FILE_POLL_SECONDS) -> None:
    """Re-read API_KEYS_FILE on SIGHUP and whenever it changes; a bad file keeps the old keys.

    SIGHUP is taken even without a key file (``systemctl reload`` must never stop a tier).
    One process, one tier: SIGHUP goes to the receiver opened last, so only the tier a
    process runs (as trio-run does) hears it; a change of the file is seen by any tier.
    Signals reach only the main thread: a tier run in another thread (a test) only polls.
    """

    def stamp() -> tuple[int, int] | None:
        try:
            status = os.stat(path) if path else None
        except OSError:
            return None
        return None if status is None else (status.st_mtime_ns, status.st_size)

    in_main_thread = threading.current_thread() is threading.main_thread()
    last = stamp()
    with (trio.open_signal_receiver(signal.SIGHUP) if in_main_thread else contextlib.nullcontext()) as hangups:
        while True:
            hangup = False
            with trio.move_on_after(poll_seconds if path else math.inf):
                if hangups is None:
                    await trio.sleep_forever()
                async for _ in hangups:
                    hangup = True
                    break
            if path is None:
                log.info("SIGHUP: no API_KEYS_FILE is set, so there is nothing to re-read")
                continue
            now = stamp()
            if not hangup and now == last:
                continue
            last = now
            log.info("re-reading the key file %s (%s)", path, "SIGHUP" if hangup else "it changed")
            try:
                book = read_key_file(path)
            except ConfigError as error:
                log.error("key file not reloaded, the old keys stay in force: %s", error)
                continue
            for part in tier.parts:
                part.hub.reload_keys(book)
            log.info("key file reloaded: %d named keys (%s)", len(book), ", ".join(book.names()) or "none")


async def _sample_rates(tier: Tier, interval: float = 1.0) -> None:
    """Once a second, the events in and out, for the status page's chart (the last ten minutes)."""
    while True:
        tier.history.sample(int(time.time() * 1000), tier.stats.events_in, tier.stats.events_out)
        await trio.sleep(interval)


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
