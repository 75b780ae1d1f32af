"""Who wants what, and what to ask upstream for: the ``SubscriptionRegistry``.

Pure state, no Trio. It tracks each subscriber's channels, answers which
subscribers an event goes to (each at most once), and keeps the upstream set:
the wildcard-collapsed union of every subscriber's channels and the static
ones, plus channels still inside their unsubscribe grace period. Every change
returns the minimal :class:`UpstreamDelta` that moves upstream from the old set
to the new one: new needs are subscribed at once, channels nobody needs are
unsubscribed only when their grace has passed. Time comes from an injected clock.

Costs, because one client may hold 10,000 channels and a tier may hold a million
(issue 13): a change costs what it touches (a type wildcard touches the channels
of its type, found through a per-type index); grace deadlines wait in a queue in
deadline order, so finding the next one and expiring what is due cost what expires;
containers that emptied out after a crowd left are rebuilt, so that their tables
give the memory back.
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections import deque
from typing import AbstractSet, Callable, Generic, Hashable, Iterable, TypeVar

import attrs

from .protocol import EVERYTHING_CHANNEL, Channel

__all__ = ["COMPACT_BYTES_PER_ENTRY", "COMPACT_MIN_BYTES", "S", "SubscriberId", "SubscriptionRegistry",
           "UpstreamDelta", "compacted"]

#: Whoever subscribes: a client session in the tiers, any hashable value in tests.
S = TypeVar("S", bound=Hashable)
#: Kept for readers of older code: any subscriber.
SubscriberId = Hashable
_symbol_of = operator.itemgetter(1)
_type_of = operator.itemgetter(0)
_C = TypeVar("_C", dict, set)
#: A container is rebuilt when its table holds more than this many bytes per entry (a full
#: dict uses ~50-100, a full set ~30-60) and is above COMPACT_MIN_BYTES.
COMPACT_BYTES_PER_ENTRY = 256
COMPACT_MIN_BYTES = 1 << 20


def compacted(container: _C) -> _C:
    """``container``, or a copy of it when its table is mostly empty: Python's dicts and sets
    never shrink their tables as entries go, so after a crowd of clients leaves the tables
    they grew would hold their memory for as long as the tier runs."""
    size = sys.getsizeof(container)  # O(1) for dicts and sets
    if size > COMPACT_MIN_BYTES and size > COMPACT_BYTES_PER_ENTRY * (len(container) + 1):
        return type(container)(container)
    return container


class _Holders(set):
    """Two or more subscribers of one symbol channel; a channel with one holder maps to it
    directly, which saves a set (200 bytes) per channel when most channels have one holder."""


@attrs.frozen
class UpstreamDelta:
    """What changed upstream: channels to subscribe, and channels to unsubscribe once those are
    (subscribes first, so that nothing wanted is ever uncovered). Unsorted: sorting a
    10,000-channel delta cost more than the rest of its bookkeeping."""

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
        self._static = {channel for channel in static if not channel.is_everything}
        self._channels: dict[S, set[Channel]] = {}
        self._everything: set[S] = set()
        self._by_type: dict[str, set[S]] = {}  # holders of TYPE.*
        self._by_channel: dict[Channel, S | _Holders] = {}  # holders of TYPE.SYMBOL
        #: Every channel wanted, held upstream or in grace, by type: what a wildcard change touches.
        self._of_type: dict[str, set[Channel]] = {}
        #: Subscribers that routing must look up per event: some channel, and not `*`.
        self._routed_subscribers = 0
        self._route_cache: dict[tuple[str, str], tuple[S, ...]] = {}
        self._grace_deadline: dict[Channel, float] = {}
        self._grace_queue: deque[tuple[float, Channel]] = deque()  # deadline order (a constant grace)
        self._upstream: set[Channel] = set()
        self._changed: dict[Channel, None] = {}  # upstream membership changed since take_upstream_changes
        for channel in self._static:
            self._of_type.setdefault(channel.ev_type, set()).add(channel)
        self._reconcile(self._static)

    # --- queries -------------------------------------------------------------

    @property
    def upstream(self) -> frozenset[Channel]:
        """The channels held upstream now."""
        return frozenset(self._upstream)

    @property
    def upstream_count(self) -> int:
        """How many channels are held upstream now."""
        return len(self._upstream)

    def held_upstream(self) -> AbstractSet[Channel]:
        """The upstream set itself, not a copy, for a reader that looks a few channels up in it now."""
        return self._upstream

    def wanted_of_type(self, ev_type: str) -> AbstractSet[Channel]:
        """Every channel of ``ev_type`` wanted, held upstream or in its grace (the set itself, not a
        copy): what an upstream cap on that type counts."""
        return self._of_type.get(ev_type, frozenset())

    def take_upstream_changes(self) -> list[Channel]:
        """Channels whose upstream membership changed since the last call (the upstream link
        compares each with what its connection was sent, so a change undone meanwhile costs nothing)."""
        changed, self._changed = self._changed, {}
        return list(changed)

    @property
    def everything_subscribers(self) -> frozenset[S]:
        """Subscribers holding ``*``: they get every frame whole, and nothing else."""
        return frozenset(self._everything)

    @property
    def everything_holders(self) -> AbstractSet[S]:
        """Subscribers holding ``*``: the set itself, not a copy (the router reads it per frame;
        do not keep it across a change of subscriptions)."""
        return self._everything

    def holds_everything(self, subscriber: S) -> bool:
        """Whether ``subscriber`` holds ``*`` (without copying the set, as everything_subscribers does)."""
        return subscriber in self._everything

    def subscribers(self) -> frozenset[S]:
        """Everyone registered, subscribed to anything or not."""
        return frozenset(self._channels)

    def channels_of(self, subscriber: S) -> frozenset[Channel]:
        """The channels ``subscriber`` holds (a copy)."""
        return frozenset(self._channels.get(subscriber, ()))

    def count_of(self, subscriber: S) -> int:
        """How many channels ``subscriber`` holds."""
        return len(self._channels.get(subscriber, ()))

    def in_grace(self) -> dict[Channel, float]:
        """Channels nobody needs any more, still held until their deadline."""
        return dict(self._grace_deadline)

    def next_deadline(self) -> float | None:
        """When the earliest grace period ends (the clock's time), or None when none runs."""
        queue, deadlines = self._grace_queue, self._grace_deadline
        while queue and deadlines.get(queue[0][1]) != queue[0][0]:
            queue.popleft()  # that channel left its grace, or entered a later one
        return queue[0][0] if queue else None

    @property
    def routes_by_channel(self) -> bool:
        """Whether any event can have a target in :meth:`channel_targets` (False when every
        subscriber holds ``*``, as a firehose's downstream proxies do): routing skips the lookups."""
        return self._routed_subscribers > 0

    def channel_targets(self, ev_type: str, symbol: str) -> tuple[S, ...]:
        """Subscribers selecting this event by a channel, excluding ``*`` holders (they get frames)."""
        key = (ev_type, symbol)
        try:
            return self._route_cache[key]
        except KeyError:
            pass
        holders = self._by_channel.get(key)  # type: ignore[call-overload]  # a Channel equals its pair
        by_symbol = () if holders is None else holders if type(holders) is _Holders else (holders,)
        targets = self._by_type.get(ev_type, set()).union(by_symbol)
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
        routed = self._routes(held)
        added = [channel for channel in channels if channel not in held]
        held.update(added)
        self._changed_holdings(routed, self._routes(held), bool(added))
        return self._reconcile_wanted(self._index_add(subscriber, added))

    def unsubscribe(self, subscriber: S, channels: Iterable[Channel]) -> UpstreamDelta:
        """Drop ``channels`` from ``subscriber``'s set; what nobody holds any more starts its grace period."""
        held = self._channels.get(subscriber)
        if held is None:
            return UpstreamDelta()
        routed = self._routes(held)
        removed = [channel for channel in channels if channel in held]
        held.difference_update(removed)
        self._channels[subscriber] = compacted(held)
        self._changed_holdings(routed, self._routes(held), bool(removed))
        delta = self._reconcile_unwanted(self._index_remove(subscriber, removed))
        self._compact()
        return delta

    def remove_subscriber(self, subscriber: S) -> UpstreamDelta:
        """Forget ``subscriber`` and release all its channels, as unsubscribe does."""
        held = self._channels.pop(subscriber, set())
        self._changed_holdings(self._routes(held), False, bool(held))
        delta = self._reconcile_unwanted(self._index_remove(subscriber, held))
        self._compact()
        return delta

    def expire(self, limit: int | None = None) -> UpstreamDelta:
        """Unsubscribe what has outlived its grace, at most ``limit`` channels (the rest stay
        due: call again, as :meth:`next_deadline` says); call at :meth:`next_deadline`."""
        now = self._clock()
        queue, deadlines = self._grace_queue, self._grace_deadline
        found: dict[Channel, None] = {}  # (a channel may wait in the queue twice for one deadline)
        while queue and queue[0][0] <= now and (limit is None or len(found) < limit):
            deadline, channel = queue.popleft()
            if deadlines.get(channel) == deadline:
                found[channel] = None
        due = list(found)
        if "*" in map(_symbol_of, due):
            delta = self._reconcile(due)  # a wildcard going changes what covers its symbols
        else:
            # A symbol channel in its grace is held, wanted by nobody, and no wildcard upstream
            # covers it (that would have ended its grace): it just goes.
            for channel in due:
                del deadlines[channel]
                known = self._of_type[channel[0]]
                known.discard(channel)
                if not known:
                    del self._of_type[channel[0]]
            self._upstream.difference_update(due)
            self._changed.update(dict.fromkeys(due))
            delta = UpstreamDelta(unsubscribe=tuple(due))
        self._compact()
        return delta

    def refuse(self, channels: Iterable[Channel]) -> tuple[dict[S, list[Channel]], UpstreamDelta]:
        """Upstream refused these channels: it does not hold them, and nobody may believe it does.

        Each is dropped from upstream, from its grace, from the static set, and from every
        subscriber holding it exactly; returns those subscribers with what they lost, and the
        delta (a refused wildcard leaves its type's symbols to be subscribed one by one).
        """
        losers: dict[S, list[Channel]] = {}
        refused = [channel for channel in dict.fromkeys(channels) if not channel.is_everything]
        for channel in refused:
            self._upstream.discard(channel)
            self._grace_deadline.pop(channel, None)
            self._static.discard(channel)
            if channel.is_type_wildcard:
                holders: Iterable[S] = list(self._by_type.get(channel.ev_type, ()))
            else:
                found = self._by_channel.get(channel)
                if found is None:
                    holders = ()
                elif isinstance(found, _Holders):
                    holders = list(found)
                else:
                    holders = (found,)
            for subscriber in holders:
                losers.setdefault(subscriber, []).append(channel)
        for subscriber, lost in losers.items():
            held = self._channels[subscriber]
            routed = self._routes(held)
            held.difference_update(lost)
            self._index_remove(subscriber, lost)
            self._changed_holdings(routed, self._routes(held), True)
        self._changed.update(dict.fromkeys(refused))
        delta = self._reconcile(refused)
        self._compact()
        return losers, delta

    # --- internals -------------------------------------------------------------

    def _routes(self, held: set[Channel]) -> bool:
        """Whether routing looks this subscriber up per event: it holds channels, not `*`."""
        return bool(held) and EVERYTHING_CHANNEL not in held

    def _changed_holdings(self, routed_before: bool, routed_after: bool, changed: bool) -> None:
        self._routed_subscribers += routed_after - routed_before
        if changed:
            self._route_cache.clear()

    def _index_add(self, subscriber: S, channels: list[Channel]) -> list[Channel]:
        """Index ``subscriber`` as a holder of each (distinct) channel; returns the channels it
        is the first holder of, the only ones whose upstream state can change (the rest were
        wanted already). Symbol channels of one type nobody held, the bulk of a big subscribe,
        are indexed with set operations in C."""
        by_channel, of_type = self._by_channel, self._of_type
        if channels and "*" not in map(_symbol_of, channels) and len(set(map(_type_of, channels))) == 1:
            first = [channel for channel in channels if channel not in by_channel]
            if len(first) < len(channels):
                self._index_add_one_by_one(subscriber, [c for c in channels if c in by_channel])
            by_channel.update(dict.fromkeys(first, subscriber))
            known = of_type.get(channels[0][0])
            if known is None:
                known = of_type[channels[0][0]] = set()
            known.update(first)
            return first
        return self._index_add_one_by_one(subscriber, channels)

    def _index_add_one_by_one(self, subscriber: S, channels: list[Channel]) -> list[Channel]:
        first: list[Channel] = []
        by_channel, of_type = self._by_channel, self._of_type
        known: set[Channel] = set()
        known_type = None
        for channel in channels:
            ev_type, symbol = channel
            if symbol == "*":
                if ev_type == "*":
                    self._everything.add(subscriber)
                    continue
                holders = self._by_type.get(ev_type)
                if holders is None:
                    self._by_type[ev_type] = {subscriber}
                    first.append(channel)
                else:
                    holders.add(subscriber)
            else:
                found = by_channel.get(channel)
                if found is None:
                    by_channel[channel] = subscriber
                    first.append(channel)
                elif type(found) is _Holders:
                    found.add(subscriber)
                    continue
                else:
                    by_channel[channel] = _Holders((found, subscriber))
                    continue
            if ev_type != known_type:  # runs of one type are the rule: look its set up once
                known_type = ev_type
                known = of_type.get(ev_type) or of_type.setdefault(ev_type, set())
            known.add(channel)
        return first

    def _index_remove(self, subscriber: S, channels: Iterable[Channel]) -> list[Channel]:
        """Drop ``subscriber`` as a holder of each channel; returns the channels nobody holds now."""
        last: list[Channel] = []
        by_channel = self._by_channel
        for channel in channels:
            ev_type, symbol = channel
            if symbol == "*":
                if ev_type == "*":
                    self._everything.discard(subscriber)
                    continue
                holders = self._by_type[ev_type]
                holders.discard(subscriber)
                if not holders:
                    del self._by_type[ev_type]
                    last.append(channel)
                continue
            found = by_channel[channel]
            if type(found) is _Holders:
                found.discard(subscriber)
                if len(found) == 1:
                    by_channel[channel] = next(iter(found))
            else:
                del by_channel[channel]
                last.append(channel)
        return last

    def _is_wanted(self, channel: Channel) -> bool:
        if channel.symbol == "*":
            return channel.ev_type in self._by_type or channel in self._static
        return channel in self._by_channel or channel in self._static

    def _reconcile(self, touched: Iterable[Channel]) -> UpstreamDelta:
        """Bring the touched channels' upstream state to collapse(wanted ∪ in grace).

        Only the touched channels are looked at, so a change costs what it touches,
        not the size of the whole registry; a type wildcard touches its whole type,
        since it covers (or stops covering) every symbol of it. Wildcards are settled
        first, so symbol channels see the wildcard state they will live with. A symbol
        channel is held upstream when it is needed (wanted, and its wildcard is not) or
        in its grace, unless its wildcard is held upstream and brings its events anyway.
        """
        now = self._clock()
        symbols = list(touched)
        wildcards: set[Channel] = set()
        if "*" in map(_symbol_of, symbols):  # a test in C: wildcards are rare
            wildcards = {channel for channel in symbols if channel[1] == "*" and channel[0] != "*"}
            symbols = [channel for channel in symbols if channel[1] != "*"]
        if wildcards:
            for ev_type in {wildcard.ev_type for wildcard in wildcards}:
                for channel in self._of_type.get(ev_type, ()):
                    (wildcards.add if channel[1] == "*" else symbols.append)(channel)
            symbols = list(dict.fromkeys(symbols))
        subscribe: list[Channel] = []
        unsubscribe: list[Channel] = []
        for wildcard in sorted(wildcards):
            self._settle_wildcard(wildcard, now, subscribe, unsubscribe)
        by_channel, static, upstream, grace = self._by_channel, self._static, self._upstream, self._grace_deadline
        changed, of_type = self._changed, self._of_type
        # Per type: is its wildcard wanted, is it held upstream (read after the wildcards settled).
        # Touched channels come in runs of one type, so the last answer is kept.
        last_type: str | None = None
        wildcard_needed = covered = False
        for channel in symbols:
            ev_type = channel[0]
            if ev_type != last_type:
                last_type, wildcard = ev_type, Channel(ev_type, "*")
                wildcard_needed, covered = self._is_wanted(wildcard), wildcard in upstream
            held = channel in upstream
            if covered:
                if grace:
                    grace.pop(channel, None)
                target = False  # the wildcard upstream brings its events
            elif channel in by_channel or channel in static:
                if grace:
                    grace.pop(channel, None)
                target = not wildcard_needed
            elif held and not wildcard_needed and channel not in grace:
                # Nobody needs it and nothing else brings its events: keep it for the grace
                # period, in case someone comes straight back.
                deadline = grace[channel] = now + self._grace_seconds
                self._grace_queue.append((deadline, channel))
                target = deadline > now or self._drop_grace(channel)
            else:
                due = grace.get(channel)
                target = due is not None and (due > now or self._drop_grace(channel))
            if target:
                if not held:
                    upstream.add(channel)
                    subscribe.append(channel)
                    changed[channel] = None
                continue
            if held:
                upstream.discard(channel)
                unsubscribe.append(channel)
                changed[channel] = None
            if not (channel in by_channel or channel in static):
                # neither wanted, held nor in grace: no wildcard change need touch it
                known = of_type.get(ev_type)
                if known is not None:
                    known.discard(channel)
                    if not known:
                        del of_type[ev_type]
        return UpstreamDelta(subscribe=tuple(subscribe), unsubscribe=tuple(unsubscribe))

    def _reconcile_wanted(self, first: list[Channel]) -> UpstreamDelta:
        """:meth:`_reconcile` for channels that just got their first holder: the common case of
        a big subscribe, done with set operations in C where :meth:`_reconcile` looks at each.

        Exact when no channel is a wildcard, static or in its grace (otherwise it hands over):
        such a channel was neither wanted nor held, so it is held now unless its wildcard
        is wanted or held (then the wildcard brings its events).
        """
        if not first:
            return UpstreamDelta()
        grace, static = self._grace_deadline, self._static
        if ("*" in map(_symbol_of, first) or (grace and not grace.keys().isdisjoint(first))
                or (static and not static.isdisjoint(first))):
            return self._reconcile(first)
        upstream = self._upstream
        last_type: str | None = None
        start, runs, hold = 0, [], False
        for index, channel in enumerate(first):  # runs of one type: its wildcard is looked up once
            if channel[0] != last_type:
                if hold:
                    runs.append(first[start:index])
                last_type, start = channel[0], index
                wildcard = Channel(last_type, "*")
                hold = not (self._is_wanted(wildcard) or wildcard in upstream)
        if hold:
            runs.append(first[start:])
        new = first if len(runs) == 1 and len(runs[0]) == len(first) else [c for run in runs for c in run]
        upstream.update(new)
        self._changed.update(dict.fromkeys(new))
        return UpstreamDelta(subscribe=tuple(new))

    def _reconcile_unwanted(self, last: list[Channel]) -> UpstreamDelta:
        """:meth:`_reconcile` for channels whose last holder just left, with set operations in C.

        Exact when no channel is a wildcard, static or in its grace, and the grace is not
        zero (otherwise it hands over): each channel held enters its grace, unless a wildcard
        upstream brings its events (then it is dropped); a channel not held is forgotten.
        """
        if not last:
            return UpstreamDelta()
        grace, static = self._grace_deadline, self._static
        if ("*" in map(_symbol_of, last) or self._grace_seconds <= 0
                or (grace and not grace.keys().isdisjoint(last)) or (static and not static.isdisjoint(last))):
            return self._reconcile(last)
        upstream, of_type = self._upstream, self._of_type
        deadline = self._clock() + self._grace_seconds
        runs: list[tuple[list[Channel], bool]] = []  # (channels of one type, is its wildcard held)
        last_type, start, covered = None, 0, False
        for index, channel in enumerate(last):
            if channel[0] != last_type:
                if last_type is not None:
                    runs.append((last[start:index], covered))
                last_type, start = channel[0], index
                wildcard = Channel(last_type, "*")
                covered = wildcard in upstream
                if self._is_wanted(wildcard) and not covered:
                    return self._reconcile(last)  # a wildcard wanted but not held: the long way
        runs.append((last[start:], covered))
        unsubscribe: list[Channel] = []
        for run, covered in runs:
            held = [channel for channel in run if channel in upstream]
            if covered:
                upstream.difference_update(held)
                unsubscribe.extend(held)
                gone = run
            else:
                grace.update(dict.fromkeys(held, deadline))
                self._grace_queue.extend(zip(itertools.repeat(deadline), held))
                gone = [channel for channel in run if channel not in upstream] if len(held) < len(run) else []
            known = of_type.get(run[0][0])
            if known is not None and gone:
                known.difference_update(gone)
                if not known:
                    del of_type[run[0][0]]
        self._changed.update(dict.fromkeys(unsubscribe))
        return UpstreamDelta(unsubscribe=tuple(unsubscribe))

    def _drop_grace(self, channel: Channel) -> bool:
        del self._grace_deadline[channel]  # its grace has passed (found before expire() came to it)
        return False

    def _settle_wildcard(self, wildcard: Channel, now: float, subscribe: list[Channel],
                         unsubscribe: list[Channel]) -> None:
        """A type wildcard: held upstream when wanted or in its grace."""
        grace = self._grace_deadline
        wanted = self._is_wanted(wildcard)
        held = wildcard in self._upstream
        if wanted:
            grace.pop(wildcard, None)
        elif held and wildcard not in grace:
            grace[wildcard] = now + self._grace_seconds
            self._grace_queue.append((grace[wildcard], wildcard))
        deadline = grace.get(wildcard)
        if deadline is not None and deadline <= now:
            del grace[wildcard]
            deadline = None
        target = wanted or deadline is not None
        if target and not held:
            self._upstream.add(wildcard)
            subscribe.append(wildcard)
            self._changed[wildcard] = None
        elif held and not target:
            self._upstream.discard(wildcard)
            unsubscribe.append(wildcard)
            self._changed[wildcard] = None
        if not target:
            known = self._of_type.get(wildcard.ev_type)
            if known is not None:
                known.discard(wildcard)
                if not known:
                    del self._of_type[wildcard.ev_type]

    def _compact(self) -> None:
        self._by_channel = compacted(self._by_channel)
        self._upstream = compacted(self._upstream)
        self._grace_deadline = compacted(self._grace_deadline)
        self._changed = compacted(self._changed)
        for ev_type, known in self._of_type.items():
            self._of_type[ev_type] = compacted(known)
        if len(self._grace_queue) > 2 * len(self._grace_deadline) + 1024:
            deadlines = self._grace_deadline  # drop entries for channels no longer in that grace
            self._grace_queue = deque(entry for entry in self._grace_queue if deadlines.get(entry[1]) == entry[0])
