"""``python -m proxy.client CHANNEL...``: print a feed readably (see :mod:`proxy.app.client_cli`)."""

from __future__ import annotations

from .app.client_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
