"""A client's bounded outgoing queue, counted in events, and the coalescing of what it holds.

Pure, no Trio. The router puts runs of raw events, whole data frames (what a
``*`` holder gets) and verbatim frames (statuses, answers) in and never waits;
the client's send task takes everything queued at once and sends it as few
frames as the order allows: consecutive runs and data frames are joined into
one JSON array of their events, in order, up to :data:`MAX_JOINED_BYTES`;
verbatim frames go out as they are, where they were queued. When a put would
pass the capacity, the slow-client policy decides: ``disconnect`` marks the
outbox overflowed and empties it, ``drop_oldest`` drops the oldest entries and
counts the events lost. A :class:`SharedRun` keeps the data frames owed to every
``*`` holder that is in step once for all of them, joined once per write; a put
into a member's own outbox first copies the run's frames into it, so that the
member goes on alone from exactly where it was.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Generic, Hashable, Mapping, TypeVar

import attrs

__all__ = ["MAX_JOINED_BYTES", "SlowClientPolicy", "Outbox", "SharedRun"]

K = TypeVar("K", bound=Hashable)

#: A joined frame grows to about this size at most (a single entry larger than it goes out
#: alone): Python's ``websockets`` closes a message over 1 MiB by default (``max_size``).
MAX_JOINED_BYTES = 256 * 1024


class SlowClientPolicy(enum.Enum):
    """What happens to a client whose queue is full (``SLOW_CLIENT_POLICY``)."""
    DISCONNECT = "disconnect"
    DROP_OLDEST = "drop_oldest"


#: What a queued entry holds: comma-joined raw events, a whole JSON array of data events (joinable
#: with its neighbours once its brackets are taken off), or a frame to send as it is.
_EVENTS, _ARRAY, _VERBATIM = 0, 1, 2
#: A queued entry: (payload, events it holds, kind). A plain tuple, not an attrs class: one is made
#: per client per upstream frame, and a tuple costs a tenth of a frozen attrs instance (0.05 vs 0.54 µs).
_Entry = tuple[str | bytes, int, int]


@attrs.define(eq=False)
class Outbox:
    """One client's queue of events not yet written, bounded by ``capacity_events``.

    ``put_*`` never waits: it returns False once the client must be disconnected
    (``disconnect`` policy), or drops the oldest entries (``drop_oldest``)."""
    capacity_events: int
    policy: SlowClientPolicy = SlowClientPolicy.DISCONNECT
    queued_events: int = 0
    dropped_events: int = 0
    overflowed: bool = False
    #: When the oldest data now queued arrived from upstream (for the routing-latency metric).
    oldest_received_at: float | None = None
    #: Events taken from here whose bytes still wait in the connection's backlog (the kernel did not
    #: take them at once). They count toward the capacity: a slow client holds at most
    #: ``capacity_events`` in the proxy, queued or written, not that twice over.
    unsent_events: int = 0
    _entries: deque[_Entry] = attrs.field(factory=deque, init=False)
    #: The shared run this outbox is a member of (its ``*`` frames are kept there), and its key
    #: there; None while it queues everything itself.
    _shared: tuple[SharedRun, Hashable] | None = attrs.field(default=None, init=False)

    @property
    def shared(self) -> SharedRun | None:
        """The :class:`SharedRun` holding this client's ``*`` frames for it, or None."""
        return None if self._shared is None else self._shared[0]

    @property
    def events_waiting(self) -> int:
        """Events queued for this client and not yet written: its own and, for a member, the shared run's."""
        shared = self.shared
        return self.queued_events + (0 if shared is None else shared.events)

    @property
    def oldest_waiting_at(self) -> float | None:
        """When the oldest data waiting for this client arrived, its own or the shared run's."""
        shared = self.shared
        if shared is None or shared.oldest_received_at is None:
            return self.oldest_received_at
        if self.oldest_received_at is None:
            return shared.oldest_received_at
        return min(self.oldest_received_at, shared.oldest_received_at)

    def put_events(self, joined_events: bytes, count: int, received_at: float | None = None) -> bool:
        """Queue a comma-joined run of raw events; False once the client must be disconnected."""
        return self._put((joined_events, count, _EVENTS), received_at)

    def put_array(self, frame: str | bytes, count: int, received_at: float | None = None) -> bool:
        """Queue a whole JSON array of ``count`` data events (an upstream frame, for a ``*``
        holder): sent as it is when alone, joined with the data queued next to it otherwise."""
        return self._put((frame, max(count, 1), _ARRAY), received_at)

    def put_frame(self, frame: str | bytes, count: int = 1, received_at: float | None = None) -> bool:
        """Queue a whole frame to be sent byte for byte, never joined (a status, an answer);
        ``count`` is how many events it holds."""
        return self._put((frame, max(count, 1), _VERBATIM), received_at)

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, entry: _Entry, received_at: float | None) -> bool:
        if self._shared is not None:
            # A put of its own (a status, an answer): it goes on alone, after the run's frames.
            run, key = self._shared
            run.release(key)
        if self.overflowed:
            return False
        if received_at is not None and self.oldest_received_at is None:
            self.oldest_received_at = received_at
        events = entry[1]
        held = self.queued_events + self.unsent_events
        if held + events > self.capacity_events and (self._entries or self.unsent_events):
            if self.policy is SlowClientPolicy.DISCONNECT:
                self.overflowed = True
                self.dropped_events += self.queued_events + events  # the unsent ones still go out, before the status
                self._entries.clear()
                self.queued_events = 0
                return False
            # Only what is still queued can be dropped; what is written is on its way.
            while self._entries and self.queued_events + self.unsent_events + events > self.capacity_events:
                oldest_events = self._entries.popleft()[1]
                self.queued_events -= oldest_events
                self.dropped_events += oldest_events
        self._entries.append(entry)
        self.queued_events += events
        return True

    def take_frames(self) -> list[str | bytes]:
        """Everything queued, as frames to send in order: consecutive runs of events and data
        frames joined into one JSON array (up to about :data:`MAX_JOINED_BYTES` each, events in
        order, their bytes untouched), verbatim frames as they are, where they were queued.
        A data frame alone goes out exactly as it was queued."""
        frames = _frames_of(self._entries)
        self._entries.clear()
        self.queued_events = 0
        self.oldest_received_at = None
        return frames

    def _adopt(self, entries: list[_Entry], events: int, received_at: float | None) -> None:
        """Take a shared run's entries as queued here, before anything queued later (the outbox
        was a member: it held nothing else, and had nothing unsent, so they fit)."""
        self._entries.extend(entries)
        self.queued_events += events
        if received_at is not None and (self.oldest_received_at is None or received_at < self.oldest_received_at):
            self.oldest_received_at = received_at


@attrs.define(eq=False)
class SharedRun(Generic[K]):
    """The ``*`` frames routed for the holders in step, kept once for them all.

    A member (:meth:`join`) is a ``*`` holder whose own outbox is empty and whose
    socket took everything: all it is owed is here, so one :meth:`take_frames`
    (joined once) is what each member is written, the same bytes objects for all.
    Each frame is :meth:`add` ed once, however many members there are. A member
    leaves with :meth:`release` (its outbox gets the run's entries, so it goes on
    alone from where it was: a put into its outbox does this first, and so does a
    backlog, a replay or an unsubscribe) or :meth:`leave` (it is gone). Queue
    counting is the members' own: when a frame would take the run past
    ``capacity_events`` (every member's ``CLIENT_QUEUE_EVENTS``), every member is
    released first, and the frame is queued to each alone, where its slow-client
    policy applies exactly as it would have.
    """

    capacity_events: int
    #: Events in the run, and when the oldest of them arrived from upstream.
    events: int = 0
    oldest_received_at: float | None = None
    _entries: list[_Entry] = attrs.field(factory=list, init=False)
    _members: dict[K, Outbox] = attrs.field(factory=dict, init=False)
    #: Members released with entries of the run in their outbox since :meth:`take_released`.
    _released: dict[K, None] = attrs.field(factory=dict, init=False)

    def __len__(self) -> int:
        """How many frames the run holds."""
        return len(self._entries)

    @property
    def members(self) -> Mapping[K, Outbox]:
        """The members and their outboxes (the mapping itself, not a copy: do not change it)."""
        return self._members

    def can_join(self, outbox: Outbox) -> bool:
        """Whether a client with ``outbox`` may join now: the run holds nothing (a member is owed
        exactly the run), and the outbox holds and owes nothing, under the run's capacity."""
        return (not self._entries and outbox._shared is None and not outbox._entries and not outbox.overflowed
                and outbox.unsent_events == 0 and outbox.capacity_events == self.capacity_events)

    def join(self, key: K, outbox: Outbox) -> bool:
        """Make ``key`` (whose queue is ``outbox``) a member if it :meth:`can_join`; True if it is one."""
        if key in self._members:
            return True
        if not self.can_join(outbox):
            return False
        self._members[key] = outbox
        outbox._shared = (self, key)
        return True

    def add(self, frame: str | bytes, count: int, received_at: float | None = None) -> bool:
        """Queue a whole JSON array of ``count`` data events for every member; False, with every
        member released, when it would take the run past the capacity (queue it to each alone)."""
        if not self._members:
            return False
        count = max(count, 1)
        if self.events and self.events + count > self.capacity_events:
            for key in list(self._members):
                self.release(key)
            return False
        self._entries.append((frame, count, _ARRAY))
        self.events += count
        if received_at is not None and self.oldest_received_at is None:
            self.oldest_received_at = received_at
        return True

    def take_frames(self) -> list[str | bytes]:
        """The run as frames to write to every member, as :meth:`Outbox.take_frames` would make them
        (consecutive frames joined, up to about :data:`MAX_JOINED_BYTES` each); the run is empty after."""
        frames = _frames_of(self._entries)
        self._empty()
        return frames

    def _empty(self) -> None:
        self._entries, self.events, self.oldest_received_at = [], 0, None

    def release(self, key: K) -> None:
        """``key`` goes on alone: the run's entries are queued in its outbox (it is listed by
        :meth:`take_released` if there were any). Nothing if it is not a member."""
        outbox = self._members.pop(key, None)
        if outbox is None:
            return
        outbox._shared = None
        if self._entries:
            outbox._adopt(list(self._entries), self.events, self.oldest_received_at)
            self._released[key] = None
        if not self._members:
            self._empty()

    def leave(self, key: K) -> None:
        """``key`` is gone: it is no longer a member, nor listed as released."""
        outbox = self._members.pop(key, None)
        if outbox is not None:
            outbox._shared = None
        self._released.pop(key, None)
        if not self._members:
            self._empty()

    def take_released(self) -> list[K]:
        """The members released with frames of the run queued in their outbox since the last call:
        they are to be written as the run would have been."""
        if not self._released:
            return []
        released, self._released = list(self._released), {}
        return released


def _frames_of(entries: deque[_Entry] | list[_Entry]) -> list[str | bytes]:
    """``entries`` as frames to send in order: consecutive runs of events and data frames joined
    into one JSON array (up to about :data:`MAX_JOINED_BYTES` each), verbatim frames as they are."""
    frames: list[str | bytes] = []
    run: list[_Entry] = []
    size = 0
    for entry in entries:
        if entry[2] == _VERBATIM:
            if run:
                frames.append(_joined(run))
                run, size = [], 0
            frames.append(entry[0])
            continue
        if run and size + len(entry[0]) > MAX_JOINED_BYTES:
            frames.append(_joined(run))
            run, size = [], 0
        run.append(entry)
        size += len(entry[0])
    if run:
        frames.append(_joined(run))
    return frames


def _joined(run: list[_Entry]) -> str | bytes:
    """One JSON array of the events of ``run``'s entries, in order."""
    if len(run) == 1:
        payload, _, kind = run[0]
        if kind == _ARRAY:
            return payload  # the frame as upstream sent it
        return b"[" + payload + b"]"  # type: ignore[operator]
    return b"[" + b",".join([
        payload if kind == _EVENTS else _array_items(payload) for payload, _, kind in run  # type: ignore[misc]
    ]) + b"]"


def _array_items(frame: str | bytes) -> memoryview:
    """The bytes between the brackets of a JSON array (routing checked it is one: only
    whitespace comes before its ``[`` and after its ``]``), without copying them."""
    data = frame.encode() if isinstance(frame, str) else frame
    return memoryview(data)[data.index(b"[") + 1:data.rindex(b"]")]
