"""Data frames as the tiers write them: the RFC 6455 header in front of bytes already UTF-8 JSON.

wsproto frames only ``str`` as text, so every write would be decoded and
re-encoded and pass four layers of calls; :func:`text_frame` writes the header
itself (docs/performance.md has the measurement), and the tests parse its frames
with wsproto at every length boundary. Every other frame is wsproto's.
"""

from __future__ import annotations

import struct

__all__ = ["text_frame"]

_FIN_TEXT = 0x81  # FIN bit + text opcode (RFC 6455 §5.2); a server's frames are never masked
_header_short = struct.Struct("!BB").pack
_header_16 = struct.Struct("!BBH").pack
_header_64 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame holding ``payload`` (UTF-8 JSON, as upstream sent it).

    Written here rather than through wsproto because wsproto frames only
    ``str`` as text: our events are bytes, so each write would be decoded and
    re-encoded and pass four layers of calls, 5.4 µs per 7.6 kB write against
    0.44 µs here (websockets' ``Frame.serialize``: 1.5 µs). Only the header is
    ours; tests parse these frames with wsproto at every length boundary.
    """
    size = len(payload)
    if size < 126:
        return _header_short(_FIN_TEXT, size) + payload
    if size < 65536:
        return _header_16(_FIN_TEXT, 126, size) + payload
    return _header_64(_FIN_TEXT, 127, size) + payload
