"""The markets' table (proxy.core.markets): its facts agree with routing, and its rules hold.

The Hypothesis tests drive one connection's channel set with any sequence of
subscribes and unsubscribes, applying only what the rules allow, and check the cap
and the wildcard rule are never broken, and that nothing within them is refused.
"""

import pytest
from hypothesis import given, settings, strategies as st

from proxy.core import markets
from proxy.core.markets import MARKET_NAMES, MARKET_TABLE, OPTIONS_QUOTE_CAP, change_refusal, market, screen
from proxy.core.protocol import EVERYTHING_CHANNEL, SYMBOL_FIELD_BY_TYPE, Channel, parse_channel_list
from proxy.core.settings import MARKETS

OPTIONS = market("options")


def contracts(count, ev_type="Q", start=0):
    return tuple(Channel(ev_type, f"O:SPY2512{n:04d}C00650000") for n in range(start, start + count))


def test_the_table_holds_every_market_at_its_path():
    assert MARKET_NAMES == MARKETS == ("stocks", "options", "forex", "crypto", "indices", "futures")
    assert [MARKET_TABLE[name].path for name in MARKET_NAMES] == [f"/{name}" for name in MARKET_NAMES]
    assert market("stocks").codes == ("T", "Q", "A", "AM", "LULD", "FMV", "NOI")
    assert OPTIONS.codes == ("T", "Q", "A", "AM", "FMV")
    assert market("forex").codes[:3] == ("C", "CA", "CAS")
    assert market("crypto").codes[:5] == ("XT", "XQ", "XA", "XAS", "XL2")
    assert market("indices").codes == ("V", "A", "AM")
    assert market("futures").codes == ("T", "Q", "A", "AM")
    with pytest.raises(ValueError, match="the markets are stocks, options"):
        market("bonds")


@pytest.mark.parametrize("name", MARKET_NAMES)
def test_routing_reads_each_event_type_from_the_field_the_table_names(name):
    # Routing has one field per type, whatever the market: no two markets may disagree on it.
    for event_type in market(name).event_types:
        assert SYMBOL_FIELD_BY_TYPE[event_type.code] == event_type.symbol_field, (name, event_type.code)


def test_the_official_client_expects_each_market_s_types():
    from massive.websocket.models import MARKET_EVENT_MAP, Market as ClientMarket

    for name in MARKET_NAMES:
        assert set(market(name).codes) <= set(MARKET_EVENT_MAP[ClientMarket(name)]), name


def test_options_quotes_have_polygon_s_cap_and_no_wildcard():
    quotes = OPTIONS.event_type("Q")
    assert quotes is not None and quotes.cap == OPTIONS_QUOTE_CAP == 1000 and not quotes.wildcard
    assert OPTIONS.wildcard_allowed("T") and not OPTIONS.wildcard_allowed("Q")
    assert OPTIONS.caps() == {"Q": 1000} and OPTIONS.caps({"Q": 5, "T": 7}) == {"Q": 5, "T": 7}
    assert market("stocks").caps() == {} and market("stocks").wildcard_allowed("Q")
    assert OPTIONS.wildcard_allowed("NEW")  # a type the table does not know is not refused


def test_a_wildcard_the_market_does_not_allow_is_refused_naming_it():
    refusal = change_refusal(OPTIONS, set(), parse_channel_list("T.*,Q.*"))
    assert refusal == ("Q.* is not allowed on options: Polygon has no wildcard for options quotes; "
                       "name contracts, at most 1,000 a connection")
    assert change_refusal(OPTIONS, set(), parse_channel_list("T.*,A.*,AM.*,FMV.*")) is None
    assert change_refusal(market("stocks"), set(), parse_channel_list("Q.*")) is None


def test_the_cap_counts_distinct_contracts_of_the_capped_type_only():
    held = set(contracts(999)) | set(contracts(5000, "T"))
    assert change_refusal(OPTIONS, held, contracts(1, start=999)) is None
    assert change_refusal(OPTIONS, held, contracts(2, start=999)) == (
        "options Q (quotes) is limited to 1,000 contracts a connection; this would hold 1,001")
    # held channels and repeats count once; removals make room; other types never count
    assert change_refusal(OPTIONS, held, contracts(3) + contracts(1, start=999) * 2) is None
    assert change_refusal(OPTIONS, held, contracts(3, start=999), removed=contracts(2)) is None
    assert change_refusal(OPTIONS, held, contracts(3, start=999), removed=contracts(1)) is not None
    assert change_refusal(OPTIONS, held, contracts(50_000, "T", start=5000)) is None
    assert change_refusal(OPTIONS, held, (EVERYTHING_CHANNEL,)) is None


def test_caps_can_be_set_per_type():
    assert change_refusal(OPTIONS, set(contracts(3)), contracts(1, start=3), caps={"Q": 3}) == (
        "options Q (quotes) is limited to 3 contracts a connection; this would hold 4")
    refusal = change_refusal(market("crypto"), set(), parse_channel_list("XQ.BTC-USD,XQ.ETH-USD"), caps={"XQ": 1})
    assert refusal == "crypto XQ (quotes) is limited to 1 pairs a connection; this would hold 2"


def test_a_set_over_a_lowered_cap_may_shrink_but_takes_nothing_new():
    held = set(contracts(10))
    assert change_refusal(OPTIONS, held, removed=contracts(3), caps={"Q": 5}) is None
    assert change_refusal(OPTIONS, held, contracts(1, start=10), removed=contracts(3), caps={"Q": 5}) is not None


def test_screen_takes_a_subscribe_in_order_up_to_the_cap():
    held = set(contracts(998))
    added = parse_channel_list("Q.*,T.*") + contracts(2) + contracts(3, start=998)
    screened = screen(OPTIONS, held, added)
    assert screened.allowed == (Channel("T", "*"),) + contracts(2) + contracts(2, start=998)
    assert [channel for channel, _ in screened.refused] == [Channel("Q", "*"), *contracts(1, start=1000)]
    assert screened.refused[1][1] == "options Q (quotes) is limited to 1,000 contracts a connection; this would hold 1,001"
    assert screen(market("stocks"), set(), parse_channel_list("Q.*,*")).refused == ()


# --- the rules under any sequence of changes ---------------------------------------------

SYMBOLS = [f"O:SPY2512{n:02d}C00650000" for n in range(12)]
CHANNELS = st.sampled_from([Channel(t, s) for t in ("Q", "T") for s in SYMBOLS + ["*"]] + [EVERYTHING_CHANNEL])
CHANGES = st.lists(st.tuples(st.booleans(), st.lists(CHANNELS, max_size=8)), max_size=40)


def quotes_held(held):
    return sum(1 for channel in held if channel.ev_type == "Q" and channel.symbol != "*")


def within_rules(channels, cap):
    return Channel("Q", "*") not in channels and quotes_held(channels) <= cap


@settings(max_examples=300, deadline=None)
@given(changes=CHANGES, cap=st.integers(1, 8))
def test_no_sequence_of_allowed_changes_breaks_the_cap_or_holds_a_refused_wildcard(changes, cap):
    held: set[Channel] = set()
    for subscribe, channels in changes:
        added, removed = (channels, ()) if subscribe else ((), channels)
        after = (held | set(added)) - set(removed)
        refusal = change_refusal(OPTIONS, held, added, removed, caps={"Q": cap})
        # allowed exactly when the set after the change keeps the rules: refused for a reason only
        assert (refusal is None) == within_rules(after, cap), (held, added, removed, refusal)
        if refusal is None:
            held = after
        assert within_rules(held, cap)


@settings(max_examples=300, deadline=None)
@given(changes=CHANGES, cap=st.integers(1, 8))
def test_screening_each_subscribe_never_breaks_the_cap_and_refuses_only_at_it(changes, cap):
    held: set[Channel] = set()
    for subscribe, channels in changes:
        if not subscribe:
            held -= set(channels)
            continue
        screened = screen(OPTIONS, held, channels, caps={"Q": cap})
        assert set(screened.allowed) | {channel for channel, _ in screened.refused} == set(channels)
        for channel, reason in screened.refused:
            assert channel == Channel("Q", "*") or quotes_held(held | set(screened.allowed)) == cap, reason
        held |= set(screened.allowed)
        assert within_rules(held, cap)
        # and what was allowed is a change the all-or-nothing judge allows too
        assert change_refusal(OPTIONS, held - set(screened.allowed), screened.allowed, caps={"Q": cap}) is None


@settings(max_examples=200, deadline=None)
@given(held=st.sets(CHANNELS, max_size=20), added=st.lists(CHANNELS, max_size=10), cap=st.integers(1, 8))
def test_screen_reads_only_the_capped_types_of_what_is_held(held, added, cap):
    # so that a caller may pass just those (the simulator keeps them apart from 100,000 others)
    capped_only = {channel for channel in held if channel.ev_type == "Q"}
    assert screen(OPTIONS, held, added, caps={"Q": cap}) == screen(OPTIONS, capped_only, added, caps={"Q": cap})


def test_the_module_says_what_it_exports():
    assert set(markets.__all__) >= {"MARKET_TABLE", "screen", "change_refusal", "market"}
