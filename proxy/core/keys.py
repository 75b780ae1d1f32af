"""API keys: compared in constant time, and shown in logs only in part."""

from __future__ import annotations

import hmac
from typing import Collection

__all__ = ["key_matches", "redact"]


def key_matches(presented: str, accepted: Collection[str]) -> bool:
    """Constant-time comparison against every accepted key (no early exit on a match)."""
    presented_bytes = presented.encode()
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(presented_bytes, key.encode())
    return matched


def redact(key: str) -> str:
    """A key as logs may show it: enough to tell keys apart, never the key."""
    if len(key) <= 8:
        return "*" * len(key) if key else "<none>"
    return f"{key[:4]}…{key[-2:]}"
