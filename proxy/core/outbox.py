"""A client's bounded outgoing queue, counted in events, and the coalescing of what it holds.

Pure, no Trio. The router puts runs of raw events, whole data frames (what a
``*`` holder gets) and verbatim frames (statuses, answers) in and never waits;
the client's send task takes everything queued at once and sends it as few
frames as the order allows: consecutive runs and data frames are joined into
one JSON array of their events, in order, up to :data:`MAX_JOINED_BYTES`;
verbatim frames go out as they are, where they were queued. When a put would
pass the capacity, the slow-client policy decides: ``disconnect`` marks the
outbox overflowed and empties it, ``drop_oldest`` drops the oldest entries and
counts the events lost.
"""

from __future__ import annotations

import enum
from collections import deque

import attrs

__all__ = ["MAX_JOINED_BYTES", "SlowClientPolicy", "Outbox"]

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


@attrs.define
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
        frames: list[str | bytes] = []
        run: list[_Entry] = []
        size = 0
        for entry in self._entries:
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
        self._entries.clear()
        self.queued_events = 0
        self.oldest_received_at = None
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
