"""Polygon's markets as values, and the rules a connection's channel set must keep, without I/O.

Polygon (now Massive) serves each market at its own path and cluster
(``wss://socket.polygon.io/stocks``, ``/options``, ...), with one connection per
cluster per account. :data:`MARKET_TABLE` says, for each market, the event types
its feed sends, what each means, which field of an event holds its symbol, how
symbols are written, whether ``TYPE.*`` is allowed, and the per-connection caps
Polygon documents (options quotes: 1,000 contracts, no ``Q.*``); what is not
known is said in :attr:`Market.unknown`. The facts come from Polygon's public
WebSocket documentation and from its official Python client (``massive``: its
event models and the event types it expects per market).

:func:`screen` and :func:`change_refusal` apply a market's rules to one upstream
connection's channel set: which channels of a subscribe may be added, and whether
a whole change (channels added and removed) stays within the caps and wildcard
rules (``None``) or not (a sentence naming the limit). Both are pure: the caller
keeps the set. The proxy's own ``*`` and event types a market does not list are
not refused (Polygon acknowledges any channel; an unknown one brings nothing).
"""

from __future__ import annotations

from typing import AbstractSet, Final, Iterable, Mapping

import attrs

from .protocol import Channel

__all__ = [
    "OPTIONS_QUOTE_CAP",
    "EventType",
    "Market",
    "MARKET_TABLE",
    "MARKET_NAMES",
    "market",
    "Screened",
    "screen",
    "change_refusal",
]

#: Polygon's documented cap on options quotes: "a maximum of 1,000 option contracts per connection".
OPTIONS_QUOTE_CAP: Final = 1_000


@attrs.frozen
class EventType:
    """One event type of a market's feed.

    ``code`` is its ``ev`` (and its channels' type: ``T`` in ``T.AAPL``);
    ``symbol_field`` the event field that holds the symbol a channel names;
    ``wildcard`` whether Polygon accepts ``CODE.*`` for it in this market; ``cap``
    the most symbols of this type one connection may hold (None: no cap known).
    """

    code: str
    meaning: str
    symbol_field: str
    wildcard: bool = True
    cap: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        [attrs.validators.instance_of(int), attrs.validators.ge(1)]))


@attrs.frozen
class Market:
    """One of Polygon's markets: its path, symbols and event types, and what is not known of it."""

    name: str
    #: How symbols are written in this market's channels and events, with examples.
    symbols: str
    #: What one symbol is called in this market, for refusals ("contracts", "pairs").
    symbol_noun: str
    event_types: tuple[EventType, ...]
    #: What is not known of this market's feed (said, not guessed).
    unknown: str = ""

    @property
    def path(self) -> str:
        """The path this market is served at: ``/stocks``, ``/options``, ..."""
        return f"/{self.name}"

    @property
    def codes(self) -> tuple[str, ...]:
        """The event types of this market, in the table's order."""
        return tuple(event_type.code for event_type in self.event_types)

    def event_type(self, code: str) -> EventType | None:
        """The event type ``code`` of this market, or None when the market has no such type."""
        return next((event_type for event_type in self.event_types if event_type.code == code), None)

    def wildcard_allowed(self, code: str) -> bool:
        """Whether ``CODE.*`` is allowed here; a type this market does not list is not refused."""
        event_type = self.event_type(code)
        return event_type is None or event_type.wildcard

    def caps(self, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
        """Per event type, the most symbols one connection may hold: Polygon's caps, then ``overrides``."""
        caps = {event_type.code: event_type.cap for event_type in self.event_types if event_type.cap is not None}
        caps.update(overrides or {})
        return caps


_T = EventType("T", "trades", "sym")
_A = EventType("A", "aggregates per second", "sym")
_AM = EventType("AM", "aggregates per minute", "sym")
_FMV = EventType("FMV", "fair market value (business plans)", "sym")

MARKET_TABLE: Final[dict[str, Market]] = {market.name: market for market in (
    Market(
        "stocks", "tickers as listed: AAPL, BRK.A", "tickers",
        (_T, EventType("Q", "quotes (NBBO)", "sym"), _A, _AM,
         EventType("LULD", "limit up-limit down bands", "T"), _FMV,
         EventType("NOI", "net order imbalances", "T")),
        unknown="The business feeds (other hosts) send the same types; the launchpad feed adds LV (sym).",
    ),
    Market(
        "options", "OCC contracts with the O: prefix: O:SPY251219C00650000 (underlying, expiry "
        "YYMMDD, C or P, strike times 1000 in 8 digits)", "contracts",
        (_T, EventType("Q", "quotes", "sym", wildcard=False, cap=OPTIONS_QUOTE_CAP), _A, _AM, _FMV),
        unknown="What Polygon answers to a Q.* or to a quote subscribe over the cap (status and words) "
                "is not documented; the proxy and the simulator answer `error`.",
    ),
    Market(
        "forex", "pairs with a slash in events: EUR/USD (C's `p`, CA's and CAS's `pair`)", "pairs",
        (EventType("C", "quotes", "p"), EventType("CA", "aggregates per minute", "pair"),
         EventType("CAS", "aggregates per second", "pair"), _FMV),
        unknown="Polygon's documentation asks for pairs as {from}-{to} (C.EUR-USD) while its events and "
                "its examples write EUR/USD; whether C.EUR-USD brings events written EUR/USD is not known "
                "(routing compares the channel's symbol with the event's field exactly).",
    ),
    Market(
        "crypto", "pairs with a dash: BTC-USD (in channels and in events' `pair`; not REST's X:BTCUSD)",
        "pairs",
        (EventType("XT", "trades", "pair"), EventType("XQ", "quotes", "pair"),
         EventType("XA", "aggregates per minute", "pair"), EventType("XAS", "aggregates per second", "pair"),
         EventType("XL2", "level 2 book", "pair"), _FMV),
        unknown="Whether XL2.* is allowed, and how large XL2 books are, is not documented.",
    ),
    Market(
        "indices", "index tickers with the I: prefix: I:SPX, I:NDX", "tickers",
        (EventType("V", "index values", "T"), _A, _AM),
    ),
    Market(
        "futures", "contract tickers: ESZ5 (root, month code, year)", "contracts",
        (_T, EventType("Q", "quotes", "sym"), _A, _AM),
        unknown="Futures WebSockets are in beta: the ticker form above is not confirmed, and the "
                "official client also knows per-exchange paths (/futures/cme, /futures/cbot, "
                "/futures/nymex, /futures/comex), which are not in this table.",
    ),
)}

#: The markets' names, in the table's order (the paths are ``/`` + name).
MARKET_NAMES: Final = tuple(MARKET_TABLE)


def market(name: str) -> Market:
    """The market called ``name``; ValueError naming the markets when there is none."""
    try:
        return MARKET_TABLE[name]
    except KeyError:
        raise ValueError(f"no market {name!r}: the markets are {', '.join(MARKET_NAMES)}") from None


@attrs.frozen
class Screened:
    """A subscribe's channels split by a market's rules: those that may be added, in order, and
    those refused, each with the sentence that says why."""

    allowed: tuple[Channel, ...]
    refused: tuple[tuple[Channel, str], ...]


def _wildcard_refusal(market: Market, event_type: EventType, caps: Mapping[str, int]) -> str:
    cap = caps.get(event_type.code)
    named = f"name {market.symbol_noun}, at most {cap:,} a connection" if cap else f"name {market.symbol_noun}"
    return (f"{event_type.code}.* is not allowed on {market.name}: Polygon has no wildcard for "
            f"{market.name} {event_type.meaning}; {named}")


def _cap_refusal(market: Market, code: str, cap: int, holding: int, connections: int = 1) -> str:
    event_type = market.event_type(code)
    meaning = f" ({event_type.meaning})" if event_type is not None else ""
    if connections > 1:
        return (f"{market.name} {code}{meaning} is limited to {cap // connections:,} {market.symbol_noun} a "
                f"connection, {cap:,} over this market's {connections} connections; this would hold {holding:,}")
    return (f"{market.name} {code}{meaning} is limited to {cap:,} {market.symbol_noun} a connection; "
            f"this would hold {holding:,}")


def _held_counts(held: AbstractSet[Channel], codes: AbstractSet[str]) -> dict[str, int]:
    """How many symbols (not wildcards) of each capped type in ``codes`` the set holds."""
    counts = dict.fromkeys(codes, 0)
    for ev_type, symbol in held:
        if ev_type in counts and symbol != "*":
            counts[ev_type] += 1
    return counts


def screen(
    market: Market, held: AbstractSet[Channel], added: Iterable[Channel], *,
    caps: Mapping[str, int] | None = None,
) -> Screened:
    """Which of ``added`` (one subscribe, in order) a connection holding ``held`` may add.

    A ``TYPE.*`` the market does not allow is refused; a channel of a capped type
    is allowed while the connection's count of that type stays within the cap
    (channels already held, and repeats, count once), refused after that. ``caps``
    replaces Polygon's caps per type (see :meth:`Market.caps`). Of ``held`` only the
    channels of capped types are read, so a caller that keeps those apart may pass
    just them (a connection may hold 100,000 others). Returns a :class:`Screened`;
    raises nothing.
    """
    limits = market.caps(caps)
    added = tuple(added)
    capped = {channel.ev_type for channel in added if channel.ev_type in limits}
    counts = _held_counts(held, capped)
    taken: set[Channel] = set()
    allowed: list[Channel] = []
    refused: list[tuple[Channel, str]] = []
    for channel in added:
        ev_type, symbol = channel
        if channel.is_everything:
            allowed.append(channel)
            continue
        event_type = market.event_type(ev_type)
        if symbol == "*" and event_type is not None and not event_type.wildcard:
            refused.append((channel, _wildcard_refusal(market, event_type, limits)))
            continue
        if ev_type in limits and symbol != "*" and channel not in held and channel not in taken:
            if counts[ev_type] >= limits[ev_type]:
                refused.append((channel, _cap_refusal(market, ev_type, limits[ev_type], counts[ev_type] + 1)))
                continue
            counts[ev_type] += 1
        taken.add(channel)
        allowed.append(channel)
    return Screened(tuple(allowed), tuple(refused))


def change_refusal(
    market: Market, held: AbstractSet[Channel], added: Iterable[Channel] = (),
    removed: Iterable[Channel] = (), *, caps: Mapping[str, int] | None = None, connections: int = 1,
) -> str | None:
    """Whether one connection's channel set may change from ``held`` to ``held - removed | added``.

    None when it may; otherwise one sentence naming the first limit the change
    breaks (a wildcard the market does not allow, or a cap with the count the set
    would reach), for a refusal that applies nothing of the change. Only what is
    added is judged: removing channels is always allowed. A caller that sends a change's subscribes before its
    unsubscribes (so that nothing wanted is uncovered meanwhile) must judge the
    subscribes alone, with ``removed`` empty. A set over a cap (one lowered since)
    may shrink, but takes nothing new of that type until it is within the cap. ``connections``
    (the set spread over that many upstream connections) multiplies every cap.
    Raises nothing.
    """
    limits = {code: cap * connections for code, cap in market.caps(caps).items()}
    gone = set(removed)
    after = set(held) - gone
    new = [channel for channel in dict.fromkeys(added) if channel not in after]
    for channel in new:
        event_type = market.event_type(channel.ev_type)
        if channel.is_type_wildcard and event_type is not None and not event_type.wildcard:
            return _wildcard_refusal(market, event_type, limits)
    adding = {code: sum(1 for channel in new if channel.ev_type == code and not channel.is_type_wildcard)
              for code in limits}
    counts = _held_counts(after, {code for code, count in adding.items() if count})
    for code, count in counts.items():
        if count + adding[code] > limits[code]:
            return _cap_refusal(market, code, limits[code], count + adding[code], connections)
    return None
