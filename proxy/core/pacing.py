"""When each client's queue is written: adaptive write coalescing (``CLIENT_FLUSH_MS``).

Pure, no Trio: times are plain floats from the caller's clock. A tier's cost is
per write, and upstream may send one event per frame, so a client is written at
most once per interval however many frames arrived: a client written to longer
than an interval ago is written at once (a lone frame after a quiet spell waits
for nothing), otherwise at the end of the interval that began with its last
write, when everything that arrived meanwhile goes out together. An interval of
0 writes every time, as before the setting existed.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, Hashable, TypeVar

import attrs

__all__ = ["FlushPacer"]

K = TypeVar("K", bound=Hashable)


@attrs.define
class FlushPacer(Generic[K]):
    """Write times per client: :meth:`ready` says whether to write now or schedules the write,
    :meth:`due` hands out the scheduled writes whose time has come.

    ``interval`` is in the same unit as the times given (seconds of ``trio.current_time()``
    in a tier). The caller reports every write it makes with :meth:`written`, scheduled or
    not, and forgets a client that left with :meth:`forget`."""

    interval: float
    #: When each client was last written to.
    _written_at: dict[K, float] = attrs.field(factory=dict, init=False)
    #: Clients with a write scheduled: when, and the sequence number of its heap entry.
    _waiting: dict[K, tuple[float, int]] = attrs.field(factory=dict, init=False)
    #: The client of each live heap entry. The heap holds (time, sequence) only, so that a client
    #: that left or was written meanwhile is referenced nowhere (a closed session must be freed);
    #: entries whose sequence is no longer here are skipped when popped.
    _clients: dict[int, K] = attrs.field(factory=dict, init=False)
    _heap: list[tuple[float, int]] = attrs.field(factory=list, init=False)
    _sequence: itertools.count = attrs.field(factory=itertools.count, init=False)

    def ready(self, client: K, now: float) -> bool:
        """True if ``client``, with something new to write at ``now``, is to be written now.

        Otherwise its write is scheduled at the end of the interval since its last write
        (if it is not already) and False is returned; :meth:`due` hands it out then."""
        last = self._written_at.get(client)
        if last is None or now - last >= self.interval:
            return True
        if client not in self._waiting:
            at, sequence = last + self.interval, next(self._sequence)
            self._waiting[client] = (at, sequence)
            self._clients[sequence] = client
            heapq.heappush(self._heap, (at, sequence))
        return False

    def written(self, client: K, now: float) -> None:
        """``client`` was written to at ``now``: its next interval starts here, and any write
        scheduled for it is done."""
        self._written_at[client] = now
        self._unschedule(client)

    def last_written(self, client: K) -> float | None:
        """When ``client`` was last written to, or None if never (or forgotten)."""
        return self._written_at.get(client)

    def due(self, now: float) -> list[K]:
        """The clients whose scheduled write time has come (by ``now``), earliest first; each
        is no longer scheduled (write it, and report that with :meth:`written`)."""
        heap, clients, waiting = self._heap, self._clients, self._waiting
        found: list[K] = []
        while heap and heap[0][0] <= now:
            _, sequence = heapq.heappop(heap)
            client = clients.pop(sequence, None)
            if client is not None:
                del waiting[client]
                found.append(client)
        return found

    def next_due(self) -> float | None:
        """When the earliest scheduled write is due, or None if none is scheduled."""
        heap, clients = self._heap, self._clients
        while heap and heap[0][1] not in clients:
            heapq.heappop(heap)  # done or forgotten meanwhile
        return heap[0][0] if heap else None

    def forget(self, client: K) -> None:
        """``client`` left: nothing more is scheduled or remembered for it, nor referenced."""
        self._written_at.pop(client, None)
        self._unschedule(client)

    def _unschedule(self, client: K) -> None:
        scheduled = self._waiting.pop(client, None)
        if scheduled is not None:
            del self._clients[scheduled[1]]

    def __len__(self) -> int:
        """How many clients have a write scheduled."""
        return len(self._waiting)
