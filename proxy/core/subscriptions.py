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

import itertools
from collections import Counter
from typing import Callable, Generic, Hashable, Iterable, TypeVar

import attrs

from .protocol import Channel

__all__ = ["S", "SubscriberId", "SubscriptionRegistry", "UpstreamDelta"]

#: Whoever subscribes: a client session in the tiers, any hashable value in tests.
S = TypeVar("S", bound=Hashable)
#: Kept for readers of older code: any subscriber.
SubscriberId = Hashable


@attrs.frozen
class UpstreamDelta:
    """What to send upstream, subscribes first so that nothing wanted is ever uncovered."""

    subscribe: tuple[Channel, ...] = ()
    unsubscribe: tuple[Channel, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


class SubscriptionRegistry(Generic[S]):
    """Subscribers' channel sets, the routing index, and the upstream set with its grace timers.

    Generic over the subscriber type ``S`` (the tiers use their client sessions), so
    that what routing hands back is typed as what was put in.
    """

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
        self._channels: dict[S, set[Channel]] = {}
        self._wanted: Counter[Channel] = Counter()  # subscribers holding each channel
        self._everything: set[S] = set()
        self._by_type: dict[str, set[S]] = {}
        self._by_channel: dict[tuple[str, str], set[S]] = {}
        self._route_cache: dict[tuple[str, str], tuple[S, ...]] = {}
        self._routes_by_channel: bool | None = None  # cached answer of routes_by_channel
        self._grace_deadline: dict[Channel, float] = {}
        self._upstream: set[Channel] = set()
        self._reconcile(self._static)

    # --- queries -------------------------------------------------------------

    @property
    def upstream(self) -> frozenset[Channel]:
        """The channels held upstream now."""
        return frozenset(self._upstream)

    @property
    def everything_subscribers(self) -> frozenset[S]:
        """Subscribers holding ``*``: they get every frame whole, and nothing else."""
        return frozenset(self._everything)

    def subscribers(self) -> frozenset[S]:
        """Everyone registered, subscribed to anything or not."""
        return frozenset(self._channels)

    def channels_of(self, subscriber: S) -> frozenset[Channel]:
        """The channels ``subscriber`` holds (a copy)."""
        return frozenset(self._channels.get(subscriber, ()))

    def in_grace(self) -> dict[Channel, float]:
        """Channels nobody needs any more, still held until their deadline."""
        return dict(self._grace_deadline)

    def next_deadline(self) -> float | None:
        """When the earliest grace period ends (the clock's time), or None when none runs."""
        return min(self._grace_deadline.values(), default=None)

    @property
    def routes_by_channel(self) -> bool:
        """Whether any event can have a target in :meth:`channel_targets` (False when every
        subscriber holds ``*``, as a firehose's downstream proxies do): routing skips the lookups."""
        if self._routes_by_channel is None:
            self._routes_by_channel = any(
                not holders <= self._everything
                for holders in itertools.chain(self._by_type.values(), self._by_channel.values())
            )
        return self._routes_by_channel

    def channel_targets(self, ev_type: str, symbol: str) -> tuple[S, ...]:
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

    # --- changes -------------------------------------------------------------

    def add_subscriber(self, subscriber: S) -> None:
        """Register ``subscriber`` with no channels."""
        self._channels.setdefault(subscriber, set())

    def subscribe(self, subscriber: S, channels: Iterable[Channel]) -> UpstreamDelta:
        """Add ``channels`` to ``subscriber``'s set; returns what to subscribe upstream now."""
        held = self._channels.setdefault(subscriber, set())
        added = [channel for channel in channels if channel not in held]
        for channel in added:
            held.add(channel)
            self._index(subscriber, channel, add=True)
        return self._reconcile(added)

    def unsubscribe(self, subscriber: S, channels: Iterable[Channel]) -> UpstreamDelta:
        """Drop ``channels`` from ``subscriber``'s set; what nobody holds any more starts its grace period."""
        held = self._channels.get(subscriber, set())
        removed = [channel for channel in channels if channel in held]
        for channel in removed:
            held.discard(channel)
            self._index(subscriber, channel, add=False)
        return self._reconcile(removed)

    def remove_subscriber(self, subscriber: S) -> UpstreamDelta:
        """Forget ``subscriber`` and release all its channels, as unsubscribe does."""
        held = self._channels.pop(subscriber, set())
        for channel in held:
            self._index(subscriber, channel, add=False)
        return self._reconcile(held)

    def expire(self) -> UpstreamDelta:
        """Unsubscribe what has outlived its grace; call at :meth:`next_deadline`."""
        now = self._clock()
        return self._reconcile([c for c, deadline in self._grace_deadline.items() if deadline <= now])

    # --- internals -------------------------------------------------------------

    def _index(self, subscriber: S, channel: Channel, *, add: bool) -> None:
        self._route_cache.clear()
        self._routes_by_channel = None
        if channel.is_everything:
            (self._everything.add if add else self._everything.discard)(subscriber)
            return
        if channel.is_type_wildcard:
            index = self._by_type.setdefault(channel.ev_type, set())
            key: object = channel.ev_type
            table: dict = self._by_type
        else:
            key = (channel.ev_type, channel.symbol)
            index = self._by_channel.setdefault(key, set())
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

    def _is_wanted(self, channel: Channel) -> bool:
        return channel in self._wanted or channel in self._static

    def _reconcile(self, touched: Iterable[Channel]) -> UpstreamDelta:
        """Bring the touched channels' upstream state to collapse(wanted ∪ in grace).

        Only the touched channels are looked at, so a change costs what it touches,
        not the size of the whole registry; a type wildcard touches its whole type,
        since it covers (or stops covering) every symbol of it. Wildcards are settled
        first, so symbol channels see the wildcard state they will live with.
        """
        now = self._clock()
        affected: set[Channel] = set()
        for channel in touched:
            if channel.is_everything:
                continue
            affected.add(channel)
            if channel.is_type_wildcard:
                affected.update(self._channels_of_type(channel.ev_type))
        subscribe: list[Channel] = []
        unsubscribe: list[Channel] = []
        for channel in sorted(affected, key=lambda c: (not c.is_type_wildcard, c.ev_type, c.symbol)):
            wildcard = Channel(channel.ev_type, "*")
            wildcard_needed = not channel.is_type_wildcard and self._is_wanted(wildcard)
            needed = self._is_wanted(channel) and not wildcard_needed
            held = channel in self._upstream
            if needed:
                self._grace_deadline.pop(channel, None)
            elif held and not wildcard_needed:
                # Nobody needs it and nothing else brings its events: keep it for the grace
                # period, in case someone comes straight back.
                self._grace_deadline.setdefault(channel, now + self._grace_seconds)
            deadline = self._grace_deadline.get(channel)
            if deadline is not None and deadline <= now:
                del self._grace_deadline[channel]
            covered = not channel.is_type_wildcard and wildcard in self._upstream
            if covered:
                self._grace_deadline.pop(channel, None)  # the wildcard brings its events
            target = (needed or channel in self._grace_deadline) and not covered
            if target and not held:
                self._upstream.add(channel)
                subscribe.append(channel)
            elif held and not target:
                self._upstream.discard(channel)
                unsubscribe.append(channel)
        return UpstreamDelta(subscribe=tuple(sorted(subscribe, key=_order)),
                             unsubscribe=tuple(sorted(unsubscribe, key=_order)))

    def _channels_of_type(self, ev_type: str) -> set[Channel]:
        """Every channel of a type that is wanted, held or in grace (on wildcard changes only)."""
        candidates = set(self._upstream) | set(self._grace_deadline) | set(self._wanted) | set(self._static)
        return {channel for channel in candidates if channel.ev_type == ev_type}


def _order(channel: Channel) -> tuple[str, str]:
    return (channel.ev_type, channel.symbol)
