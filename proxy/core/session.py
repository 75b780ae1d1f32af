"""One client's control conversation, without I/O: what to answer and what to do.

A :class:`SessionState` takes each text or binary frame a client sends and
returns a :class:`Reaction`: frames to answer with, channels to add or drop,
and whether to close (with which WebSocket code). Auth is checked against
configured keys in constant time. Nothing here touches a socket, so every path
is tested directly.
"""

from __future__ import annotations

import enum
from typing import Collection

import attrs

from . import protocol
from .errors import ClientMessageError, CloseReason
from .entitlements import KeyBook, KeyEntry
from .keys import key_matches
from .protocol import Auth, Channel, Subscribe, Unsubscribe

__all__ = [
    "Outcome",
    "Phase",
    "Reaction",
    "SessionState",
]



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


class Phase(enum.Enum):
    """Where a client's conversation is: before auth, authenticated, or closed."""

    AWAITING_AUTH = "awaiting_auth"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@attrs.frozen
class Reaction:
    """What a control message leads to: frames to answer, channels to add or drop, a close, its outcome."""
    replies: tuple[str, ...] = ()
    subscribe: tuple[Channel, ...] = ()
    unsubscribe: tuple[Channel, ...] = ()
    close_code: CloseReason | None = None
    close_reason: str = ""
    #: What it came to (counted by the tier).
    outcome: Outcome = Outcome.OK


@attrs.define
class SessionState:
    """One client's control state: auth phase, its channels, and its control-message budget.

    Control messages are rate-limited by a token bucket (``control_rate`` a second,
    bursts of ``control_burst``): one over the budget is answered with an error and
    ignored; after ``flood_limit`` such refusals the client is closed (1008).
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
    flood_limit: int = 100
    phase: Phase = Phase.AWAITING_AUTH
    channels: set[Channel] = attrs.field(factory=set)
    refused_for_rate: int = 0
    _tokens: float | None = None
    _last: float = 0.0

    def receive(self, message: str | bytes, now: float = 0.0) -> Reaction:
        """React to one message from the client (``now`` for the rate limit); never raises: bad input is an error status."""
        if self.phase is Phase.CLOSED:
            return Reaction()
        if not self._take_token(now):
            self.refused_for_rate += 1
            if self.refused_for_rate > self.flood_limit:
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
                message, max_channels=self.max_channels_per_message
            )
        except ClientMessageError as error:
            if error.close_code is not None:  # one the protocol says must end the connection
                self.phase = Phase.CLOSED
                return Reaction(replies=(protocol.error_frame(error.message),), close_code=error.close_code,
                                close_reason=error.kind, outcome=Outcome.ERROR)
            return Reaction(replies=(protocol.error_frame(error.message),), outcome=Outcome.ERROR)
        if isinstance(action, Auth):
            return self._auth(action)
        if self.phase is not Phase.AUTHENTICATED:
            return Reaction(
                replies=(protocol.error_frame(
                    f"not authenticated: send auth before {type(action).__name__.lower()}"),),
                outcome=Outcome.ERROR,
            )
        if isinstance(action, Subscribe):
            if self.key is not None:
                refused = self.key.refused(action.channels)
                if refused:
                    shown = ", ".join(channel.text for channel in refused[:10])
                    more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
                    return Reaction(replies=(protocol.error_frame(
                        f"not entitled: key {self.key.name!r} may not subscribe {shown}{more}; "
                        "nothing of this subscribe was applied"),), outcome=Outcome.ERROR)
            new = [channel for channel in action.channels if channel not in self.channels]
            if len(self.channels) + len(new) > self.max_channels_per_client:
                return Reaction(replies=(protocol.error_frame(
                    f"channel limit: this connection holds {len(self.channels)} channels and may hold "
                    f"{self.max_channels_per_client}; nothing of this subscribe was applied"),),
                    outcome=Outcome.ERROR)
            self.channels.update(new)
            warning = protocol.lowercase_warning(action.channels)
            return Reaction(
                replies=(protocol.subscription_frame("subscribed", action.channels),)
                + ((warning,) if warning else ()),
                subscribe=action.channels,
            )
        assert isinstance(action, Unsubscribe)
        self.channels.difference_update(action.channels)
        return Reaction(
            replies=(protocol.subscription_frame("unsubscribed", action.channels),),
            unsubscribe=action.channels,
        )

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

    def _take_token(self, now: float) -> bool:
        if self._tokens is None:
            self._tokens, self._last = self.control_burst, now
        self._tokens = min(self.control_burst, self._tokens + (now - self._last) * self.control_rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
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
            return Reaction(replies=(protocol.AUTH_SUCCESS,), outcome=Outcome.AUTHENTICATED)
        self.phase = Phase.CLOSED
        return Reaction(
            replies=(protocol.AUTH_FAILED,),
            close_code=CloseReason.POLICY_VIOLATION,
            close_reason="authentication failed",
            outcome=Outcome.AUTH_FAILED,
        )

    def timed_out(self) -> Reaction:
        """No auth arrived in time: Polygon's ``auth_timeout``, then close."""
        self.phase = Phase.CLOSED
        return Reaction(
            replies=(protocol.AUTH_TIMEOUT,),
            close_code=CloseReason.POLICY_VIOLATION,
            close_reason="authentication timeout",
            outcome=Outcome.AUTH_TIMEOUT,
        )
