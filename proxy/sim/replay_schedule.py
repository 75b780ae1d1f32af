"""When a replay sends each recorded frame, without I/O or a clock.

A recording keeps each frame's receive time (ns since the epoch). Replayed at
``speed`` N, the first record replayed is due at ``start`` (a Trio time, in
seconds) and every later one its recorded distance from the first, divided by N,
after that: so the gaps between frames, an upstream outage's pause included, keep
their proportions, and ``speed`` 1 is the original pace. ``speed`` None is "as fast
as the sockets take": every record is due at once, and what paces the replay is the
connections' queues (:data:`MAX_SPEED_QUEUE_EVENTS`), not this schedule.

A replay that falls behind its schedule (the CPU or the disk cannot keep up at
this speed) does not skip anything, unlike the simulator's :class:`~proxy.sim.framing.Pacer`:
a recording is replayed whole, and the frames that are late go out as soon as the
replay gets to them, each still its own frame. :meth:`ReplaySchedule.behind` says
how late a record is, for the log.
"""

from __future__ import annotations

import attrs

__all__ = ["MAX_SPEED_QUEUE_EVENTS", "ReplaySchedule"]

#: At ``--speed max``, the replay waits while a connection has this many events queued and not
#: yet taken by its socket: the pace is the slowest reader's, and nobody is dropped as a slow
#: consumer (the simulator drops a connection at 250,000).
MAX_SPEED_QUEUE_EVENTS = 20_000


@attrs.define
class ReplaySchedule:
    """The due time of each record of one pass over a recording.

    ``start`` is when the first record handed to :meth:`due` is due; ``speed`` divides
    recorded time (None: everything is due at ``start``).
    """

    start: float
    speed: float | None
    #: The receive time of the first record of the pass (set by the first :meth:`due`).
    first_ns: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.speed is not None and not self.speed > 0:
            raise ValueError(f"speed must be above 0, not {self.speed!r}")

    def due(self, received_ns: int) -> float:
        """When the record received at ``received_ns`` is due (the first one asked: ``start``)."""
        if self.first_ns is None:
            self.first_ns = received_ns
        if self.speed is None:
            return self.start
        return self.start + (received_ns - self.first_ns) / 1e9 / self.speed

    def behind(self, now: float, received_ns: int) -> float:
        """How many seconds after its due time ``now`` is, for that record (0 when not late)."""
        return max(0.0, now - self.due(received_ns))

