"""Resume ("from"), without I/O: which journal records a resuming client gets, and where live
takes over.

A client that subscribes with ``"from": F`` gets the journaled events of its channels received
at or after F, then ``replay_complete``, then live events, with no gap and no duplicate at the
seam. :class:`Stitch` decides it by journal seq. When the replay begins, the next seq the
journal will give is ``hold_from``; live delivery to the client stops from there (the router
skips the client for every frame with a seq at or above it). Once the subscribe is wholly in
the registry (a big one is applied in steps, with frames routed in between), the journal's last
seq is ``through``: the replay serves every record up to it, and live delivery resumes with the
frame after it, into the client's queue, which waits (bounded by the client's queue and its
slow-client policy) until the replay is written. Records below ``hold_from`` are selected
with the channels asked for (the client's other channels had those events live already);
records from ``hold_from`` to ``through`` with every channel the client holds by then,
because live skipped it for those.

The replay's frames are built here too (:meth:`Stitch.take`): the selected events'
original bytes, in upstream order, joined into JSON arrays of at most
:data:`REPLAY_FRAME_BYTES`; an outage record becomes the status clients saw live; a status
an upstream tier relayed inside a frame is relayed again as the router did; a hole in the
journal (records the disk could not take, or damage) becomes a ``journal_gap`` status.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import attrs
import msgspec

from .journal import EventSelector, Record, RecordKind, format_ns
from .protocol import Channel, status_frame
from .routing import FrameError

__all__ = [
    "UPSTREAM_DISCONNECTED",
    "UPSTREAM_CONNECTED",
    "RELAYED_STATUSES",
    "REPLAY_COMPLETE",
    "REPLAY_PARTIAL",
    "JOURNAL_GAP",
    "JOURNAL_SEQ",
    "RESUME_STATUSES",
    "REPLAY_FRAME_BYTES",
    "relayed_status_frame",
    "journal_seq_frame",
    "ReplayRequest",
    "resume_start",
    "Stitch",
]

UPSTREAM_DISCONNECTED = "upstream_disconnected"
UPSTREAM_CONNECTED = "upstream_connected"
#: Statuses an upstream proxy tier sends about its own upstream; relayed to our clients.
RELAYED_STATUSES = frozenset({UPSTREAM_DISCONNECTED, UPSTREAM_CONNECTED})
#: The status that ends a replay: what follows is live.
REPLAY_COMPLETE = "replay_complete"
#: Sent before the replay when the journal does not reach back to the time asked for.
REPLAY_PARTIAL = "replay_partial"
#: Sent inside a replay where the journal lacks records (the disk could not keep up, damage).
JOURNAL_GAP = "journal_gap"
#: The mark a tier sends a downstream proxy's link after each write: every journaled record up to
#: this seq that was meant for the link is in its socket (docs/protocol.md, "Between the tiers").
JOURNAL_SEQ = "journal_seq"
#: The statuses of a resume by journal seq: the downstream proxy's link consumes them; its clients never see them.
RESUME_STATUSES = frozenset({JOURNAL_SEQ, REPLAY_PARTIAL, JOURNAL_GAP, REPLAY_COMPLETE})
#: A replay frame holds events up to about this many bytes: big enough that the per-frame cost
#: is small, small enough for any client's message limit (websockets' default is 1 MiB).
REPLAY_FRAME_BYTES = 64 * 1024

_read_statuses = msgspec.json.Decoder(list[dict[str, Any]]).decode


def relayed_status_frame(status: Mapping[str, Any]) -> str:
    """The frame a tier sends its clients for a status its upstream tier sent (an outage there)."""
    return status_frame(str(status.get("status")), str(status.get("message", "")))


def journal_seq_frame(seq: int, journal: str) -> str:
    """The mark that tells a downstream proxy's link how far it has been sent: its own frame, so
    that the link can take it out whole (``journal`` is an id of letters and digits)."""
    return f'[{{"ev":"status","status":"{JOURNAL_SEQ}","seq":{seq},"journal":"{journal}"}}]'


@attrs.frozen
class ReplayRequest:
    """A subscribe's ``from``, checked: replay the ``channels`` from ``from_ns`` (ns since the epoch;
    ``from_ms`` is the value as the client sent it, for messages). A downstream proxy's resume
    by journal seq has ``from_seq`` and ``journal`` instead (``from_ns`` and ``from_ms`` 0)."""

    from_ns: int
    from_ms: float
    channels: tuple[Channel, ...]
    from_seq: int | None = None
    journal: str | None = None


def resume_start(request: ReplayRequest, journal_id: str, hold_from: int, reach_seq: int,
                 reach_ns: int | None = None) -> tuple[int, str | None]:
    """Where a resume by journal seq starts, and the ``replay_partial`` status to send first when it
    cannot start where asked (None when it can).

    ``hold_from`` is this journal's next seq when the resume began (live delivery holds back
    from there, so the replay serves at least from there); ``reach_seq`` the oldest seq this
    journal still holds everything from (``reach_ns``: its receive time, if known). Another
    journal's id, or a seq past this journal's end (the same id cannot be that: a journal
    directory that begins afresh gets a new id), cannot be resumed: the replay starts at
    ``hold_from``, and what came in between is lost. A seq older than the journal reaches starts
    at ``reach_seq``: the records before it are lost.
    """
    assert request.from_seq is not None and request.journal is not None
    wanted = request.from_seq
    if request.journal != journal_id or wanted > hold_from:
        why = (f"journal {request.journal} is not this proxy's journal {journal_id} (it restarted without "
               "JOURNAL_DIR, or it is another proxy)" if request.journal != journal_id else
               f"seq {wanted} is past the end of journal {journal_id}, which is at {hold_from - 1}")
        return hold_from, status_frame(REPLAY_PARTIAL, f"cannot resume from seq {wanted}: {why}; the events in "
                                                       f"between are lost; resuming at seq {hold_from}")
    if wanted < reach_seq:
        when = "" if reach_ns is None else f" (received {format_ns(reach_ns)})"
        return reach_seq, status_frame(REPLAY_PARTIAL, f"the journal {journal_id} reaches back to seq {reach_seq}"
                                                       f"{when}, not to seq {wanted} asked for: records {wanted}.."
                                                       f"{reach_seq - 1} are lost; the replay starts there")
    return wanted, None


class Stitch:
    """One client's replay, joined to its live stream by journal seq (module docstring).

    ``hold_from`` is the journal's next seq when the replay began. The shell calls
    :meth:`close_at` once the subscribe is wholly applied, asks :meth:`live` for every live
    frame routed to the client, and feeds the records from the start on to :meth:`take`
    until :attr:`done`.
    """

    def __init__(self, request: ReplayRequest, hold_from: int) -> None:
        self.request = request
        self.hold_from = hold_from
        #: The last seq the replay serves; None until the subscribe is wholly applied.
        self.through: int | None = None
        #: The next seq the replay expects (None until the first record is taken).
        self.cursor: int | None = None
        self.events = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self._requested = EventSelector(request.channels)
        self._held: EventSelector | None = None

    def close_at(self, through: int, channels: Iterable[Channel]) -> None:
        """The subscribe is wholly applied and ``through`` is the journal's last seq now: the
        replay ends there, and records from ``hold_from`` on are selected with ``channels``
        (everything the client holds now). Raises ValueError when called twice."""
        if self.through is not None:
            raise ValueError("the replay's end is already set")
        self.through = through
        if through >= self.hold_from:
            channels = tuple(channels)
            if set(channels) != set(self.request.channels):
                self._held = EventSelector(channels)

    @property
    def ready(self) -> bool:
        """Whether the replay's end is known (it can be served)."""
        return self.through is not None

    def live(self, seq: int | None) -> bool:
        """Whether a live frame journaled as ``seq`` goes to the client live (True), or is the
        replay's (False). Statuses that are not journaled (None) always go live."""
        if seq is None:
            return True
        through = self.through
        return through is not None and seq > through

    @property
    def done(self) -> bool:
        """Whether every record up to :attr:`through` has been taken."""
        return self.through is not None and self.cursor is not None and self.cursor > self.through

    def start_at(self, seq: int) -> None:
        """Begin the replay at ``seq`` (the first record received at or after the start)."""
        if self.cursor is None:
            self.cursor = seq

    def skip_to(self, seq: int, why: str, received_ns: int | None = None) -> list[str]:
        """Records before ``seq`` cannot be had (``why``): a ``journal_gap`` status for them
        (nothing if none were due), and the replay goes on at ``seq``."""
        frames: list[str] = []
        cursor = self.cursor
        if cursor is not None and seq > cursor and self.through is not None and cursor <= self.through:
            last = min(seq - 1, self.through)
            frames.append(self._gap_frame(cursor, last, why, received_ns))
        if cursor is None or seq > cursor:
            self.cursor = seq
        return frames

    def take(self, records: Iterable[Record]) -> list[str | bytes]:
        """The replay's frames for ``records`` (in seq order), up to :attr:`through`; records
        before the cursor or after the end are ignored. A hole before a record becomes a
        ``journal_gap`` status. Raises ValueError before :meth:`close_at`."""
        through = self.through
        if through is None:
            raise ValueError("the replay's end is not known yet")
        frames: list[str | bytes] = []
        run: list[bytes] = []
        size = 0

        def flush() -> None:
            nonlocal run, size
            if run:
                frames.append(b"[" + b",".join(run) + b"]")
                run, size = [], 0

        # The loop runs once per journal record (a million for a minute of one-event frames):
        # what it reads of self is read once, and the cursor is written back at the end.
        cursor = self.cursor
        hold_from, requested, held = self.hold_from, self._requested, self._held
        frame_kind = RecordKind.FRAME
        for record in records:
            seq = record.seq
            if seq > through:
                break
            if cursor is not None:
                if record.end_seq < cursor:
                    continue
                if seq > cursor:
                    flush()
                    frames.append(self._gap_frame(cursor, seq - 1, "not in the journal (damaged or deleted)",
                                                  record.received_ns))
            cursor = record.end_seq + 1
            kind = record.kind
            if kind is frame_kind:
                selector = requested if seq < hold_from or held is None else held
                try:
                    events = selector.select(record.data)
                except FrameError:
                    continue  # the router dropped it too
                if events:
                    if self.first_ns is None:
                        self.first_ns = record.received_ns
                    self.last_ns = record.received_ns
                    self.events += len(events)
                    run.extend(events)
                    size += sum(map(len, events)) + len(events)
                    if size >= REPLAY_FRAME_BYTES:
                        flush()
                if selector.saw_status:
                    statuses = _relayed_statuses(record.data)
                    if statuses:
                        flush()
                        frames.extend(statuses)
            elif kind is RecordKind.GAP:
                flush()
                frames.append(self._gap_frame(record.seq, record.end_seq, record.reason, record.received_ns))
            else:
                flush()
                status = UPSTREAM_DISCONNECTED if kind is RecordKind.UPSTREAM_LOST else UPSTREAM_CONNECTED
                frames.append(status_frame(status, record.reason))
        self.cursor = cursor
        flush()
        return frames

    def _gap_frame(self, first: int, last: int, why: str, received_ns: int | None) -> str:
        when = "" if received_ns is None else f" around {format_ns(received_ns)}"
        return status_frame(JOURNAL_GAP, f"journal records {first}..{last}{when} are missing from this replay "
                                         f"({why}): events received then are not in it")

    def partial_frame(self, reach_ns: int) -> str:
        """The status saying the journal reaches back only to ``reach_ns``, not to the start asked for."""
        return status_frame(REPLAY_PARTIAL, f"the journal reaches back to {format_ns(reach_ns)} "
                                            f"({reach_ns // 1_000_000} ms), not to {format_ns(self.request.from_ns)} "
                                            f"asked for: the replay starts there")

    def complete_frame(self) -> str:
        """The status that ends the replay, saying how many events it held and from when."""
        if self.request.from_seq is not None:
            assert self.through is not None
            span = "" if self.first_ns is None or self.last_ns is None else (
                f", received from {format_ns(self.first_ns)} to {format_ns(self.last_ns)}")
            return status_frame(REPLAY_COMPLETE, f"{self.events} events replayed from journal {self.request.journal}, "
                                                 f"through seq {self.through}{span}; live events follow")
        asked = f"{format_ns(self.request.from_ns)} ({self.request.from_ns // 1_000_000} ms)"
        if not self.events:
            message = f"0 events replayed: none of these channels received since {asked}; live events follow"
        else:
            assert self.first_ns is not None and self.last_ns is not None
            message = (f"{self.events} events replayed, received from {format_ns(self.first_ns)} to "
                       f"{format_ns(self.last_ns)}, asked from {asked}; live events follow")
        return status_frame(REPLAY_COMPLETE, message)


def _relayed_statuses(frame: str | bytes) -> list[str]:
    """The status frames the router relayed for ``frame`` (an upstream tier's outage notices)."""
    try:
        items = _read_statuses(frame)
    except msgspec.DecodeError:
        return []
    return [relayed_status_frame(item) for item in items
            if isinstance(item, dict) and item.get("ev") == "status" and item.get("status") in RELAYED_STATUSES]
