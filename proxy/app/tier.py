"""One proxy tier, as one nursery tree: upstream link → router → client sessions.

Both the firehose and the filtered proxy are :func:`run_tier` with a different
:class:`~proxy.core.settings.TierConfig`. The tree (docs/architecture.md): the upstream link
feeds a bounded frame channel; the router turns each frame into per-client
queues without waiting on any client; a grace task expires unsubscribes; the
accept loop runs one nursery per client. ``task_status.started`` hands the
running :class:`Tier` to the caller (tests read its port, link and hub).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import signal
import threading
import time
from typing import Callable

import attrs
import trio

from prometheus_client import CollectorRegistry

from ..core import protocol
from ..core.errors import ConfigError
from ..core.journal import Journal
from ..core.outbox import SlowClientPolicy
from ..core.routing import FrameError, route_frame
from ..core.session import CHANNELS_PER_STEP
from ..core.settings import TierConfig, TierKind
from ..core.journal import format_ns
from ..core.replay import RELAYED_STATUSES, UPSTREAM_CONNECTED, UPSTREAM_DISCONNECTED, relayed_status_frame
from ..core.stats import JournalFigures, TierHistory, TierSnapshot, TierStats
from ..core.subscriptions import SubscriptionRegistry
from ..net.http import serve_http
from ..net.journal_writer import JournalWriter
from ..net.replay import JournalSource
from ..net.server import ClientSession, Hub, serve_clients
from ..net.upstream import NOT_CONNECTED_YET, FrameBatch, LinkState, UpstreamLink
from .admin import make_handler
from .config import bind_error, check_market_url, read_key_file
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
            upstream_connected=self.link.state is LinkState.CONNECTED,
            upstream_reconnects=self.link.reconnects,
            keys=hub.key_totals(),
            journal=None if self.journal_source is None else self.journal_source.figures(),
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready only while the upstream is connected and authenticated; else why not."""
        if self.link.state is LinkState.CONNECTED:
            return True, f"ready: {self.link.label} connected"
        return False, f"not ready: {self.link.label} {self.link.state.value} ({self.link.last_error})"


def _upstream_label(config: TierConfig) -> str:
    return "Polygon" if config.tier is TierKind.FIREHOSE else "firehose proxy"


def log_start_up(log: logging.Logger, config: TierConfig, title: str, url_setting: str) -> None:
    """The lines an operator reads first: what runs, its upstream, its market (warned when the
    upstream URL names another), its port."""
    log.info("Starting %s", title)
    log.info("%s: %s", url_setting, config.upstream_url)
    log.info("Market: %s (clients connect at / and /%s)", config.market, config.market)
    mismatch = check_market_url(config.market, config.upstream_url, url_setting)
    if mismatch:
        log.warning("%s", mismatch)
    log.info("Listening port: %d", config.port)


async def run_tier(
    config: TierConfig, *, task_status: trio.TaskStatus[Tier] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one tier until cancelled: its upstream link, router, grace timer, summary and servers.

    Reports the running :class:`Tier` through ``task_status`` once it listens.
    Raises ConfigError when a port cannot be opened (named by its variable)."""
    registry: SubscriptionRegistry[ClientSession] = SubscriptionRegistry(
        clock=trio.current_time,
        grace_seconds=config.unsubscribe_grace_seconds,
        static=config.static_channels,
    )
    stats = TierStats()
    metrics = CollectorRegistry()
    hub = Hub(config=config, registry=registry, stats=stats, key_book=config.key_book)
    frames_send, frames_receive = trio.open_memory_channel[FrameBatch](FRAME_QUEUE)
    label = _upstream_label(config)

    history = TierHistory()
    outage_started: list[float] = []  # when the current outage began, if one is going on
    connections: list[float] = []  # when the link connected; no client hears of the first one
    journal: Journal | None = None  # made below, once the disk writer (if any) has recovered

    def tell_clients(status: str, message: str) -> None:
        """Broadcast an outage status, journaled first (a replay shows it where it happened)."""
        seq = None
        if journal is not None:
            now_ns = time.time_ns()
            record = (journal.upstream_restored if status == UPSTREAM_CONNECTED else journal.upstream_lost)(
                message, now_ns)
            seq = record.seq
        hub.broadcast(protocol.status_frame(status, message), seq)

    def connected() -> None:
        connections.append(trio.current_time())
        if len(connections) == 1:
            # Not a recovery; but any client already here was told the upstream was down.
            tell_clients(UPSTREAM_CONNECTED, f"{label} connected")
            return
        if outage_started:
            seconds = trio.current_time() - outage_started.pop()
            stats.outage_seconds += seconds
            history.outage_ended(seconds)
            log.warning("%s connection restored after a %.1fs outage; events sent upstream in that "
                        "window are lost (Polygon has no replay)", label, seconds)
            message = f"{label} connection restored after {seconds:.1f}s; events of that window are lost"
        else:
            message = f"{label} connection restored"
        tell_clients(UPSTREAM_CONNECTED, message)

    def upstream_notice() -> str | None:
        """What a client that authenticates now is told, when the upstream is not connected."""
        if link.state is LinkState.CONNECTED:
            return None
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

    def disconnected(reason: str) -> None:
        stats.outages += 1
        # The gap began with the last frame the link read, not when the keepalive noticed it.
        now, last = trio.current_time(), link.last_received_at
        began = now if last is None else last
        outage_started.append(began)
        history.outage_began(int((time.time() - (now - began)) * 1000), reason)
        log.warning("lost the %s connection (%s); clients stay connected", label, reason)
        tell_clients(UPSTREAM_DISCONNECTED,
                     f"{label} connection lost ({reason}); reconnecting, events in the gap are not replayed")

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
        backoff=config.backoff,
        keepalive_interval=config.keepalive_interval_seconds,
        keepalive_timeout=config.keepalive_timeout_seconds,
        ca_file=config.upstream_ca_file,
        close_seconds=config.shutdown_close_seconds,
    )
    hub.upstream_notice = upstream_notice
    tier = Tier(config=config, registry=registry, hub=hub, link=link, stats=stats, metrics=metrics,
                history=history)
    metrics.register(TierCollector(tier.snapshot))
    async with trio.open_nursery() as nursery:
        journal, writer = await _open_journal(config, nursery)
        if journal is not None:
            tier.journal = journal
            tier.journal_source = hub.journal_source = JournalSource(
                journal, writer, started_ns=time.time_ns(), replay_max_seconds=_replay_reach(config))
        nursery.start_soon(link.run)
        nursery.start_soon(_route_frames, tier, frames_receive)
        if hub.pacer.interval > 0:
            nursery.start_soon(hub.run_flusher)
        nursery.start_soon(_expire_grace, tier)
        nursery.start_soon(_log_summary, tier)
        nursery.start_soon(_sample_rates, tier)
        nursery.start_soon(_reload_keys, tier, config.api_keys_file)
        try:
            tier.port = await nursery.start(serve_clients, hub)
        except OSError as error:
            raise bind_error(config.port_setting, config.host, config.port, error) from None
        log.info("Listening for clients on ws://%s:%d", config.host, tier.port)
        if config.metrics_port is not None:
            try:
                tier.metrics_port = await nursery.start(
                    functools.partial(serve_http, name=config.tier, pending=hub.pending),
                    config.metrics_host or config.host, config.metrics_port, make_handler(tier, metrics),
                )
            except OSError as error:
                raise bind_error(config.metrics_port_setting, config.host, config.metrics_port, error) from None
        task_status.started(tier)


def _replay_reach(config: TierConfig) -> float:
    """How far back a replay may ask: REPLAY_MAX_SECONDS, capped by what the journal keeps
    (its memory's seconds, or its disk's retention when that is longer)."""
    kept = config.journal_memory_seconds if config.journal_memory_bytes > 0 else 0.0
    if config.journal_dir is not None:
        kept = max(kept, math.inf if config.journal_retention_seconds is None else config.journal_retention_seconds)
    return min(config.replay_max_seconds, kept)


async def _open_journal(config: TierConfig, nursery: trio.Nursery) -> tuple[Journal | None, JournalWriter | None]:
    """The tier's journal, or None when it keeps none (no cost on the router then).

    With ``journal_dir``, the disk writer starts in ``nursery`` first: it locks and recovers
    the directory, and the journal goes on from the seq and time recovery found. A journal
    that continues one on disk begins with an ``UPSTREAM_LOST`` record saying the tier was
    not running, so a replay across the restart shows the hole. Raises ConfigError (naming
    JOURNAL_DIR) when the directory cannot be used.
    """
    memory = config.journal_memory_seconds > 0 and config.journal_memory_bytes > 0
    if not memory and config.journal_dir is None:
        return None, None
    next_seq, not_before_ns, writer = 1, 0, None
    if config.journal_dir is not None:
        writer = JournalWriter(config.journal_dir, retention_seconds=config.journal_retention_seconds,
                               max_bytes=config.journal_max_bytes)
        recovered = await nursery.start(writer.run)
        next_seq, not_before_ns = recovered.next_seq, recovered.last_ns
    journal = Journal(next_seq=next_seq, not_before_ns=not_before_ns,
                      memory_seconds=config.journal_memory_seconds if memory else 0,
                      memory_bytes=config.journal_memory_bytes if memory else 0,
                      sink=None if writer is None else writer.offer)
    if next_seq > 1:
        journal.upstream_lost(f"this {config.tier} tier was not running (restarted): events received "
                              f"upstream after {format_ns(not_before_ns)} until now are not in the journal",
                              time.time_ns())
    return journal, writer


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
        for frame in batch:
            _route_one(tier, frame, received_at, offset_ns)
        while True:
            try:
                batch, received_at = frames.receive_nowait()
            except trio.WouldBlock:
                break
            for frame in batch:
                _route_one(tier, frame, received_at, offset_ns)
        tier.hub.flush()


def _route_one(tier: Tier, frame: str | bytes, received_at: float, offset_ns: int = 0) -> None:
    stats = tier.stats
    stats.bytes_in += len(frame)
    journal = tier.journal
    # Journaled as received, before routing and whatever routing makes of it: a replay
    # must see what live clients saw, in the same order, malformed frames included.
    seq = None if journal is None else journal.frame(frame, int(received_at * 1e9) + offset_ns).seq
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
    """Ask glibc to return the free memory inside its heap to the system (about 8 ms).

    After 100 clients with 10,000 channels each left, the registry had freed its objects and
    rebuilt its tables, yet the process stayed at 158 MB resident (366 MB at the peak, 34
    before): glibc keeps freed blocks inside its heap for reuse. malloc_trim brought it to
    50 MB (bench/subscribe_cost.py --rss). Without malloc_trim (not glibc), nothing is done.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


_malloc_trim = _find_malloc_trim()


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
            tier.hub.reload_keys(book)
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
