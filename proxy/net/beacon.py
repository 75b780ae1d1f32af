"""A :class:`Beacon` wakes every task waiting for "something changed" (upstream demand).

Pulsing is synchronous and cheap, so sans-I/O code paths can signal without
awaiting; waiters re-read the state they care about after waking, so a pulse
that finds nobody waiting is never a lost update.
"""

from __future__ import annotations

import trio

__all__ = ["Beacon"]


class Beacon:
    """Wakes every waiter on each :meth:`pulse`; waiters re-read state after waking."""
    def __init__(self) -> None:
        self._event = trio.Event()

    def pulse(self) -> None:
        """Wake everyone waiting now; a pulse nobody waits for is simply gone."""
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        """Return at the next pulse."""
        await self._event.wait()
