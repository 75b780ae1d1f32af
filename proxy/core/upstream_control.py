"""What an upstream link asks for, how fast, and what it makes of the answers; without I/O.

:class:`SubscriptionPlan` keeps what one upstream connection was asked for and
decides the next message: channels whose wanted state changed are looked at
(in slices, so a reconnect with a million channels does not hold the router),
subscribes go before unsubscribes, 500 channels a message, and each channel is
checked again when its message is made, so a subscribe and an unsubscribe of the
same channel while it waited cancel out. :class:`TokenBucket` paces the messages
under the budget of the tier above (:class:`~proxy.core.session.ProxyLimits`).
:class:`PendingAnswers` matches upstream's answers to what was sent and names
the channels upstream refused, so that the tier can tell the clients holding them.
"""

from __future__ import annotations

from collections import deque
from typing import AbstractSet, Any, Iterable

import attrs

from . import protocol
from .protocol import Channel
from .subscriptions import compacted

__all__ = ["SUBSCRIBE_CHUNK", "PendingAnswers", "SubscriptionPlan", "TokenBucket"]

#: Channels per subscribe or unsubscribe message.
SUBSCRIBE_CHUNK = 500


@attrs.define
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    _tokens: float | None = None
    _last: float = 0.0

    def delay(self, now: float) -> float:
        """Seconds until a token is there (0 when one is)."""
        self._refill(now)
        assert self._tokens is not None
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        """Spend one token (the caller checked there is one)."""
        self._refill(now)
        assert self._tokens is not None
        self._tokens -= 1

    def _refill(self, now: float) -> None:
        if self._tokens is None:
            self._tokens, self._last = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now


@attrs.define
class SubscriptionPlan:
    """What one upstream connection was sent, and what to send it next."""

    chunk: int = SUBSCRIBE_CHUNK
    #: Channels this connection was asked to subscribe and not asked to unsubscribe since.
    sent: set[Channel] = attrs.field(factory=set)
    _pending: dict[Channel, None] = attrs.field(factory=dict)  # to look at, in arrival order
    _looking: deque[Channel] = attrs.field(factory=deque)  # being looked at
    _subscribe: deque[Channel] = attrs.field(factory=deque)
    _unsubscribe: deque[Channel] = attrs.field(factory=deque)

    def touch(self, channels: Iterable[Channel]) -> None:
        """These channels' wanted state may differ from what was sent: look at them."""
        self._pending.update(dict.fromkeys(channels))

    def classify(self, wanted: AbstractSet[Channel], extra: AbstractSet[Channel], limit: int) -> bool:
        """Look at up to ``limit`` touched channels; True once none is left to look at.
        A channel is wanted when it is in ``wanted`` (the registry's upstream set) or ``extra``."""
        looking, sent = self._looking, self.sent
        if not looking:
            if not self._pending:
                return True
            looking = self._looking = deque(self._pending)  # a queue: deleting from a dict's front is not O(1)
            self._pending = {}
        batch = [looking.popleft() for _ in range(min(limit, len(looking)))]
        self._subscribe.extend(c for c in batch if (c in wanted or c in extra) and c not in sent)
        self._unsubscribe.extend(c for c in batch if c in sent and not (c in wanted or c in extra))
        return not (looking or self._pending)

    def next_message(
        self, wanted: AbstractSet[Channel], extra: AbstractSet[Channel]
    ) -> tuple[str, list[Channel]] | None:
        """The next subscribe or unsubscribe to send, or None. Every channel is checked again
        here, and what it holds counts as sent. Unsubscribes wait until every touched channel was
        looked at: one may be a wildcard subscribe that must go first to cover them."""
        sent = self.sent
        while self._subscribe:
            candidates = self._take(self._subscribe)
            channels = [c for c in candidates if (c in wanted or c in extra) and c not in sent]
            if channels:
                sent.update(channels)
                return "subscribe", channels
        if self._pending or self._looking:
            return None
        while self._unsubscribe:
            candidates = self._take(self._unsubscribe)
            channels = [c for c in candidates if c in sent and not (c in wanted or c in extra)]
            if channels:
                sent.difference_update(channels)
                self.sent = compacted(sent)
                return "unsubscribe", channels
        return None

    def forget(self, channels: Iterable[Channel]) -> None:
        """Upstream does not hold these (it refused them): they no longer count as sent."""
        self.sent.difference_update(channels)

    @property
    def idle(self) -> bool:
        """Whether nothing is waiting to be sent or answered."""
        return not (self._pending or self._looking or self._subscribe or self._unsubscribe)

    def _take(self, queue: deque[Channel]) -> list[Channel]:
        return [queue.popleft() for _ in range(min(self.chunk, len(queue)))]


@attrs.define
class _Request:
    verb: str
    channels: tuple[Channel, ...]
    unanswered: set[Channel]
    sent_at: float


@attrs.define
class PendingAnswers:
    """Subscribes and unsubscribes sent on one connection, matched with upstream's answers.

    Polygon answers a subscribe with one ``success`` status per channel (``subscribed to:
    T.AAPL``), in one frame or several; a tier of ours answers each control message
    with exactly one frame, and refuses a message as a whole with one ``error`` status
    that names no channel (``rate limited``, ``channel limit``). So: a success marks
    its channel answered; a frame with an error answers the oldest request still
    waiting, and that request's channels not acknowledged are refused. A refusal a
    tier relays on its own (:func:`~proxy.core.protocol.refusal_frame`) names its channels
    and answers no request. A request unanswered after ``timeout`` seconds is let go:
    Polygon reportedly answers a channel of an unknown type with nothing at all.
    """

    timeout: float = 30.0
    _requests: deque[_Request] = attrs.field(factory=deque)

    def sent(self, verb: str, channels: Iterable[Channel], now: float) -> None:
        """Remember a request sent upstream at ``now``, to match the answers that come back."""
        listed = tuple(channels)
        self._requests.append(_Request(verb, listed, set(listed), now))

    def read(self, statuses: list[dict[str, Any]], now: float) -> list[tuple[tuple[Channel, ...], str]]:
        """One frame's statuses; returns what upstream refused: (channels, upstream's words)."""
        requests = self._requests
        while requests and now - requests[0].sent_at > self.timeout:
            requests.popleft()
        if requests and _answers_in_full(statuses, requests[0]):
            requests.popleft()  # the usual case, checked without a look at each channel
            return []
        refused: list[tuple[tuple[Channel, ...], str]] = []
        error: str | None = None
        for status in statuses:
            kind, message = status.get("status"), str(status.get("message", ""))
            if kind == "success":
                verb, found, text = message.partition(" to: ")
                if found and verb in ("subscribed", "unsubscribed"):
                    self._acknowledge(text)
            elif kind == "error":
                named = protocol.refused_channels(message)
                if named is not None:
                    refused.append((named, message))
                elif error is None:
                    error = message
        if error is not None and requests:
            request = requests.popleft()
            if request.verb == "subscribe" and request.unanswered:
                refused.append((tuple(c for c in request.channels if c in request.unanswered), error))
        while requests and not requests[0].unanswered:
            requests.popleft()
        return refused

    def _acknowledge(self, text: str) -> None:
        ev_type, _, symbol = text.partition(".")  # a pair equals the Channel it names
        channel = (ev_type, symbol) if symbol else protocol.EVERYTHING_CHANNEL
        for request in self._requests:
            if channel in request.unanswered:
                request.unanswered.discard(channel)
                return

    def __len__(self) -> int:
        return len(self._requests)


def _answers_in_full(statuses: list[dict[str, Any]], request: _Request) -> bool:
    """Whether one frame acknowledges a whole request, as a tier of ours answers: a success per
    channel, in order (first and last checked), nothing else."""
    channels = request.channels
    if len(statuses) != len(channels) or len(request.unanswered) != len(channels) or not channels:
        return False
    if any(status.get("status") != "success" for status in statuses):
        return False
    first, last = str(statuses[0].get("message", "")), str(statuses[-1].get("message", ""))
    return first.endswith(" to: " + channels[0].text) and last.endswith(" to: " + channels[-1].text)
