"""How the simulator cuts its stream into frames and paces them, without I/O or a clock.

The cost of both proxy tiers is per upstream frame, so the simulator's framing is
part of what a benchmark measures. ``SIMULATOR_FRAME_EVENTS`` picks it
(:class:`~proxy.core.settings.SimulatorConfig`):

- a number N: every data frame is cut from N stream events, and the frames are
  paced evenly, rate / N a second (not lumps every 10 ms); a connection gets the
  events of each frame that its channels select, so one that selects everything
  gets exactly N per frame, one that selects part of the stream fewer;
- ``adaptive``: as Polygon sends, each event is its own frame, sent when it is due;
  only what piles up while the connection's socket is backed up (a write the kernel
  did not take at once) goes out together, as one frame (:func:`take_frame`);
- ``tick``: one 10 ms tick's worth per frame, the framing before the setting existed.

Pacing is by deadline (:class:`Pacer`): a Trio sleep per frame would be far too
coarse at 20,000 frames a second (a wake-up costs about a millisecond), so at each
wake-up the simulator sends every frame due by then, each still its own frame, and
sleeps until the next one is due.
"""

from __future__ import annotations

import collections
import math

import attrs

from ..core.settings import FRAME_ADAPTIVE, FRAME_TICK, MAX_FRAME_EVENTS

__all__ = [
    "TICK_SECONDS",
    "TICK_MAX_EVENTS",
    "Unit",
    "events_per_frame",
    "Pacer",
    "take_frame",
]

#: The ``tick`` framing: a frame per tick holds the tick's events, at most TICK_MAX_EVENTS.
TICK_SECONDS = 0.01
TICK_MAX_EVENTS = 200

#: One queued frame of a connection: how many events it holds, and its JSON array bytes.
Unit = tuple[int, bytes]


def events_per_frame(frame_events: int | str, rate: float) -> int:
    """How many stream events the generator puts in each frame it cuts.

    ``adaptive`` cuts single events (they are merged later, per connection, only
    while its socket is backed up); ``tick`` cuts one tick's worth, as before the
    setting existed: rate / 100, at least 1 and at most 200.
    """
    if frame_events == FRAME_ADAPTIVE:
        return 1
    if frame_events == FRAME_TICK:
        return max(1, min(TICK_MAX_EVENTS, int(rate * TICK_SECONDS)))
    if isinstance(frame_events, int) and 1 <= frame_events <= MAX_FRAME_EVENTS:
        return frame_events
    raise ValueError(f"not a framing: {frame_events!r}")


@attrs.define
class Pacer:
    """Frames due at evenly spaced times: frame k (0, 1, 2, ...) at ``start + k / frames_per_second``.

    The caller asks :meth:`due` at each wake-up, sends that many frames, and sleeps
    until :meth:`next_at`. When the caller has fallen more than ``max_lag_seconds``
    behind (the CPU cannot keep the rate), the frames older than that are skipped
    and counted in :attr:`skipped`: sending them would only make ever larger bursts,
    and the rate the simulator really achieved is what its counts report.
    """

    frames_per_second: float
    start: float
    max_lag_seconds: float = 0.5
    #: Index of the next frame not yet handed out (sent or skipped).
    next_index: int = 0
    skipped: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.frames_per_second > 0:
            raise ValueError("frames_per_second must be above 0")

    @property
    def sent(self) -> int:
        """Frames handed out and not skipped."""
        return self.next_index - self.skipped

    def due(self, now: float) -> int:
        """How many frames are due by ``now`` and not handed out yet; they count as handed out."""
        elapsed = now - self.start
        if elapsed < 0:
            return 0
        rate = self.frames_per_second
        if elapsed - self.next_index / rate > self.max_lag_seconds:
            keep_from = math.ceil((elapsed - self.max_lag_seconds) * rate)
            if keep_from > self.next_index:
                self.skipped += keep_from - self.next_index
                self.next_index = keep_from
        # The epsilon: at exactly a frame's time, floating point may put the product just below k.
        due = max(0, math.floor(elapsed * rate + 1e-9) + 1 - self.next_index)
        self.next_index += due
        return due

    def next_at(self) -> float:
        """When the next frame is due."""
        return self.start + self.next_index / self.frames_per_second


def take_frame(pending: collections.deque[Unit], merge: bool, limit: int = MAX_FRAME_EVENTS) -> Unit:
    """The next frame to send from a connection's queue, which must not be empty.

    Normally the first queued frame, as cut. With ``merge`` (adaptive framing, and
    the previous write did not go out at once) every queued frame that fits in
    ``limit`` events is joined into one JSON array: what accumulated while the
    socket was backed up goes as one frame, as Polygon does.
    """
    count, payload = pending.popleft()
    if not merge or not pending or count + pending[0][0] > limit:
        return count, payload
    parts = [payload[1:-1]]
    while pending and count + pending[0][0] <= limit:
        more, frame = pending.popleft()
        count += more
        parts.append(frame[1:-1])
    return count, b"[" + b",".join(parts) + b"]"
