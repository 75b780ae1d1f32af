"""Who wants what, and what to ask upstream for: the ``SubscriptionRegistry``.

Pure state, no Trio. It tracks each subscriber's channels, answers which
subscribers an event goes to (each at most once), and keeps the upstream set:
the wildcard-collapsed union of every subscriber's channels and the static
ones, plus channels still inside their unsubscribe grace period. Every change
returns the minimal :class:`UpstreamDelta` that moves upstream from the old set
to the new one: new needs are subscribed at once, channels nobody needs are
unsubscribed only when their grace has passed. Time comes from an injected clock.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable, Iterable

import attrs

from .protocol import Channel

SubscriberId = Hashable


@attrs.frozen
class UpstreamDelta:
    """What to send upstream, subscribes first so that nothing wanted is ever uncovered."""

    subscribe: tuple[Channel, ...] = ()
    unsubscribe: tuple[Channel, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


def collapse(channels: Iterable[Channel]) -> set[Channel]:
    """Drop every ``T.X`` covered by a ``T.*`` in the same set; ``*`` is never an upstream channel."""
    channels = {channel for channel in channels if not channel.is_everything}
    wildcard_types = {channel.ev_type for channel in channels if channel.is_type_wildcard}
    return {
        channel
        for channel in channels
        if channel.is_type_wildcard or channel.ev_type not in wildcard_types
    }


class SubscriptionRegistry:
    """Subscribers' channel sets, the routing index, and the upstream set with its grace timers."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        grace_seconds: float = 5.0,
        static: Iterable[Channel] = (),
    ) -> None:
        self._clock = clock
        self._grace_seconds = grace_seconds
        self._static = frozenset(channel for channel in static if not channel.is_everything)
        self._channels: dict[SubscriberId, set[Channel]] = {}
        self._wanted: Counter[Channel] = Counter()  # subscribers holding each channel
        self._everything: set[SubscriberId] = set()
        self._by_type: dict[str, set[SubscriberId]] = {}
        self._by_channel: dict[tuple[str, str], set[SubscriberId]] = {}
        self._route_cache: dict[tuple[str, str], tuple[SubscriberId, ...]] = {}
        self._grace_deadline: dict[Channel, float] = {}
        self._upstream: set[Channel] = collapse(self._static)

    # --- queries -------------------------------------------------------------

    @property
    def upstream(self) -> frozenset[Channel]:
        """The channels held upstream now."""
        return frozenset(self._upstream)

    @property
    def static(self) -> frozenset[Channel]:
        return self._static

    @property
    def everything_subscribers(self) -> frozenset[SubscriberId]:
        """Subscribers holding ``*``: they get every frame whole, and nothing else."""
        return frozenset(self._everything)

    def subscribers(self) -> frozenset[SubscriberId]:
        return frozenset(self._channels)

    def channels_of(self, subscriber: SubscriberId) -> frozenset[Channel]:
        return frozenset(self._channels.get(subscriber, ()))

    def wanted(self) -> frozenset[Channel]:
        """Every channel some subscriber or the static list asks upstream for (``*`` excluded)."""
        return frozenset(self._wanted) | self._static

    def in_grace(self) -> dict[Channel, float]:
        """Channels nobody needs any more, still held until their deadline."""
        return dict(self._grace_deadline)

    def next_deadline(self) -> float | None:
        return min(self._grace_deadline.values(), default=None)

    def channel_targets(self, ev_type: str, symbol: str) -> tuple[SubscriberId, ...]:
        """Subscribers selecting this event by a channel, excluding ``*`` holders (they get frames)."""
        key = (ev_type, symbol)
        try:
            return self._route_cache[key]
        except KeyError:
            pass
        targets = self._by_type.get(ev_type, set()) | self._by_channel.get(key, set())
        result = tuple(targets - self._everything)
        self._route_cache[key] = result
        return result

    def selects(self, subscriber: SubscriberId, ev_type: str | None, symbol: str | None) -> bool:
        """Whether ``subscriber`` receives an event; unreadable events go to ``*`` holders only."""
        if subscriber in self._everything:
            return True
        if ev_type is None or symbol is None:
            return False
        return subscriber in self.channel_targets(ev_type, symbol)

    # --- changes -------------------------------------------------------------

    def add_subscriber(self, subscriber: SubscriberId) -> None:
        self._channels.setdefault(subscriber, set())

    def subscribe(self, subscriber: SubscriberId, channels: Iterable[Channel]) -> UpstreamDelta:
        held = self._channels.setdefault(subscriber, set())
        for channel in channels:
            if channel in held:
                continue
            held.add(channel)
            self._index(subscriber, channel, add=True)
        return self._reconcile()

    def unsubscribe(self, subscriber: SubscriberId, channels: Iterable[Channel]) -> UpstreamDelta:
        held = self._channels.get(subscriber, set())
        for channel in channels:
            if channel not in held:
                continue
            held.discard(channel)
            self._index(subscriber, channel, add=False)
        return self._reconcile()

    def remove_subscriber(self, subscriber: SubscriberId) -> UpstreamDelta:
        held = self._channels.pop(subscriber, set())
        for channel in held:
            self._index(subscriber, channel, add=False)
        return self._reconcile()

    def expire(self) -> UpstreamDelta:
        """Unsubscribe what has outlived its grace; call at :meth:`next_deadline`."""
        return self._reconcile()

    # --- internals -------------------------------------------------------------

    def _index(self, subscriber: SubscriberId, channel: Channel, *, add: bool) -> None:
        self._route_cache.clear()
        if channel.is_everything:
            (self._everything.add if add else self._everything.discard)(subscriber)
            return
        if channel.is_type_wildcard:
            index = self._by_type.setdefault(channel.ev_type, set())
            key: object = channel.ev_type
            table: dict = self._by_type
        else:
            key = (channel.ev_type, channel.symbol)
            index = self._by_channel.setdefault(key, set())  # type: ignore[arg-type]
            table = self._by_channel
        if add:
            index.add(subscriber)
            self._wanted[channel] += 1
        else:
            index.discard(subscriber)
            if not index:
                del table[key]
            self._wanted[channel] -= 1
            if self._wanted[channel] <= 0:
                del self._wanted[channel]

    def _reconcile(self) -> UpstreamDelta:
        """Move the upstream set to collapse(wanted ∪ in grace), starting or ending grace periods."""
        now = self._clock()
        needed = collapse(self.wanted())
        # A channel leaving `needed` but not covered by another needed one keeps its
        # data flowing for the grace period, in case someone comes straight back.
        for channel in self._upstream - needed:
            covered = not channel.is_type_wildcard and Channel(channel.ev_type, "*") in needed
            if not covered:
                self._grace_deadline.setdefault(channel, now + self._grace_seconds)
        for channel in list(self._grace_deadline):
            if channel in needed or self._grace_deadline[channel] <= now:
                del self._grace_deadline[channel]
        target = collapse(needed | set(self._grace_deadline))
        # Whatever a grace period still holds must not hide channels under a
        # wildcard that is leaving: drop grace entries that the target now covers.
        for channel in list(self._grace_deadline):
            if channel not in target:
                del self._grace_deadline[channel]
        delta = UpstreamDelta(
            subscribe=tuple(sorted(target - self._upstream, key=_order)),
            unsubscribe=tuple(sorted(self._upstream - target, key=_order)),
        )
        self._upstream = target
        return delta


def _order(channel: Channel) -> tuple[str, str]:
    return (channel.ev_type, channel.symbol)
