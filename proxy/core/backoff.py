"""Reconnect timing as a value: exponential backoff with jitter, reset after a healthy connection."""

from __future__ import annotations

import attrs

__all__ = ["Backoff"]


@attrs.frozen
class Backoff:
    """Reconnect timing: exponential with jitter, reset after a healthy connection.

    A connection is healthy once it authenticated and either carried data or
    lasted ``healthy_after_seconds``; the next outage then starts again from
    ``initial_seconds``. Worst case between tries: ``max_seconds`` after a run
    of failures, ``refused_seconds`` after a refusal.
    """

    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    healthy_after_seconds: float = 10.0
    #: After ``auth_failed`` or ``max_connections``: a long wait, never a tight loop.
    refused_seconds: float = 60.0
