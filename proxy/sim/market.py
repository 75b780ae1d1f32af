"""Synthetic stock market data in Polygon's event formats, without I/O or wall clock.

:class:`MarketModel` draws symbols with Zipf-like activity (a few very busy
names, a long quiet tail), walks each price randomly, keeps quotes consistent
(bid < ask) and trades inside them, and emits ``T`` and ``Q`` continuously with
an occasional ``LULD`` and ``FMV``; ``A`` per second and ``AM`` per minute come
from the trades it made, and ``NOI`` (imbalances) once a minute from their own
random source, so the stream's bytes are what they were before NOI existed. The
caller supplies timestamps, so the same seed and the same calls give the same bytes.
"""

from __future__ import annotations

import itertools
import random
import string
from typing import Iterator

import attrs
import msgspec

__all__ = [
    "WELL_KNOWN",
    "PLACEHOLDER_MS",
    "PLACEHOLDER_BYTES",
    "Event",
    "synthetic_symbols",
    "MarketModel",
    "frame_of",
    "stamp",
    "prebuild",
]

WELL_KNOWN = ("AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "SPY", "QQQ")
#: A millisecond timestamp that pre-built frames carry until they are sent (13 digits, like now).
PLACEHOLDER_MS = 9_999_999_999_999
PLACEHOLDER_BYTES = b"9999999999999"
_encode = msgspec.json.encode


@attrs.frozen(slots=True)
class Event:
    """One event as it travels: its type, its symbol, its JSON bytes and its channel text."""

    ev: str
    sym: str
    raw: bytes
    channel: str = attrs.field(default=attrs.Factory(lambda self: f"{self.ev}.{self.sym}", takes_self=True))


def synthetic_symbols(count: int) -> tuple[str, ...]:
    """The well-known names first, then 3- and 4-letter tickers in a fixed order."""
    names = list(WELL_KNOWN[:count])
    letters = string.ascii_uppercase
    seen = set(names)
    for length in (3, 4):
        for letters_tuple in itertools.product(letters, repeat=length):
            if len(names) >= count:
                return tuple(names)
            name = "".join(letters_tuple)
            if name not in seen:
                names.append(name)
    return tuple(names)


@attrs.define
class _Bar:
    open: float
    high: float
    low: float
    close: float
    volume: int = 0
    notional: float = 0.0

    def add(self, price: float, size: int) -> None:
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        self.close = price
        self.volume += size
        self.notional += price * size


@attrs.define
class _SymbolState:
    price: float
    day_open: float
    day_volume: int = 0
    day_notional: float = 0.0
    second: _Bar | None = None
    minute: _Bar | None = None


class MarketModel:
    """Deterministic (per seed) generator of Polygon stock events."""

    TRADE_SHARE = 0.40
    RARE_SHARE = 0.01  # LULD and FMV together

    def __init__(self, symbols: tuple[str, ...], *, seed: int | None = None, zipf_s: float = 1.1):
        if not symbols:
            raise ValueError("the simulator needs at least one symbol")
        self.symbols = symbols
        self._random = random.Random(seed)
        weights = [1.0 / (rank ** zipf_s) for rank in range(1, len(symbols) + 1)]
        self._cumulative = list(itertools.accumulate(weights))
        self._state: dict[str, _SymbolState] = {}
        self._sequence = itertools.count(1)
        self._trade_ids = itertools.count(1)
        # NOI draws from its own source: adding it left the seeded stream's bytes unchanged.
        self._imbalance_random = random.Random(None if seed is None else f"{seed}:NOI")
        self._imbalance_sequence = itertools.count(1)

    def _symbol_state(self, symbol: str) -> _SymbolState:
        state = self._state.get(symbol)
        if state is None:
            price = round(self._random.uniform(5, 500), 2)
            state = self._state[symbol] = _SymbolState(price=price, day_open=price)
        return state

    def stream_events(self, count: int, now_ms: int) -> list[Event]:
        """``count`` events of the continuous stream (T, Q, now and then LULD or FMV)."""
        rnd = self._random
        chosen = rnd.choices(self.symbols, cum_weights=self._cumulative, k=count)
        draws = [rnd.random() for _ in range(count)]
        return [self._one_event(symbol, draw, now_ms) for symbol, draw in zip(chosen, draws)]

    def _one_event(self, symbol: str, draw: float, now_ms: int) -> Event:
        state = self._symbol_state(symbol)
        rnd = self._random
        state.price = max(0.01, round(state.price * (1 + rnd.gauss(0, 0.0004)), 4))
        half_spread = max(0.005, round(state.price * 0.0002, 4))
        bid = round(state.price - half_spread, 4)
        ask = round(state.price + half_spread, 4)
        if draw >= 1 - self.RARE_SHARE / 2:  # FMV carries no sequence number
            payload = {"ev": "FMV", "fmv": round(state.price, 4), "sym": symbol, "t": now_ms * 1_000_000}
            return Event("FMV", symbol, _encode(payload))
        sequence = next(self._sequence)
        if draw < self.TRADE_SHARE:
            price = round(rnd.uniform(bid, ask), 4)
            size = rnd.choice((1, 10, 50, 100, 100, 100, 200, 300, 500, 1000))
            self._record_trade(state, price, size)
            payload = {"ev": "T", "sym": symbol, "i": str(next(self._trade_ids)),
                       "x": rnd.randint(1, 20), "p": price, "s": size,
                       "c": [rnd.choice((0, 12, 14, 37, 41))], "t": now_ms, "q": sequence,
                       "z": rnd.randint(1, 3)}
            return Event("T", symbol, _encode(payload))
        if draw < 1 - self.RARE_SHARE:
            payload = {"ev": "Q", "sym": symbol, "bx": rnd.randint(1, 20), "bp": bid,
                       "bs": rnd.randint(1, 50) * 100, "ax": rnd.randint(1, 20), "ap": ask,
                       "as": rnd.randint(1, 50) * 100, "c": 0, "i": [604], "t": now_ms,
                       "q": sequence, "z": rnd.randint(1, 3)}
            return Event("Q", symbol, _encode(payload))
        band = round(state.day_open * 0.05, 2)
        payload = {"ev": "LULD", "T": symbol, "h": round(state.day_open + band, 2),
                   "l": round(max(0.01, state.day_open - band), 2), "i": [21],
                   "z": rnd.randint(1, 3), "t": now_ms * 1000, "q": sequence}
        return Event("LULD", symbol, _encode(payload))

    def _record_trade(self, state: _SymbolState, price: float, size: int) -> None:
        state.day_volume += size
        state.day_notional += price * size
        for attribute in ("second", "minute"):
            bar = getattr(state, attribute)
            if bar is None:
                setattr(state, attribute, _Bar(price, price, price, price, size, price * size))
            else:
                bar.add(price, size)

    def second_aggregates(self, start_ms: int) -> list[Event]:
        """``A`` for every symbol that traded in the second starting at ``start_ms``."""
        return list(self._aggregates("second", "A", start_ms, start_ms + 1000))

    def minute_aggregates(self, start_ms: int) -> list[Event]:
        """``AM`` for every symbol that traded in the minute starting at ``start_ms``."""
        return list(self._aggregates("minute", "AM", start_ms, start_ms + 60_000))

    def imbalances(self, now_ms: int, count: int = 3) -> list[Event]:
        """``NOI`` (net order imbalance) for ``count`` symbols, busy ones most often, at ``now_ms``:
        as an exchange publishes them ahead of an auction (the symbol in ``T``)."""
        rnd = self._imbalance_random
        chosen = dict.fromkeys(rnd.choices(self.symbols, cum_weights=self._cumulative, k=count))
        events = []
        for symbol in chosen:
            state = self._state.get(symbol)  # not _symbol_state: that would draw from the stream's source
            price = state.price if state is not None else round(rnd.uniform(5, 500), 2)
            auction = rnd.choice("OC")  # opening or closing auction, at 9:30 or 16:00 (HHMMSS)
            payload = {"ev": "NOI", "T": symbol, "t": now_ms * 1_000_000, "at": 93000 if auction == "O" else 160000,
                       "a": auction, "i": next(self._imbalance_sequence), "x": rnd.choice((4, 10, 12)),
                       "o": rnd.randint(1, 500) * 100, "p": rnd.randint(1, 2000) * 100, "b": round(price, 2)}
            events.append(Event("NOI", symbol, _encode(payload)))
        return events

    def _aggregates(self, attribute: str, ev: str, start: int, end: int) -> Iterator[Event]:
        for symbol, state in self._state.items():
            bar: _Bar | None = getattr(state, attribute)
            if bar is None:
                continue
            setattr(state, attribute, None)
            payload = {"ev": ev, "sym": symbol, "v": bar.volume, "av": state.day_volume,
                       "op": state.day_open, "vw": round(bar.notional / bar.volume, 4),
                       "o": bar.open, "c": bar.close, "h": bar.high, "l": bar.low,
                       "a": round(state.day_notional / state.day_volume, 4),
                       "z": max(1, bar.volume // 10), "s": start, "e": end}
            yield Event(ev, symbol, _encode(payload))


def frame_of(events: list[Event]) -> bytes:
    """Events as one Polygon data frame: a JSON array of their raw bytes."""
    return b"[" + b",".join(event.raw for event in events) + b"]"


def stamp(frame: bytes, now_ms: int) -> bytes:
    """Put the send time into a pre-built frame (T, Q in ms; LULD in µs and FMV in ns follow)."""
    return frame.replace(PLACEHOLDER_BYTES, b"%d" % now_ms)


def prebuild(model: MarketModel, events: int, frame_events: int) -> list[list[Event]]:
    """``events`` stream events cut into frames, with :data:`PLACEHOLDER_MS` as their time."""
    stream = model.stream_events(events, PLACEHOLDER_MS)
    return [stream[start:start + frame_events] for start in range(0, len(stream), frame_events)]
