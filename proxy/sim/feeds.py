"""Synthetic data for every market but stocks, in each market's event formats, without I/O or clock.

Stocks come from :class:`~proxy.sim.market.MarketModel`; this module gives the
other markets of :data:`~proxy.core.markets.MARKET_TABLE` a model of the same
shape (``stream_events``, ``second_aggregates``, ``minute_aggregates``), so the
simulator drives them all alike. Each has a fixed synthetic universe (options
contracts ``O:SPY251219C00650000``, forex pairs ``EUR/USD``, crypto pairs
``BTC-USD``, index tickers ``I:SPX``, futures contracts ``ESZ5``), Zipf-like
activity and a random walk per symbol, and writes each event type with the
fields and symbol field of the table (forex quotes name their pair in ``p``,
crypto events in ``pair``, index values in ``T``, the rest in ``sym``). The
aggregates are cut from what the stream printed: trades (options, crypto,
futures), quote mid-points (forex) or values (indices). The same seed and the
same calls give the same bytes.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Iterator, Protocol

import attrs
import msgspec

from .market import WELL_KNOWN, Event, MarketModel

__all__ = [
    "FeedModel",
    "OptionsModel",
    "ForexModel",
    "CryptoModel",
    "IndicesModel",
    "FuturesModel",
    "option_contracts",
    "FOREX_PAIRS",
    "CRYPTO_PAIRS",
    "INDEX_TICKERS",
    "FUTURES_CONTRACTS",
    "feed_model",
]

_encode = msgspec.json.encode

FOREX_PAIRS = ("EUR/USD", "USD/JPY", "GBP/USD", "USD/CHF", "AUD/USD", "USD/CAD", "NZD/USD", "EUR/GBP",
               "EUR/JPY", "GBP/JPY", "USD/CNH", "USD/MXN", "EUR/CHF", "AUD/JPY", "USD/SEK", "USD/NOK")
CRYPTO_PAIRS = ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "DOGE-USD", "ADA-USD", "LTC-USD", "ETH-BTC",
                "AVAX-USD", "LINK-USD", "DOT-USD", "BCH-USD", "BTC-EUR", "ETH-EUR", "UNI-USD", "XLM-USD")
INDEX_TICKERS = ("I:SPX", "I:NDX", "I:DJI", "I:VIX", "I:RUT", "I:COMP", "I:OEX", "I:SOX", "I:XAU", "I:NYA")
FUTURES_CONTRACTS = ("ESZ5", "NQZ5", "CLF6", "GCG6", "YMZ5", "RTYZ5", "ZNH6", "ZBH6", "6EZ5", "SIH6",
                     "NGF6", "HGH6")
_EXPIRIES = ("251219", "260116", "260320")


def option_contracts(underlyings: tuple[str, ...] = ("SPY", "QQQ", "AAPL", "TSLA"), strikes: int = 10) -> tuple[str, ...]:
    """OCC-style contracts: each underlying, three expiries, ``strikes`` strikes, calls and puts."""
    contracts = []
    for underlying, expiry in itertools.product(underlyings, _EXPIRIES):
        base = 100 + 50 * (WELL_KNOWN.index(underlying) if underlying in WELL_KNOWN else 0)
        for step, right in itertools.product(range(strikes), "CP"):
            contracts.append(f"O:{underlying}{expiry}{right}{(base + 5 * step) * 1000:08d}")
    return tuple(contracts)


class FeedModel(Protocol):
    """What the simulator asks of a market's model (:class:`MarketModel` for stocks)."""

    symbols: tuple[str, ...]

    def stream_events(self, count: int, now_ms: int) -> list[Event]:
        """The next ``count`` stream events (trades, quotes, ...), stamped ``now_ms``."""
        ...

    def second_aggregates(self, start_ms: int) -> list[Event]:
        """The per-second aggregates of what the stream produced in the second from ``start_ms``."""
        ...

    def minute_aggregates(self, start_ms: int) -> list[Event]:
        """The per-minute aggregates of what the stream produced in the minute from ``start_ms``."""
        ...


@attrs.define
class _Bar:
    open: float
    high: float
    low: float
    close: float
    volume: float = 0.0
    notional: float = 0.0
    count: int = 0

    def add(self, price: float, size: float) -> None:
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        self.close = price
        self.volume += size
        self.notional += price * size
        self.count += 1

    @property
    def vwap(self) -> float:
        return self.notional / self.volume if self.volume else self.close


@attrs.define
class _State:
    price: float
    day_open: float
    second: _Bar | None = None
    minute: _Bar | None = None


class _WalkModel:
    """The part every market shares: symbols chosen Zipf-like, a random walk per symbol, bars."""

    market = ""
    #: Each event type of the stream with its share of draws, in order (the last takes the rest).
    SHARES: tuple[tuple[str, float], ...] = ()
    VOLATILITY = 0.0004
    DIGITS = 4

    def __init__(self, symbols: tuple[str, ...], *, seed: int | None = None, zipf_s: float = 1.1) -> None:
        if not symbols:
            raise ValueError(f"the {self.market} feed needs at least one symbol")
        self.symbols = symbols
        # A string seed hashes the same in every run (version 2 of random.seed).
        self._random = random.Random(None if seed is None else f"{seed}:{self.market}")
        self._cumulative = list(itertools.accumulate(1.0 / rank ** zipf_s for rank in range(1, len(symbols) + 1)))
        self._state: dict[str, _State] = {}
        self._sequence = itertools.count(1)
        self._ids = itertools.count(1)
        bounds = list(itertools.accumulate(share for _, share in self.SHARES))
        self._kinds: list[tuple[float, Callable[[str, _State, int], Event]]] = [
            (bound, getattr(self, f"_{code.lower()}")) for (code, _), bound in zip(self.SHARES, bounds)]

    def start_price(self, symbol: str) -> float:
        """Where ``symbol``\'s price starts (a range typical of the market)."""
        """The first price of ``symbol`` (each market says what is plausible)."""
        return round(self._random.uniform(5, 500), 2)

    def _state_of(self, symbol: str) -> _State:
        state = self._state.get(symbol)
        if state is None:
            price = self.start_price(symbol)
            state = self._state[symbol] = _State(price, price)
        return state

    def stream_events(self, count: int, now_ms: int) -> list[Event]:
        """``count`` events of the market's continuous stream, stamped ``now_ms``."""
        rnd = self._random
        chosen = rnd.choices(self.symbols, cum_weights=self._cumulative, k=count)
        events = []
        for symbol in chosen:
            state = self._state_of(symbol)
            state.price = max(10.0 ** -self.DIGITS, round(state.price * (1 + rnd.gauss(0, self.VOLATILITY)), self.DIGITS))
            draw = rnd.random()
            make = next((make for bound, make in self._kinds if draw < bound), self._kinds[-1][1])
            events.append(make(symbol, state, now_ms))
        return events

    def _spread(self, state: _State) -> tuple[float, float]:
        half = max(10.0 ** -self.DIGITS, round(state.price * 0.0002, self.DIGITS))
        return round(state.price - half, self.DIGITS), round(state.price + half, self.DIGITS)

    @staticmethod
    def _record(state: _State, price: float, size: float) -> None:
        for attribute in ("second", "minute"):
            bar = getattr(state, attribute)
            if bar is None:
                setattr(state, attribute, _Bar(price, price, price, price, size, price * size, 1))
            else:
                bar.add(price, size)

    def _bars(self, attribute: str) -> Iterator[tuple[str, _State, _Bar]]:
        for symbol, state in self._state.items():
            bar: _Bar | None = getattr(state, attribute)
            if bar is not None:
                setattr(state, attribute, None)
                yield symbol, state, bar

    def second_aggregates(self, start_ms: int) -> list[Event]:
        """The per-second aggregates of every symbol that printed in the second from ``start_ms``."""
        code, symbol_field = self.AGGREGATE_TYPES[0]
        return [self._aggregate(code, symbol_field, symbol, state, bar, start_ms, start_ms + 1000)
                for symbol, state, bar in self._bars("second")]

    def minute_aggregates(self, start_ms: int) -> list[Event]:
        """The per-minute aggregates of every symbol that printed in the minute from ``start_ms``."""
        code, symbol_field = self.AGGREGATE_TYPES[1]
        return [self._aggregate(code, symbol_field, symbol, state, bar, start_ms, start_ms + 60_000)
                for symbol, state, bar in self._bars("minute")]

    #: The (per second, per minute) aggregate types and their symbol field.
    AGGREGATE_TYPES: tuple[tuple[str, str], tuple[str, str]] = (("A", "sym"), ("AM", "sym"))

    def _aggregate_fields(self, state: _State, bar: _Bar) -> dict[str, Any]:
        return {"o": bar.open, "c": bar.close, "h": bar.high, "l": bar.low}

    def _aggregate(self, code: str, symbol_field: str, symbol: str, state: _State, bar: _Bar,
                   start: int, end: int) -> Event:
        payload = {"ev": code, symbol_field: symbol, **self._aggregate_fields(state, bar), "s": start, "e": end}
        return Event(code, symbol, _encode(payload))


class OptionsModel(_WalkModel):
    """Options: ``T``, ``Q`` and now and then ``FMV`` on ``O:`` contracts; ``A`` and ``AM`` from trades."""

    market = "options"
    SHARES = (("T", 0.30), ("Q", 0.69), ("FMV", 0.01))
    VOLATILITY = 0.002
    DIGITS = 2

    def start_price(self, symbol: str) -> float:
        """Where ``symbol``\'s price starts (a range typical of the market)."""
        return round(self._random.uniform(0.5, 30), 2)

    def _t(self, symbol: str, state: _State, now_ms: int) -> Event:
        rnd = self._random
        size = rnd.choice((1, 1, 2, 5, 10, 20, 50))
        bid, ask = self._spread(state)
        price = round(rnd.uniform(bid, ask), 2)
        self._record(state, price, size)
        payload = {"ev": "T", "sym": symbol, "x": rnd.randint(300, 325), "i": str(next(self._ids)), "p": price,
                   "s": size, "c": [rnd.choice((209, 219, 227, 233))], "t": now_ms, "q": next(self._sequence)}
        return Event("T", symbol, _encode(payload))

    def _q(self, symbol: str, state: _State, now_ms: int) -> Event:
        rnd = self._random
        bid, ask = self._spread(state)
        payload = {"ev": "Q", "sym": symbol, "bx": rnd.randint(300, 325), "ax": rnd.randint(300, 325),
                   "bp": bid, "ap": ask, "bs": rnd.randint(1, 200), "as": rnd.randint(1, 200), "t": now_ms,
                   "q": next(self._sequence)}
        return Event("Q", symbol, _encode(payload))

    def _fmv(self, symbol: str, state: _State, now_ms: int) -> Event:
        payload = {"ev": "FMV", "fmv": state.price, "sym": symbol, "t": now_ms * 1_000_000}
        return Event("FMV", symbol, _encode(payload))

    def _aggregate_fields(self, state: _State, bar: _Bar) -> dict[str, Any]:
        return {"v": int(bar.volume), "av": int(bar.volume), "op": state.day_open, "vw": round(bar.vwap, 4),
                "o": bar.open, "c": bar.close, "h": bar.high, "l": bar.low, "a": round(bar.vwap, 4),
                "z": max(1, int(bar.volume) // max(1, bar.count))}


class ForexModel(_WalkModel):
    """Forex: ``C`` quotes (the pair in ``p``); ``CAS`` and ``CA`` (``pair``) from their mid-points."""

    market = "forex"
    SHARES = (("C", 1.0),)
    VOLATILITY = 0.00005
    DIGITS = 5
    AGGREGATE_TYPES = (("CAS", "pair"), ("CA", "pair"))

    def start_price(self, symbol: str) -> float:
        """Where ``symbol``\'s price starts (a range typical of the market)."""
        return round(self._random.uniform(100, 160) if symbol.endswith("JPY") else self._random.uniform(0.6, 1.6), 5)

    def _c(self, symbol: str, state: _State, now_ms: int) -> Event:
        bid, ask = self._spread(state)
        self._record(state, state.price, 1)
        payload = {"ev": "C", "p": symbol, "x": self._random.choice((44, 48)), "a": ask, "b": bid, "i": 0,
                   "t": now_ms}
        return Event("C", symbol, _encode(payload))

    def _aggregate_fields(self, state: _State, bar: _Bar) -> dict[str, Any]:
        return {"o": bar.open, "c": bar.close, "h": bar.high, "l": bar.low, "v": bar.count}


class CryptoModel(_WalkModel):
    """Crypto: ``XT``, ``XQ`` and now and then an ``XL2`` book (the pair in ``pair``); ``XAS``, ``XA`` from trades."""

    market = "crypto"
    SHARES = (("XT", 0.35), ("XQ", 0.60), ("XL2", 0.05))
    VOLATILITY = 0.0008
    DIGITS = 6
    AGGREGATE_TYPES = (("XAS", "pair"), ("XA", "pair"))

    def start_price(self, symbol: str) -> float:
        """Where ``symbol``\'s price starts (a range typical of the market)."""
        known = {"BTC-USD": 60_000.0, "BTC-EUR": 55_000.0, "ETH-USD": 3_000.0, "ETH-EUR": 2_700.0, "ETH-BTC": 0.05}
        return known.get(symbol, round(self._random.uniform(0.1, 300), 4))

    def _xt(self, symbol: str, state: _State, now_ms: int) -> Event:
        rnd = self._random
        size = round(rnd.uniform(0.0001, 2), 6)
        bid, ask = self._spread(state)
        price = round(rnd.uniform(bid, ask), self.DIGITS)
        self._record(state, price, size)
        payload = {"ev": "XT", "pair": symbol, "p": price, "t": now_ms, "s": size, "c": [rnd.choice((1, 2))],
                   "i": str(next(self._ids)), "x": rnd.randint(1, 10), "r": now_ms + rnd.randint(1, 50)}
        return Event("XT", symbol, _encode(payload))

    def _xq(self, symbol: str, state: _State, now_ms: int) -> Event:
        rnd = self._random
        bid, ask = self._spread(state)
        payload = {"ev": "XQ", "pair": symbol, "bp": bid, "bs": round(rnd.uniform(0.01, 5), 4), "ap": ask,
                   "as": round(rnd.uniform(0.01, 5), 4), "t": now_ms, "x": rnd.randint(1, 10),
                   "r": now_ms + rnd.randint(1, 50)}
        return Event("XQ", symbol, _encode(payload))

    def _xl2(self, symbol: str, state: _State, now_ms: int) -> Event:
        rnd = self._random
        bid, ask = self._spread(state)
        tick = max(10.0 ** -self.DIGITS, round(state.price * 0.0001, self.DIGITS))
        bids = [[round(bid - level * tick, self.DIGITS), round(rnd.uniform(0.01, 5), 4)] for level in range(5)]
        asks = [[round(ask + level * tick, self.DIGITS), round(rnd.uniform(0.01, 5), 4)] for level in range(5)]
        payload = {"ev": "XL2", "pair": symbol, "t": now_ms, "r": now_ms + rnd.randint(1, 50),
                   "x": rnd.randint(1, 10), "b": bids, "a": asks}
        return Event("XL2", symbol, _encode(payload))

    def _aggregate_fields(self, state: _State, bar: _Bar) -> dict[str, Any]:
        return {"v": round(bar.volume, 6), "vw": round(bar.vwap, self.DIGITS),
                "z": round(bar.volume / max(1, bar.count), 6), "o": bar.open, "c": bar.close, "h": bar.high,
                "l": bar.low}


class IndicesModel(_WalkModel):
    """Indices: ``V`` values (the ticker in ``T``); ``A`` and ``AM`` (``sym``) from the values."""

    market = "indices"
    SHARES = (("V", 1.0),)
    VOLATILITY = 0.0001
    DIGITS = 2

    def start_price(self, symbol: str) -> float:
        """Where ``symbol``\'s price starts (a range typical of the market)."""
        return round(self._random.uniform(15, 25) if symbol == "I:VIX" else self._random.uniform(1_000, 40_000), 2)

    def _v(self, symbol: str, state: _State, now_ms: int) -> Event:
        self._record(state, state.price, 0)
        return Event("V", symbol, _encode({"ev": "V", "val": state.price, "T": symbol, "t": now_ms}))

    def _aggregate_fields(self, state: _State, bar: _Bar) -> dict[str, Any]:
        return {"op": state.day_open, "o": bar.open, "c": bar.close, "h": bar.high, "l": bar.low}


class FuturesModel(_WalkModel):
    """Futures: ``T`` and ``Q`` (``sym``); ``A`` and ``AM`` from trades, in the futures' own fields."""

    market = "futures"
    SHARES = (("T", 0.35), ("Q", 0.65))
    VOLATILITY = 0.0002
    DIGITS = 2

    def start_price(self, symbol: str) -> float:
        """Where ``symbol``\'s price starts (a range typical of the market)."""
        return round(self._random.uniform(50, 6_000), 2)

    def _t(self, symbol: str, state: _State, now_ms: int) -> Event:
        size = self._random.choice((1, 1, 1, 2, 5, 10))
        self._record(state, state.price, size)
        payload = {"ev": "T", "sym": symbol, "p": state.price, "s": size, "t": now_ms, "q": next(self._sequence)}
        return Event("T", symbol, _encode(payload))

    def _q(self, symbol: str, state: _State, now_ms: int) -> Event:
        rnd = self._random
        bid, ask = self._spread(state)
        payload = {"ev": "Q", "sym": symbol, "bp": bid, "bs": rnd.randint(1, 50), "bt": now_ms - 1, "ap": ask,
                   "as": rnd.randint(1, 50), "at": now_ms - 1, "t": now_ms}
        return Event("Q", symbol, _encode(payload))

    def _aggregate_fields(self, state: _State, bar: _Bar) -> dict[str, Any]:
        return {"v": int(bar.volume), "dv": round(bar.notional, 2), "o": bar.open, "c": bar.close,
                "h": bar.high, "l": bar.low, "n": bar.count}


def feed_model(market: str, *, seed: int | None = None, stock_symbols: tuple[str, ...] = ()) -> FeedModel:
    """The model of ``market``'s feed: stocks on ``stock_symbols``, the others on their own
    universes; ValueError for a market the simulator does not know."""
    if market == "stocks":
        return MarketModel(stock_symbols, seed=seed)
    models: dict[str, tuple[type[_WalkModel], tuple[str, ...]]] = {
        "options": (OptionsModel, option_contracts()), "forex": (ForexModel, FOREX_PAIRS),
        "crypto": (CryptoModel, CRYPTO_PAIRS), "indices": (IndicesModel, INDEX_TICKERS),
        "futures": (FuturesModel, FUTURES_CONTRACTS),
    }
    if market not in models:
        raise ValueError(f"the simulator has no {market!r} feed")
    model, symbols = models[market]
    return model(symbols, seed=seed)
