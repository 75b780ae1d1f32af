"""The upstream link: one connection to Polygon (firehose) or to a firehose (filtered proxy).

:class:`UpstreamLink` connects, reads ``connected``, authenticates, subscribes
the current demand in chunks and keeps it in step by comparing, channel by
changed channel, what this connection has been sent with what the registry
wants, so a reconnect re-subscribes everything by construction. Subscribes are
paced under the budget of the tier above and bursts of changes are merged
(:mod:`proxy.core.upstream_control`): the link carries the union of many clients'
demand, and one client churning channels must not get it refused or closed.
Upstream's answers are matched with what was sent; a refusal is handed to the
tier (``on_refused``), which tells the clients holding those channels.
The link reads its WebSocket itself (:mod:`proxy.net.upstream_socket`, websockets'
sans-I/O protocol on the Trio stream): each wake-up is one read, and every frame it completed goes
to the router as one batch, one channel operation however many frames a read
holds. The channel is bounded: when the router lags, reading stops and TCP
pushes back. Any failure reconnects with exponential backoff and jitter; a refusal (``auth_failed``, ``max_connections``, also when
upstream evicts an established connection with ``max_connections``) waits the
long ``refused_seconds``: two processes sharing a key must not evict each other
in a loop. A WebSocket ping notices a silent upstream. A link to a tier of ours
resumes by that tier's journal seq after an outage (``resume``, :mod:`proxy.core.resume`):
its marks and the resume's statuses are taken out of the stream here.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import random
import ssl
from typing import AbstractSet, Any, Callable, Iterable
from urllib.parse import urlsplit

import attrs
import msgspec
import trio

from ..core import protocol
from ..core.backoff import Backoff
from ..core.keys import redact
from ..core.errors import UpstreamProtocolError, UpstreamRefused, leaves
from ..core.protocol import Channel
from .beacon import Beacon
from ..core.resume import LinkResume, ResumeOutcome
from ..core.routing import may_hold_status
from .upstream_socket import MAX_MESSAGE_BYTES, RECEIVE_BYTES, UpgradeRefused, UpstreamClosed, UpstreamSocket
from ..core.upstream_control import SUBSCRIBE_CHUNK, PendingAnswers, SubscriptionPlan, TokenBucket

__all__ = [
    "SUBSCRIBE_CHUNK",
    "NOT_CONNECTED_YET",
    "HANDSHAKE_SECONDS",
    "SUBSCRIBE_MESSAGES_PER_SECOND",
    "SUBSCRIBE_BURST",
    "SETTLE_SECONDS",
    "CLASSIFY_STEP",
    "EVICTIONS",
    "FrameBatch",
    "LinkState",
    "UpstreamRefused",
    "UpstreamProtocolError",
    "chunks",
    "UpstreamLink",
]

log = logging.getLogger(__name__)
_jitter = random.Random()  # backoff jitter; not the global generator, which others may seed
NOT_CONNECTED_YET = "not connected yet"
HANDSHAKE_SECONDS = 10.0
#: Subscribe messages a second (bursts of SUBSCRIBE_BURST): 50,000 channels a second, a tenth of
#: what a tier grants a downstream proxy by default (DOWNSTREAM_PROXY_CONTROL_MESSAGES_PER_SECOND).
SUBSCRIBE_MESSAGES_PER_SECOND = 100.0
SUBSCRIBE_BURST = 20.0
#: After sending, changes are gathered this long before the next batch: a burst of demand changes
#: goes out merged, while a lone change (nothing sent just before) goes out at once.
SETTLE_SECONDS = 0.05
#: Changed channels looked at between two checkpoints (a reconnect may bring a million).
CLASSIFY_STEP = 2000
#: A read after the read interval that returns within this long found frames already waiting.
READ_AT_ONCE_SECONDS = 0.002
#: Statuses by which upstream ends an established connection that we must not rush back to.
EVICTIONS = frozenset({"max_connections"})
#: What the link hands the router per wake-up: every frame one read completed, in order, and
#: when that read returned (trio time).
FrameBatch = tuple[list[str | bytes], float]
_read_statuses = msgspec.json.Decoder(list[dict[str, Any]]).decode


class LinkState(enum.Enum):
    """Where the upstream link is; only CONNECTED means data flows."""
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"  # authenticated and subscribed: data flows
    REFUSED = "refused"  # auth_failed or max_connections: waiting the long backoff


def chunks(channels: Iterable[Channel], size: int = SUBSCRIBE_CHUNK) -> list[list[Channel]]:
    """Channels sorted and cut into subscribe-sized lists (``size`` each at most)."""
    ordered = sorted(channels, key=lambda channel: (channel.ev_type, channel.symbol))
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


@attrs.define(eq=False)
class UpstreamLink:
    """The one connection upstream, kept up forever: connect, authenticate, subscribe, relay frames.

    Frames go to ``frames`` in batches, a read's worth with its receive time; ``desired()`` is
    the channel set to hold, and ``changes()`` the channels whose membership changed, read whenever
    ``demand_changed`` pulses; subscribes are paced and merged (:mod:`proxy.core.upstream_control`);
    ``on_connected`` and ``on_disconnected`` tell the tier about outages, ``on_refused`` about
    channels upstream refused. :meth:`run` returns only by cancellation."""
    label: str  # "Polygon" or "firehose proxy", for log lines
    url: str
    api_key: str
    #: The setting the key came from: a refusal names it (never the key itself).
    api_key_source: str = attrs.field(default="POLYGON_API_KEY", kw_only=True)
    desired: Callable[[], frozenset[Channel]]
    demand_changed: Beacon
    frames: trio.MemorySendChannel[FrameBatch]
    #: Channels whose upstream membership changed since the last call (the registry keeps them).
    changes: Callable[[], Iterable[Channel]] = lambda: ()
    #: The set of channels the registry wants held upstream now (read, never changed).
    held: Callable[[], AbstractSet[Channel]] = frozenset
    extra: tuple[Channel, ...] = ()
    #: The ``role`` sent with auth: ``proxy`` when upstream is a tier of ours (never to Polygon).
    role: str | None = None
    on_connected: Callable[[], None] = lambda: None
    on_disconnected: Callable[[str], None] = lambda reason: None
    #: Upstream refused these channels (its words): the tier tells the clients holding them.
    on_refused: Callable[[tuple[Channel, ...], str], object] = lambda channels, reason: None
    #: A link to a tier of ours resumes by its journal seq (:mod:`proxy.core.resume`): the marks
    #: and resume statuses are taken out of the stream here; None (Polygon): nothing of it.
    resume: LinkResume | None = None
    #: A resume asked on a new connection ended (its replay_complete came): how it went.
    on_resumed: Callable[[ResumeOutcome], None] = lambda outcome: None
    backoff: Backoff = Backoff()
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 20.0
    ca_file: str | None = None
    close_seconds: float = 1.0
    subscribe_rate: float = SUBSCRIBE_MESSAGES_PER_SECOND
    subscribe_burst: float = SUBSCRIBE_BURST
    settle_seconds: float = SETTLE_SECONDS
    chunk: int = SUBSCRIBE_CHUNK
    state: LinkState = LinkState.DISCONNECTED
    reconnects: int = 0
    #: Failed tries since the last healthy connection; the backoff grows with it.
    failures: int = 0
    last_error: str = NOT_CONNECTED_YET
    #: Whether the current connection has delivered a frame since it authenticated.
    _carried_data: bool = False
    #: When the link last read a frame (trio time).
    last_received_at: float | None = None
    #: When upstream last showed it was there, by a frame or an answered ping (trio time): an
    #: outage starts there, not when it is noticed (a quiet market sends no frame for minutes).
    last_heard_at: float | None = None
    subscribe_messages: int = 0  # sent since start, for tests and logs
    #: The market (and feed) this link carries, for the lines that name it: ``options``, ``stocks (delayed)``.
    market: str = "stocks"
    #: Times upstream ended or refused this link because another program uses the key's connection.
    evictions: int = 0
    #: Seconds from one read to the next at the least (UPSTREAM_READ_MS): frames arriving meanwhile
    #: are read together. 0: every frame as it comes.
    read_interval: float = 0.0
    _plan: SubscriptionPlan = attrs.field(factory=SubscriptionPlan)
    _answers: PendingAnswers = attrs.field(factory=PendingAnswers)

    async def run(self) -> None:
        """Keep the link up forever; returns only by cancellation."""
        while True:
            started = trio.current_time()
            self.state = LinkState.CONNECTING
            delay: float | None = None
            try:
                await self._connect_and_serve()
                self.last_error = "upstream closed the connection"
            except (Exception, BaseExceptionGroup) as raised:
                error = _handled_cause(raised)
                self.last_error = _describe(error)
                evicted_by_close = self.state is LinkState.CONNECTED and _close_code(error) == POLICY_CLOSE
                if evicted_by_close:
                    # Polygon ends the older connection with 1008 when the key connects again elsewhere.
                    error = UpstreamRefused("max_connections", f"closed with {POLICY_CLOSE} while connected")
                if isinstance(error, UpstreamRefused):
                    delay = self.backoff.refused_seconds
                    if error.status == "auth_failed":
                        # Polygon's own words say why: a wrong key, or a plan without this market
                        said = f": {error.message}" if error.message and error.message != "None" else ""
                        self.last_error = (f"auth_failed{said} ({self.label} refused the key in "
                                           f"{self.api_key_source})")
                    if error.status == "max_connections":
                        self.evictions += 1
                    self._log_refusal(error, delay)
            was_connected = self.state is LinkState.CONNECTED  # (an eviction ends a connected link)
            self.state = LinkState.DISCONNECTED if delay is None else LinkState.REFUSED
            if was_connected:
                self.on_disconnected(self.last_error)
            lasted = trio.current_time() - started >= self.backoff.healthy_after_seconds
            if was_connected and (self._carried_data or lasted):
                self.failures = 0  # a healthy connection: the next outage starts from the short delay
            if delay is None:
                exponent = min(self.failures, 64)  # 2 ** a long outage's count would overflow a float
                ceiling = min(self.backoff.max_seconds, self.backoff.initial_seconds * 2 ** exponent)
                delay = _jitter.uniform(ceiling / 2, ceiling)
                self.failures += 1
                log.warning("%s link down (%s); reconnecting in %.2fs",
                            self.label, self.last_error, delay)
            self.reconnects += 1
            await trio.sleep(delay)

    def _log_refusal(self, refusal: UpstreamRefused, delay: float) -> None:
        if refusal.status == "auth_failed":
            log.error("%s refused our key %s from %s (%s): check that setting, and that your plan "
                      "includes this market's WebSocket; "
                      "retrying in %.0fs", self.label, redact(self.api_key), self.api_key_source, refusal, delay)
        elif refusal.status == "max_connections":
            log.error("another program is using this key's %s connection: %s answered max_connections (%s); "
                      "retrying in %.0fs, not at once, so that the two do not evict each other in a loop",
                      self.market, self.label, refusal, delay)
        else:
            log.error("%s refused authentication (%s); retrying in %.0fs", self.label, refusal, delay)

    async def _connect_and_serve(self) -> None:
        log.info("Connecting to %s at %s", self.label, self.url)
        self._plan = SubscriptionPlan(chunk=self.chunk)
        self._answers = PendingAnswers()
        self._carried_data = False
        ws: UpstreamSocket | None = None
        shutting_down = False
        try:
            with trio.fail_after(HANDSHAKE_SECONDS):
                ws = await self._open()
            await self._serve(ws)
        except BaseException as raised:
            # Only the tier's cancellation gets a Cancelled out of here: the link's own scopes end
            # in TooSlowError, and its nursery keeps the Cancelled it gave its tasks.
            shutting_down = any(isinstance(leaf, trio.Cancelled) for leaf in leaves(raised))
            raise
        finally:
            if ws is not None:
                await self._close(ws, shutting_down=shutting_down)

    async def _close(self, ws: UpstreamSocket, *, shutting_down: bool) -> None:
        """Say goodbye upstream: 1001 when the tier shuts down, else 1000; done as soon as the
        peer answers, and never longer than ``close_seconds``, whatever is being cancelled."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.close_seconds):  # cut short, aclose still closes the stream
                await ws.aclose(*((1001, "proxy shutting down") if shutting_down else (1000, "")))

    async def _open(self) -> UpstreamSocket:
        """TCP, then TLS with its handshake done here (so a bad certificate is named, not
        hidden behind a timeout), then the WebSocket opening handshake."""
        parts = urlsplit(self.url)
        hostname = parts.hostname or ""  # the configuration checked that a ws:// URL has a host
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        stream = await trio.open_tcp_stream(hostname, port)
        try:
            if secure:
                stream = trio.SSLStream(stream, ssl.create_default_context(cafile=self.ca_file),
                                        server_hostname=hostname, https_compatible=True)
                await stream.do_handshake()
            resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = hostname if parts.port is None else f"{hostname}:{parts.port}"
            ws = UpstreamSocket(stream, max_message_bytes=MAX_MESSAGE_BYTES, receive_bytes=RECEIVE_BYTES)
            await ws.open(host, resource)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return ws

    async def _serve(self, ws: UpstreamSocket) -> None:
        log.info("Connected to %s", self.label)
        with trio.fail_after(HANDSHAKE_SECONDS):
            await self._expect(ws, "connected")
            await ws.send_message(protocol.auth_message(self.api_key, self.role))
            await self._expect(ws, "auth_success")
        log.info("Authenticated successfully")
        self.last_received_at = self.last_heard_at = trio.current_time()
        self.state = LinkState.CONNECTED
        self.on_connected()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_subscribed, ws)
            nursery.start_soon(self._keepalive, ws)
            await self._read_frames(ws)

    async def _read_frames(self, ws: UpstreamSocket) -> None:
        """Hand the router each read's frames as one batch; returns only by an error.

        A frame that evicts us raises after the frames before it went to the router.

        After a read, the next waits until ``read_interval`` has passed: what upstream sends
        meanwhile waits in the kernel and comes as one batch, so a feed of one-event frames
        costs a wake-up per interval rather than one per frame (docs/performance.md). A frame
        after a quiet spell is read at once. A batch read at the end of such a wait counts as
        received when the wait began: its frames arrived somewhere in the wait, and the latency
        histogram must not hide it.
        """
        waited_from: float | None = None
        while True:
            asked = trio.current_time()
            messages = await ws.get_messages()
            self._carried_data = True
            now = received = trio.current_time()
            if waited_from is not None and now - asked <= READ_AT_ONCE_SECONDS:
                received = waited_from  # a read after the wait that returned at once: frames of the wait
            self.last_received_at = self.last_heard_at = now
            kept: list[str | bytes] = []
            for message in messages:
                if may_hold_status(message):
                    try:
                        if self._read_answers(message, received):
                            continue  # the link's own: a journal mark, a resume's status
                    except UpstreamRefused:
                        if kept:
                            await self.frames.send((kept, received))
                        raise
                kept.append(message)
            if kept:
                await self.frames.send((kept, received))
            waited_from = None
            if self.read_interval > 0:
                waited_from = trio.current_time()
                await trio.sleep_until(waited_from + self.read_interval)

    def _read_answers(self, message: str | bytes, now: float) -> bool:
        """Upstream's answers to our subscribes, and an eviction; routing handles the rest.
        Returns True for a frame of the resume's (a journal mark, a resume's statuses), which
        is the link's alone: it goes no further."""
        try:
            events = _read_statuses(message)
        except msgspec.DecodeError:
            return False  # not ours to judge: the router counts and drops malformed frames
        statuses = [event for event in events if event.get("ev") == "status"]
        if self.resume is not None and statuses and len(statuses) == len(events):
            ours, outcome = self.resume.read(statuses)
            if outcome is not None:
                self.on_resumed(outcome)
            if ours:
                return True
        for status in statuses:
            if status.get("status") in EVICTIONS:
                raise UpstreamRefused(str(status.get("status")), str(status.get("message")))
        for channels, reason in self._answers.read(statuses, now):
            extra = [channel for channel in channels if channel in self.extra]
            if extra:
                log.error("%s refused %s, which this tier always asks for (%s); not asking again "
                          "on this connection", self.label, protocol.format_channel_list(extra), reason)
            channels = tuple(channel for channel in channels if channel not in self.extra)
            self._plan.forget(channels)
            if channels:
                self.on_refused(channels, reason)
        return False

    async def _expect(self, ws: UpstreamSocket, wanted: str) -> None:
        message = await ws.get_message()
        statuses = [event.get("status") for event in _read_statuses(message)]
        if wanted in statuses:
            return
        for event in _read_statuses(message):
            if event.get("status") in ("auth_failed", "max_connections", "auth_timeout"):
                raise UpstreamRefused(str(event.get("status")), str(event.get("message")))
        raise UpstreamProtocolError(f"expected status {wanted!r}, got {message[:200]!r}")

    async def _keep_subscribed(self, ws: UpstreamSocket) -> None:
        """Bring what this connection was sent in step with what is wanted, paced and merged.

        Everything wanted is touched at first (``*`` first); then each change the registry
        reports. Touched channels are looked at in steps; messages go out at most
        ``subscribe_rate`` a second; after a batch, changes are gathered ``settle_seconds``
        before the next, so a burst goes out merged and a change undone meanwhile not at all.
        """
        plan, answers, extra = self._plan, self._answers, frozenset(self.extra)
        bucket = TokenBucket(self.subscribe_rate, self.subscribe_burst)
        resume = self.resume
        if resume is not None:
            resume.begin_connection()  # this connection's * subscribe asks for what the last one missed
        self.changes()  # the whole set below covers these
        plan.touch(self.extra)
        plan.touch(self.desired())
        last_sent, added, removed = -math.inf, 0, 0
        while True:
            plan.touch(self.changes())
            while not plan.classify(self.held(), extra, CLASSIFY_STEP):
                await trio.lowlevel.checkpoint()  # a reconnect may look at a million channels
                plan.touch(self.changes())
            if plan.idle:
                if added or removed:
                    log.info("upstream subscriptions: +%d -%d, %d held", added, removed, len(plan.sent))
                    added = removed = 0
                await self.demand_changed.wait()
                await trio.sleep_until(last_sent + self.settle_seconds)
                continue
            await trio.sleep(bucket.delay(trio.current_time()))
            message = plan.next_message(self.held(), extra)
            if message is None:
                continue
            verb, channels = message
            now = trio.current_time()
            bucket.take(now)
            answers.sent(verb, channels, now)
            asked = None
            if resume is not None and verb == "subscribe" and protocol.EVERYTHING_CHANNEL in channels:
                asked, resume = resume.request(), None  # once a connection
                if asked is not None:
                    log.info("resuming from seq %d of %s's journal %s", asked.from_seq, self.label, asked.journal)
            await ws.send_message(protocol.subscription_message(verb, channels, asked))
            last_sent = now
            self.subscribe_messages += 1
            if verb == "subscribe":
                added += len(channels)
                if protocol.EVERYTHING_CHANNEL in channels:
                    log.info("Subscribed to wildcard (*) from %s", self.label)
            else:
                removed += len(channels)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s", verb, protocol.format_channel_list(channels))

    async def _keepalive(self, ws: UpstreamSocket) -> None:
        """Ping every ``keepalive_interval``; give up when a ping has had no answer, and no frame
        has come either, for ``keepalive_timeout``.

        A frame counts as much as a pong: an upstream that sends data is not silent. Its pong
        waits behind whatever it queued for us first, so while we read behind its feed (a burst,
        a busy host) the pong can be many seconds late; dropping that link would throw away
        everything queued on it, and report an outage that began only at the last frame read.
        """
        for sequence in itertools.count():
            await trio.sleep(self.keepalive_interval)
            silent = False
            async with trio.open_nursery() as waiting:

                async def ping(payload: bytes) -> None:
                    await ws.ping(payload)
                    self.last_heard_at = trio.current_time()
                    waiting.cancel_scope.cancel()  # answered

                # our own payload, which says what it is in a packet capture
                waiting.start_soon(ping, b"keepalive %d" % sequence)
                sent = trio.current_time()
                while not silent:
                    heard = max(sent, self.last_received_at or sent)
                    if trio.current_time() - heard >= self.keepalive_timeout:
                        silent = True
                        waiting.cancel_scope.cancel()
                    else:
                        await trio.sleep_until(heard + self.keepalive_timeout)
            if silent:
                raise UpstreamProtocolError(
                    f"no answer to a ping for {self.keepalive_timeout:.0f}s: upstream is silent"
                )


_HANDLED = (OSError, UpgradeRefused, UpstreamClosed, trio.TooSlowError, UpstreamRefused,
            UpstreamProtocolError, msgspec.DecodeError, trio.BrokenResourceError)


def _handled_cause(raised: BaseException) -> BaseException:
    """The link failure inside ``raised``; re-raises anything else (cancellation, bugs).

    When the link is being cancelled (the tier shuts down) just as its connection
    fails, both arrive together: the cancellation wins, and the failure, moot by
    then, is dropped, so that a stop never ends in an exception group.
    """
    found = list(leaves(raised))
    cancelled = [leaf for leaf in found if isinstance(leaf, trio.Cancelled)]
    failures = [leaf for leaf in found if not isinstance(leaf, trio.Cancelled)]
    if all(isinstance(leaf, Exception) for leaf in failures):
        if cancelled:
            raise cancelled[0]
        for leaf in failures:
            if isinstance(leaf, _HANDLED):
                return leaf
    raise raised


#: The close code Polygon ends a connection with when the key's connection is taken elsewhere.
POLICY_CLOSE = 1008


def _close_code(error: BaseException) -> int | None:
    """The WebSocket close code that ended the connection, when ``error`` is such an end."""
    return error.code if isinstance(error, UpstreamClosed) else None


def _describe(error: BaseException) -> str:
    if isinstance(error, (UpstreamClosed, UpgradeRefused)):
        return str(error)  # says itself what happened: "connection closed (1001 GOING_AWAY)"
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    cause = error.__cause__ or error.__context__
    if isinstance(error, trio.BrokenResourceError) and cause is not None:
        text += f" ({type(cause).__name__}: {cause})"  # e.g. the certificate a TLS upstream failed
    return text
