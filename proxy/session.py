"""One client's control conversation, without I/O: what to answer and what to do.

A :class:`SessionState` takes each text or binary frame a client sends and
returns a :class:`Reaction`: frames to answer with, channels to add or drop,
and whether to close (with which WebSocket code). Auth is checked against
configured keys in constant time. Nothing here touches a socket, so every path
is tested directly.
"""

from __future__ import annotations

import enum
import hmac
from typing import Collection, Generator

import attrs

from . import protocol
from .protocol import Auth, Channel, ChannelRequest, ProtocolError

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013
#: Channels handled per step of a control message (:meth:`SessionState.receive_in_steps`):
#: about a millisecond of work, after which the router may run.
CHANNELS_PER_STEP = 500


class Phase(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@attrs.frozen
class Reaction:
    replies: tuple[str, ...] = ()
    subscribe: tuple[Channel, ...] = ()
    unsubscribe: tuple[Channel, ...] = ()
    close_code: int | None = None
    close_reason: str = ""
    #: "ok", or what went wrong: "error", "auth_failed", "auth_timeout", "rate_limited" or
    #: "flood" (counted by the tier).
    outcome: str = "ok"


def key_matches(presented: str, accepted: Collection[str]) -> bool:
    """Constant-time comparison against every accepted key (no early exit on a match)."""
    presented_bytes = presented.encode()
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(presented_bytes, key.encode())
    return matched


@attrs.define
class SessionState:
    """One client's control state: auth phase, its channels, and its control-message budget.

    Control messages are rate-limited by a token bucket (``control_rate`` a second,
    bursts of ``control_burst``): one over the budget is answered with an error and
    ignored; after ``flood_limit`` such refusals the client is closed (1008).
    """

    accepted_keys: frozenset[str]
    allow_any_key: bool = False
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
        """React to one message at once (tests; tiers use :meth:`receive_in_steps`)."""
        return protocol.run_steps(self.receive_in_steps(message, now, step=0))

    def receive_in_steps(
        self, message: str | bytes, now: float = 0.0, *, step: int = CHANNELS_PER_STEP
    ) -> Generator[None, None, Reaction]:
        """React to one message in steps of ``step`` channels, yielding between steps.

        A reader and the router share one thread: parsing a 10,000-channel subscribe
        and writing its 720 kB answer in one go would hold routing for all clients
        meanwhile, so the caller may let others run at each yield. The session's
        channel set changes in one step, after every channel was checked.
        """
        if self.phase is Phase.CLOSED:
            return Reaction()
        if not self._take_token(now):
            self.refused_for_rate += 1
            if self.refused_for_rate > self.flood_limit:
                self.phase = Phase.CLOSED
                return Reaction(
                    replies=(protocol.error_frame("control message flood: closing the connection"),),
                    close_code=CLOSE_POLICY_VIOLATION, close_reason="control message flood",
                    outcome="flood",
                )
            return Reaction(replies=(protocol.error_frame(
                f"rate limited: at most {self.control_rate:g} control messages a second; "
                "this one was ignored"),), outcome="rate_limited")
        try:
            action = protocol.parse_client_message(
                message, max_channels=self.max_channels_per_message, parse_channels=False
            )
        except ProtocolError as error:
            return Reaction(replies=(protocol.error_frame(error.message),), outcome="error")
        if isinstance(action, Auth):
            return self._auth(action)
        assert isinstance(action, ChannelRequest)
        if self.phase is not Phase.AUTHENTICATED:
            return Reaction(
                replies=(protocol.error_frame(f"not authenticated: send auth before {action.action}"),),
                outcome="error",
            )
        try:
            channels = yield from protocol.parse_channel_list_steps(
                action.params, max_channels=self.max_channels_per_message, step=step
            )
        except ProtocolError as error:
            return Reaction(replies=(protocol.error_frame(error.message),), outcome="error")
        held = self.channels
        if action.action == "subscribe":
            new = [channel for channel in channels if channel not in held]
            if len(held) + len(new) > self.max_channels_per_client:
                return Reaction(replies=(protocol.error_frame(
                    f"channel limit: this connection holds {len(held)} channels and may hold "
                    f"{self.max_channels_per_client}; nothing of this subscribe was applied"),),
                    outcome="error")
            held.update(new)
            reply = yield from protocol.subscription_frame_steps("subscribed", channels, step=step)
            return Reaction(replies=(reply,), subscribe=tuple(new))
        gone = [channel for channel in channels if channel in held]
        held.difference_update(gone)
        reply = yield from protocol.subscription_frame_steps("unsubscribed", channels, step=step)
        return Reaction(replies=(reply,), unsubscribe=tuple(gone))

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
            return Reaction(replies=(protocol.error_frame("already authenticated"),), outcome="error")
        if self.allow_any_key or key_matches(action.api_key, self.accepted_keys):
            self.phase = Phase.AUTHENTICATED
            return Reaction(replies=(protocol.AUTH_SUCCESS,))
        self.phase = Phase.CLOSED
        return Reaction(
            replies=(protocol.AUTH_FAILED,),
            close_code=CLOSE_POLICY_VIOLATION,
            close_reason="authentication failed",
            outcome="auth_failed",
        )

    def timed_out(self) -> Reaction:
        """No auth arrived in time: Polygon's ``auth_timeout``, then close."""
        self.phase = Phase.CLOSED
        return Reaction(
            replies=(protocol.AUTH_TIMEOUT,),
            close_code=CLOSE_POLICY_VIOLATION,
            close_reason="authentication timeout",
            outcome="auth_timeout",
        )
