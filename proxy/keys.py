"""``python -m proxy.keys hash``: hash an API key for ``API_KEYS_FILE`` (see :mod:`proxy.app.keys_cli`)."""

from __future__ import annotations

from .app.keys_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
