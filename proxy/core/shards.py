"""One market's upstream channels spread over the several connections an account bought, without I/O.

Polygon caps some channel types per connection (options quotes: 1,000 contracts); an account
with ``POLYGON_CONNECTIONS_OPTIONS=2`` may hold twice as many over two connections. The
registry keeps one upstream set for the market; :class:`ChannelShards` places each of its
channels on one connection and reports, per connection, the channels whose membership
changed, as the registry does for a single link. A channel stays where it was placed while
held (moving one would drop its events for a moment). Wildcards go on the first connection:
with ``T.*`` held, the registry holds no ``T.`` symbol, so no event comes twice. A capped
type's channel goes to the connection with the fewest of that type; any other channel to
the connection holding the fewest channels. Routing is unchanged: every connection's frames
go to the one router.
"""

from __future__ import annotations

import collections
from typing import AbstractSet, Callable, Iterable, Mapping

from .protocol import Channel

__all__ = ["ChannelShards"]


class ChannelShards:
    """Places a market's upstream channels on ``count`` connections within per-connection ``caps``.

    ``take_changes`` reads the registry's changes (channels whose upstream membership changed)
    and ``held`` its upstream set; :meth:`changes_for` gives connection ``index`` its share
    of the changes since it last asked, :meth:`held_by` the channels placed on it now."""

    def __init__(self, count: int, caps: Mapping[str, int], *,
                 take_changes: Callable[[], Iterable[Channel]], held: Callable[[], AbstractSet[Channel]]) -> None:
        if count < 1:
            raise ValueError("a market needs at least one connection")
        self.count = count
        self._caps = dict(caps)
        self._take_changes = take_changes
        self._held = held
        self._placed: dict[Channel, int] = {}
        self._sets: list[set[Channel]] = [set() for _ in range(count)]
        self._typed: list[collections.Counter[str]] = [collections.Counter() for _ in range(count)]
        self._pending: list[dict[Channel, None]] = [{} for _ in range(count)]
        self._started = False

    def _sync(self) -> None:
        """Place or remove every channel whose upstream membership changed since the last look."""
        held = self._held()
        if not self._started:
            self._started = True
            changed: Iterable[Channel] = list(held) + list(self._take_changes())
        else:
            changed = self._take_changes()
        for channel in changed:
            index = self._placed.get(channel)
            if channel in held and index is None:
                index = self._place(channel)
                self._placed[channel] = index
                self._sets[index].add(channel)
                self._typed[index][channel.ev_type] += 1
            elif channel not in held and index is not None:
                del self._placed[channel]
                self._sets[index].discard(channel)
                self._typed[index][channel.ev_type] -= 1
            if index is not None:
                self._pending[index][channel] = None

    def _place(self, channel: Channel) -> int:
        if channel.is_everything or channel.is_type_wildcard:
            return 0
        if channel.ev_type in self._caps:
            return min(range(self.count), key=lambda index: (self._typed[index][channel.ev_type], index))
        return min(range(self.count), key=lambda index: (len(self._sets[index]), index))

    def changes_for(self, index: int) -> list[Channel]:
        """Connection ``index``'s channels whose membership changed since it last asked."""
        self._sync()
        changed, self._pending[index] = list(self._pending[index]), {}
        return changed

    def held_by(self, index: int) -> AbstractSet[Channel]:
        """The channels placed on connection ``index`` (the set itself, read, never changed)."""
        self._sync()
        return self._sets[index]

    def count_on(self, index: int, ev_type: str) -> int:
        """How many symbols of ``ev_type`` connection ``index`` holds (wildcards included)."""
        return self._typed[index][ev_type]
