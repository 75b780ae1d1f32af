"""``python -m proxy.journal ls|cat|verify DIR``: list, print and check a tier's journal.

The code lives in :mod:`proxy.app.journal_cli`; docs/journal.md describes the journal.
"""

from __future__ import annotations

from .app.journal_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
