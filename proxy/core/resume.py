"""A downstream proxy's link resuming by its upstream tier's journal seq, without I/O.

The tier above marks how far the link has been sent (``journal_seq`` statuses, each a frame
of its own: the journal's id and the seq of the last record the link now has). When the link
comes back, its first subscribe of ``*`` asks for the records after the last mark
(``from_seq``, ``journal``: :class:`~proxy.core.protocol.SeqResume`); the tier above answers
with what it could not serve (``replay_partial``, ``journal_gap``), the records, then
``replay_complete``, then live. :class:`LinkResume` keeps the mark, builds the request,
takes all these statuses out of the stream (the proxy's clients never see them) and says
how the resume went (:class:`ResumeOutcome`), so that the tier can tell its clients whether
the outage cost them anything. docs/protocol.md, "Between the tiers", has the exchange.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs

from .protocol import SeqResume
from .replay import JOURNAL_GAP, JOURNAL_SEQ, REPLAY_COMPLETE, REPLAY_PARTIAL, RESUME_STATUSES

__all__ = ["LinkResume", "ResumeOutcome"]


@attrs.frozen
class ResumeOutcome:
    """How a resume went: from which seq of which journal it was asked, and why events were lost
    (the tier above's ``replay_partial`` and ``journal_gap`` messages; empty: nothing was lost)."""

    asked: SeqResume
    lost: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether the resume lost nothing."""
        return not self.lost


@attrs.define
class LinkResume:
    """The link's place in the upstream tier's journal, and the resume under way on a connection.

    ``position`` is the last mark read: (journal id, seq). :meth:`request` makes the resume
    for a new connection's first ``*`` subscribe; :meth:`read` takes a frame's statuses and
    says whether the frame was ours (taken out of the stream) and, at ``replay_complete``, how
    the resume went.
    """

    position: tuple[str, int] | None = None
    #: The resume asked on the current connection, until its replay_complete.
    asked: SeqResume | None = None
    _lost: list[str] = attrs.field(factory=list)

    def begin_connection(self) -> None:
        """A new connection: no resume is under way on it yet (the position is kept)."""
        self.asked, self._lost = None, []

    def request(self) -> SeqResume | None:
        """The resume to ask with the connection's ``*`` subscribe: the records after the last
        mark; None when there is no mark yet (the first connection: nothing to resume)."""
        if self.position is None:
            return None
        journal, seq = self.position
        self.asked, self._lost = SeqResume(seq + 1, journal), []
        return self.asked

    @property
    def resuming(self) -> bool:
        """Whether a resume was asked on this connection and its replay_complete has not come."""
        return self.asked is not None

    def read(self, events: Sequence[dict[str, Any]]) -> tuple[bool, ResumeOutcome | None]:
        """One frame's events (decoded): whether the frame is ours to take out of the stream (it
        holds nothing but resume statuses), and the resume's outcome once its replay_complete
        came. Marks are taken whenever they come; ``replay_partial``, ``journal_gap`` and
        ``replay_complete`` only while a resume is under way (otherwise they are not ours, and
        stay in the stream)."""
        if not events or any(event.get("ev") != "status" or event.get("status") not in RESUME_STATUSES
                             for event in events):
            return False, None
        if not self.resuming and any(event.get("status") != JOURNAL_SEQ for event in events):
            return False, None
        outcome = None
        for event in events:
            status = event.get("status")
            if status == JOURNAL_SEQ:
                seq, journal = event.get("seq"), event.get("journal")
                if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 and isinstance(journal, str):
                    self.position = (journal, seq)
            elif status in (REPLAY_PARTIAL, JOURNAL_GAP):
                self._lost.append(str(event.get("message", status)))
            elif status == REPLAY_COMPLETE and self.asked is not None:
                outcome = ResumeOutcome(self.asked, tuple(self._lost))
                self.asked, self._lost = None, []
        return True, outcome
