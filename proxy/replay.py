"""``python -m proxy.replay JOURNAL_DIR``: a recorded journal served as a Polygon upstream.

The code lives in :mod:`proxy.sim.replay`; docs/journal.md describes the journal and
README's "Record a day, replay it" how to use it.
"""

from __future__ import annotations

from .sim.replay import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
