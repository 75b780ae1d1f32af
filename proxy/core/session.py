"""One client's control conversation, without I/O: what to answer and what to do.

A :class:`SessionState` takes each text or binary frame a client sends and
returns a :class:`Reaction`: frames to answer with, channels to add or drop,
and whether to close (with which WebSocket code). Auth is checked against
configured keys in constant time. Nothing here touches a socket, so every path
is tested directly.
"""

from __future__ import annotations

import enum
import time
from typing import Callable, Collection, Generator, Sequence

import attrs

from . import protocol
from .errors import ClientMessageError, CloseReason
from .entitlements import KeyBook, KeyEntry
from .keys import key_matches
from .protocol import EVERYTHING_CHANNEL, Auth, Channel, ChannelRequest, SeqResume
from .replay import REPLAY_COMPLETE, REPLAY_PARTIAL, ReplayRequest

__all__ = [
    "CHANNELS_PER_STEP",
    "REPLAY_CONTROL_COST",
    "Outcome",
    "Phase",
    "ProxyLimits",
    "Reaction",
    "SessionState",
]

#: Channels handled per step of a control message (:meth:`SessionState.receive_in_steps`):
#: about a millisecond of work, after which the router may run.
CHANNELS_PER_STEP = 500
#: A subscribe with "from" (a replay) counts as this many control messages against the
#: client's budget: a replay reads and sends up to REPLAY_MAX_SECONDS of the journal, so at
#: the default 50 a second a client may begin at most 5 replays a second (10 in a burst).
REPLAY_CONTROL_COST = 10


class Outcome(enum.StrEnum):
    """What a control message came to, for the tier's counters and the hub's next step."""

    OK = "ok"
    AUTHENTICATED = "authenticated"  # auth just succeeded
    ERROR = "error"  # answered with an error status
    AUTH_FAILED = "auth_failed"
    AUTH_TIMEOUT = "auth_timeout"
    RATE_LIMITED = "rate_limited"  # over the control-message budget: ignored
    FLOOD = "flood"  # over it for too long: closed
    REFUSED = "refused"  # over a connection limit: closed
    REPLAY_REFUSED = "replay_refused"  # a subscribe with "from" answered with an error: nothing applied


class Phase(enum.Enum):
    """Where a client's conversation is: before auth, authenticated, or closed."""

    AWAITING_AUTH = "awaiting_auth"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@attrs.frozen
class Reaction:
    """What a control message leads to: frames to answer, channels to add or drop, a close, its outcome."""
    replies: tuple[str, ...] = ()
    #: Channels this message added to the session's set, and took out of it (the answer still
    #: names every channel of the message, as Polygon's does).
    subscribe: tuple[Channel, ...] = ()
    unsubscribe: tuple[Channel, ...] = ()
    close_code: CloseReason | None = None
    close_reason: str = ""
    #: What it came to (counted by the tier).
    outcome: Outcome = Outcome.OK
    #: A subscribe with "from": the replay to serve after the answer (docs/protocol.md).
    replay: ReplayRequest | None = None


@attrs.frozen
class ProxyLimits:
    """The limits of a downstream proxy tier's link, which carries the union of its clients' demand.

    A link authenticates as a proxy with the ``role`` of :class:`~proxy.core.protocol.Auth`,
    which our filtered tier sends: an explicit marker rather than a guess from its
    channels (a proxy does subscribe to ``*``, but so may any client that wants
    everything, and the limits must be known before its first subscribe). It is a claim
    any holder of an accepted key may make; what it buys is a larger budget on that one
    connection, and the work of any control message is done in steps
    (:meth:`SessionState.receive_in_steps`), so no budget lets a connection hold the router.
    """

    #: Channels the link may hold: the union of thousands of clients' channels.
    max_channels: int = 1_000_000
    #: Control messages a second (bursts of twice that); our links pace themselves far below.
    control_rate: float = 1000.0


@attrs.define
class SessionState:
    """One client's control state: auth phase, its channels, and its control-message budget.

    Control messages are rate-limited by a token bucket (``control_rate`` a second,
    bursts of ``control_burst``): one over the budget is answered with an error and
    ignored; after ``flood_limit`` such refusals the client is closed (1008). A downstream
    proxy tier that says so at auth gets ``proxy_limits`` instead, and is never closed
    for a flood: a refused message is answered, and the proxy relays the refusal to the
    clients whose channels it carried (closing the link would cost every one of them data).
    """

    accepted_keys: frozenset[str]
    allow_any_key: bool = False
    #: Named keys with entitlements (API_KEYS_FILE), besides the unnamed ``accepted_keys``.
    key_book: KeyBook = attrs.field(factory=KeyBook)
    #: The market this connection is for, checked against a named key's ``markets``.
    market: str = "stocks"
    #: The named key it authenticated with; None for an unnamed key (or before auth).
    key: KeyEntry | None = None
    max_channels_per_message: int = 10_000
    max_channels_per_client: int = 10_000
    control_rate: float = 50.0
    control_burst: float = 100.0
    flood_limit: int | None = 100
    #: Limits for a client that authenticates as a downstream proxy; None: proxies are clients.
    proxy_limits: ProxyLimits | None = None
    downstream_proxy: bool = False
    #: How far back a subscribe's "from" may reach, in seconds (REPLAY_MAX_SECONDS capped by what
    #: the journal keeps); 0: the tier keeps no journal, and "from" is refused.
    replay_max_seconds: float = 0.0
    #: Set by the tier while a replay is being served on this connection: another is refused.
    replaying: bool = False
    #: The upstream's rules for a subscribe's new channels (a market's caps and wildcards):
    #: None to let them in, else the sentence that refuses the whole subscribe. Called last,
    #: once every other check passed: letting channels in may reserve room under a cap.
    upstream_screen: Callable[[Sequence[Channel]], str | None] | None = None
    phase: Phase = Phase.AWAITING_AUTH
    channels: set[Channel] = attrs.field(factory=set)
    refused_for_rate: int = 0
    _tokens: float | None = None
    _last: float = 0.0

    def receive(self, message: str | bytes, now: float = 0.0, *, wall_ns: int | None = None) -> Reaction:
        """React to one message from the client (``now`` for the rate limit) at once; never raises:
        bad input is an error status (tests; tiers use :meth:`receive_in_steps`)."""
        return protocol.run_steps(self.receive_in_steps(message, now, step=0, wall_ns=wall_ns))

    def receive_in_steps(
        self, message: str | bytes, now: float = 0.0, *, step: int = CHANNELS_PER_STEP, wall_ns: int | None = None
    ) -> Generator[None, None, Reaction]:
        """React to one message in steps of ``step`` channels, yielding between steps.

        A reader and the router share one thread: parsing a 10,000-channel subscribe
        and writing its 720 kB answer in one go would hold routing for all clients
        meanwhile, so the caller may let others run at each yield. The session's
        channel set changes in one step, after every channel was checked. ``wall_ns``
        is the wall clock (ns since the epoch; now when None) a subscribe's "from" is
        measured against.
        """
        if self.phase is Phase.CLOSED:
            return Reaction()
        if not self._take_token(now):
            self.refused_for_rate += 1
            if self.flood_limit is not None and self.refused_for_rate > self.flood_limit:
                self.phase = Phase.CLOSED
                return Reaction(
                    replies=(protocol.error_frame("control message flood: closing the connection"),),
                    close_code=CloseReason.POLICY_VIOLATION, close_reason="control message flood",
                    outcome=Outcome.FLOOD,
                )
            return Reaction(replies=(protocol.error_frame(
                f"rate limited: at most {self.control_rate:g} control messages a second; "
                "this one was ignored"),), outcome=Outcome.RATE_LIMITED)
        try:
            action = protocol.parse_client_message(
                message, max_channels=self.max_channels_per_message, parse_channels=False
            )
        except ClientMessageError as error:
            if error.close_code is not None:  # one the protocol says must end the connection
                self.phase = Phase.CLOSED
                return Reaction(replies=(protocol.error_frame(error.message),), close_code=error.close_code,
                                close_reason=error.kind, outcome=Outcome.ERROR)
            outcome = Outcome.REPLAY_REFUSED if error.kind == "bad_from" else Outcome.ERROR
            return Reaction(replies=(protocol.error_frame(error.message),), outcome=outcome)
        if isinstance(action, Auth):
            return self._auth(action)
        assert isinstance(action, ChannelRequest)
        if self.phase is not Phase.AUTHENTICATED:
            return Reaction(
                replies=(protocol.error_frame(f"not authenticated: send auth before {action.action}"),),
                outcome=Outcome.ERROR,
            )
        replaying = action.from_ms is not None or action.resume is not None
        refused_outcome = Outcome.REPLAY_REFUSED if replaying else Outcome.ERROR
        try:
            channels = yield from protocol.parse_channel_list_steps(
                action.params, max_channels=self.max_channels_per_message, step=step
            )
        except ClientMessageError as error:
            return Reaction(replies=(protocol.error_frame(error.message),), outcome=refused_outcome)
        held = self.channels
        if action.action == "subscribe":
            replay = None
            unserved: tuple[str, ...] = ()  # a resume this tier cannot serve: said after the answer
            if action.from_ms is not None:
                replay_or_error = self._replay_request(action.from_ms, channels, wall_ns)
                if isinstance(replay_or_error, str):
                    return Reaction(replies=(protocol.error_frame(replay_or_error),), outcome=refused_outcome)
                replay = replay_or_error
            elif action.resume is not None:
                resume_or_error = self._seq_resume_request(action.resume, channels)
                if isinstance(resume_or_error, str):
                    return Reaction(replies=(protocol.error_frame(resume_or_error),), outcome=refused_outcome)
                if isinstance(resume_or_error, tuple):
                    unserved = resume_or_error
                else:
                    replay = resume_or_error
            if self.key is not None:
                refused = self.key.refused(channels)
                if refused:
                    shown = ", ".join(channel.text for channel in refused[:10])
                    more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
                    return Reaction(replies=(protocol.error_frame(
                        f"not entitled: key {self.key.name!r} may not subscribe {shown}{more}; "
                        "nothing of this subscribe was applied"),), outcome=refused_outcome)
            new = [channel for channel in channels if channel not in held]
            if len(held) + len(new) > self.max_channels_per_client:
                return Reaction(replies=(protocol.error_frame(
                    f"channel limit: this connection holds {len(held)} channels and may hold "
                    f"{self.max_channels_per_client}; nothing of this subscribe was applied"),),
                    outcome=refused_outcome)
            if replay is not None and not self._take_token(now, REPLAY_CONTROL_COST - 1):
                return Reaction(replies=(protocol.error_frame(
                    f'rate limited: a subscribe with "from" counts as {REPLAY_CONTROL_COST} control messages, '
                    f"at most {self.control_rate:g} a second; nothing of this subscribe was applied"),),
                    outcome=Outcome.REPLAY_REFUSED)
            if self.upstream_screen is not None and new:
                refusal = self.upstream_screen(new)
                if refusal is not None:
                    return Reaction(replies=(protocol.error_frame(
                        f"{refusal}; nothing of this subscribe was applied"),), outcome=refused_outcome)
            held.update(new)
            reply = yield from protocol.subscription_frame_steps("subscribed", channels, step=step)
            warning = protocol.lowercase_warning(channels)
            return Reaction(replies=(reply,) + ((warning,) if warning else ()) + unserved, subscribe=tuple(new),
                            replay=replay)
        gone = [channel for channel in channels if channel in held]
        held.difference_update(gone)
        reply = yield from protocol.subscription_frame_steps("unsubscribed", channels, step=step)
        return Reaction(replies=(reply,), unsubscribe=tuple(gone))

    def _replay_request(self, from_ms: float, channels: tuple[Channel, ...],
                        wall_ns: int | None) -> ReplayRequest | str:
        """The replay a subscribe's ``from`` asks for, or why it is refused (an error's text)."""
        applied = "nothing of this subscribe was applied"
        if self.replay_max_seconds <= 0:
            return f'this proxy keeps no journal to resume from, so "from" cannot be served; {applied}'
        if EVERYTHING_CHANNEL in channels:
            return f'"from" cannot replay the * channel (every event): name the channels to replay; {applied}'
        if self.replaying:
            return f'a replay is already running on this connection: wait for its replay_complete; {applied}'
        now_ns = time.time_ns() if wall_ns is None else wall_ns
        # through whole µs, so that an integer of ms (the usual) becomes exactly that many ns
        offset_ns = round(from_ms * 1000) * 1000
        from_ns = offset_ns if from_ms >= 0 else now_ns + offset_ns
        shown = f"{from_ms:.0f}" if from_ms.is_integer() else f"{from_ms}"
        if from_ns > now_ns:
            return (f'"from" {shown} is in the future (it is {now_ns // 1_000_000} ms since the epoch here); '
                    f"{applied}")
        age = (now_ns - from_ns) / 1e9
        if age > self.replay_max_seconds:
            return (f'"from" {shown} is {age:.0f} s ago; this proxy replays at most the last '
                    f"{self.replay_max_seconds:g} s (the least of REPLAY_MAX_SECONDS and what its journal keeps: "
                    f"JOURNAL_MEMORY_SECONDS, or JOURNAL_RETENTION_HOURS with JOURNAL_DIR); ask from within it; {applied}")
        return ReplayRequest(from_ns=from_ns, from_ms=from_ms, channels=channels)

    def _seq_resume_request(self, resume: SeqResume,
                            channels: tuple[Channel, ...]) -> ReplayRequest | tuple[str, ...] | str:
        """The replay a downstream proxy's ``from_seq`` asks for; the statuses that say it cannot be
        served (this tier keeps no journal: the subscribe is applied all the same, since the link
        needs its ``*``); or why it is refused (an error's text: not a proxy's link, no ``*``)."""
        applied = "nothing of this subscribe was applied"
        if not self.downstream_proxy:
            return (f'"from_seq" resumes a downstream proxy\'s link (one that authenticated with "role":"proxy"); '
                    f'a client resumes with "from" (milliseconds since the epoch); {applied}')
        if EVERYTHING_CHANNEL not in channels:
            return f'"from_seq" resumes the * channel: the subscribe must hold *; {applied}'
        if self.replaying:
            return f'a replay is already running on this connection: wait for its replay_complete; {applied}'
        if self.replay_max_seconds <= 0:
            return (protocol.status_frame(REPLAY_PARTIAL, f"cannot resume from seq {resume.from_seq} of journal "
                                                          f"{resume.journal}: this proxy serves no replay (it keeps "
                                                          "no journal, or REPLAY_MAX_SECONDS=0); the events in "
                                                          "between are lost"),
                    protocol.status_frame(REPLAY_COMPLETE, "0 events replayed; live events follow"))
        return ReplayRequest(from_ns=0, from_ms=0.0, channels=channels, from_seq=resume.from_seq,
                             journal=resume.journal)

    def drop(self, channels: Collection[Channel]) -> None:
        """Forget channels the tier could not serve (upstream refused them)."""
        self.channels.difference_update(channels)

    def revoke(self, book: KeyBook) -> Reaction | None:
        """After the key file changed: what to do about this session, or None if nothing changes.

        A named key that is gone closes the session with a status saying why; channels
        the key is no longer entitled to are unsubscribed with a status; otherwise the
        session carries on with the key's new entitlements.
        """
        self.key_book = book
        if self.key is None:
            return None
        current = next((entry for entry in book.entries if entry.sha256 == self.key.sha256), None)
        if current is None:
            name, self.key, self.phase = self.key.name, None, Phase.CLOSED
            return Reaction(
                replies=(protocol.status_frame("auth_revoked", f"key {name!r} was removed from the key file"),),
                close_code=CloseReason.POLICY_VIOLATION, close_reason="key revoked", outcome=Outcome.AUTH_FAILED,
            )
        self.key = current
        dropped = tuple(sorted(current.refused(self.channels), key=lambda c: (c.ev_type, c.symbol)))
        if not dropped:
            return None
        self.channels.difference_update(dropped)
        return Reaction(
            replies=(protocol.error_frame(
                f"not entitled any more: key {current.name!r} lost {', '.join(c.text for c in dropped[:10])}"
                + (f" and {len(dropped) - 10} more" if len(dropped) > 10 else "") + "; unsubscribed"),),
            unsubscribe=dropped,
        )

    def _take_token(self, now: float, count: int = 1) -> bool:
        if self._tokens is None:
            self._tokens, self._last = self.control_burst, now
        self._tokens = min(self.control_burst, self._tokens + (now - self._last) * self.control_rate)
        self._last = now
        if self._tokens >= count:
            self._tokens -= count
            return True
        return False

    def _auth(self, action: Auth) -> Reaction:
        if self.phase is Phase.AUTHENTICATED:
            return Reaction(replies=(protocol.error_frame("already authenticated"),), outcome=Outcome.ERROR)
        named = self.key_book.identify(action.api_key) if len(self.key_book) else None
        if named is not None and not named.serves(self.market):
            self.phase = Phase.CLOSED
            return Reaction(
                replies=(protocol.status_frame(
                    "auth_failed", f"key {named.name!r} is not entitled to the {self.market} market"),),
                close_code=CloseReason.POLICY_VIOLATION, close_reason="market not entitled", outcome=Outcome.AUTH_FAILED,
            )
        if named is not None or self.allow_any_key or key_matches(action.api_key, self.accepted_keys):
            self.phase = Phase.AUTHENTICATED
            self.key = named
            if action.role == protocol.PROXY_ROLE and self.proxy_limits is not None:
                self._become_proxy(self.proxy_limits)
            return Reaction(replies=(protocol.AUTH_SUCCESS,), outcome=Outcome.AUTHENTICATED)
        self.phase = Phase.CLOSED
        return Reaction(
            replies=(protocol.AUTH_FAILED,),
            close_code=CloseReason.POLICY_VIOLATION,
            close_reason="authentication failed",
            outcome=Outcome.AUTH_FAILED,
        )

    def _become_proxy(self, limits: ProxyLimits) -> None:
        self.downstream_proxy = True
        self.max_channels_per_client = limits.max_channels
        self.control_rate, self.control_burst = limits.control_rate, 2 * limits.control_rate
        self._tokens = self.control_burst
        self.flood_limit = None

    def timed_out(self) -> Reaction:
        """No auth arrived in time: Polygon's ``auth_timeout``, then close."""
        self.phase = Phase.CLOSED
        return Reaction(
            replies=(protocol.AUTH_TIMEOUT,),
            close_code=CloseReason.POLICY_VIOLATION,
            close_reason="authentication timeout",
            outcome=Outcome.AUTH_TIMEOUT,
        )
