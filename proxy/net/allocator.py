"""glibc's allocator, told what a tier needs of it: when to give memory back, and when not to.

Two needs pull opposite ways. After a crowd of clients leaves, the memory their channels held
should go back to the system, which glibc does not do by itself for blocks freed inside its
heap (:func:`return_free_memory`). In the steady flow, on the other hand, a tier allocates and
frees the same large buffers over and over (a read of 256 KB, frames of tens of KB, the journal
writer's ~256 KB blocks ten times a second); with glibc's defaults (a 128 KB trim threshold,
raised only after a large mmapped block happens to be freed) it gave those pages back and took
them again, a page fault and a zeroed page every 4 KB: the journal writer's thread faulted
about 1,000 times a second (a quarter of its CPU), and a filtered tier serving 100 clients from
6,000 to 18,000 times a second, or 33, depending on what the process had freed before
(``docs/performance.md``). :func:`hold_freed_memory` fixes both thresholds, for every tier at its
start, so that such buffers stay. Elsewhere than glibc (no ``mallopt``/``malloc_trim``) both are
no-ops.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

__all__ = ["BLOCK_MMAP_THRESHOLD", "BLOCK_TRIM_THRESHOLD", "hold_freed_memory", "return_free_memory"]

log = logging.getLogger("proxy.allocator")

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations below this come from the arenas, not mmap (a block's buffers: about 800 KB
#: at most, the block, its compressed copy and its records' encodings)...
BLOCK_MMAP_THRESHOLD = 4 * 1024 * 1024
#: ... and an arena keeps up to this much free at its top rather than hand it back.
BLOCK_TRIM_THRESHOLD = 8 * 1024 * 1024


def _libc() -> Any | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_LIBC = _libc()


def hold_freed_memory(libc: Any | None = _LIBC) -> bool:
    """Keep large buffers allocated between uses (reads, frames, the journal writer's blocks: see
    the module's docstring); whether glibc took the settings. Process-wide and idempotent: the
    cost is up to :data:`BLOCK_TRIM_THRESHOLD` of free memory kept per arena."""
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on error
    held = bool(mallopt(_M_MMAP_THRESHOLD, BLOCK_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, BLOCK_TRIM_THRESHOLD))
    if not held:
        log.warning("the allocator refused the buffer settings; large buffers will be taken from "
                    "and returned to the system each time (more CPU, nothing lost)")
    return held


def return_free_memory(libc: Any | None = _LIBC) -> None:
    """Ask glibc to return the free memory inside its heap to the system (about 8 ms).

    After 100 clients with 10,000 channels each left, the registry had freed its objects and
    rebuilt its tables, yet the process stayed at 158 MB resident (366 MB at the peak, 34
    before): glibc keeps freed blocks inside its heap for reuse. malloc_trim brought it to
    50 MB (bench/subscribe_cost.py --rss). It ignores the thresholds above.
    """
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
