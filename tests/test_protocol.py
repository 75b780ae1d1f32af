"""The wire format: client actions, channels, status frames, symbol extraction."""

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.errors import ClientMessageError
from proxy.core import protocol
from proxy.core.protocol import (
    EVERYTHING_CHANNEL,
    Auth,
    Channel,
    EventKey,
    Subscribe,
    Unsubscribe,
    event_symbol,
    lowercase_warning,
    parse_channel,
    parse_channel_list,
    parse_client_message,
)

# --- exact status texts (docs/protocol.md) -------------------------------------------------


def test_status_frames_are_byte_exact():
    assert protocol.CONNECTED == '[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
    assert protocol.AUTH_SUCCESS == '[{"ev":"status","status":"auth_success","message":"authenticated"}]'
    assert protocol.AUTH_FAILED == '[{"ev":"status","status":"auth_failed","message":"authentication failed"}]'
    assert protocol.AUTH_TIMEOUT == (
        '[{"ev":"status","status":"auth_timeout","message":"No authentication request received."}]'
    )
    assert protocol.MAX_CONNECTIONS == (
        '[{"ev":"status","status":"max_connections","message":"Maximum number of connections exceeded."}]'
    )


def test_subscription_frame_has_one_status_per_channel():
    channels = parse_channel_list("T.AAPL,Q.MSFT")
    assert protocol.subscription_frame("subscribed", channels) == (
        '[{"ev":"status","status":"success","message":"subscribed to: T.AAPL"},'
        '{"ev":"status","status":"success","message":"subscribed to: Q.MSFT"}]'
    )
    assert protocol.subscription_frame("unsubscribed", channels[:1]) == (
        '[{"ev":"status","status":"success","message":"unsubscribed to: T.AAPL"}]'
    )


# --- channels ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ev_type, symbol",
    [
        ("T.AAPL", "T", "AAPL"),
        ("T.BRK.A", "T", "BRK.A"),  # split at the FIRST dot
        ("T.*", "T", "*"),
        ("  Q.MSFT ", "Q", "MSFT"),
        ("T.O:SPY241220P00720000", "T", "O:SPY241220P00720000"),
        ("V.I:SPX", "V", "I:SPX"),
        ("XT.X:BTC-USD", "XT", "X:BTC-USD"),
        ("C.USD/CNH", "C", "USD/CNH"),
        ("LULD.MSFT", "LULD", "MSFT"),
    ],
)
def test_parse_channel(text, ev_type, symbol):
    channel = parse_channel(text)
    assert (channel.ev_type, channel.symbol) == (ev_type, symbol)
    assert channel.text == text.strip()


def test_bare_star_is_everything_and_type_star_is_not():
    assert parse_channel("*") is EVERYTHING_CHANNEL
    assert parse_channel("*").is_everything
    trades = parse_channel("T.*")
    assert trades.is_type_wildcard and not trades.is_everything
    assert trades.covers(Channel("T", "AAPL")) and not trades.covers(Channel("Q", "AAPL"))


@pytest.mark.parametrize(
    "text, kind",
    [
        ("", "empty_channel"),
        ("   ", "empty_channel"),
        ("AAPL", "bad_channel"),
        ("T.", "bad_channel"),
        (".AAPL", "bad_channel"),
        ("T.AA PL", "bad_channel"),
        ("T.AAPL;DROP", "bad_channel"),
        ("T.<script>", "bad_channel"),
        ("1T.AAPL", "bad_channel"),
        ("T.A" + "A" * 1000, "channel_too_long"),
        ("**", "bad_channel"),
    ],
)
def test_bad_channels_are_rejected_with_their_kind(text, kind):
    with pytest.raises(ClientMessageError) as caught:
        parse_channel(text)
    assert caught.value.kind == kind


def test_channel_list_strips_whitespace_and_drops_duplicates():
    assert [c.text for c in parse_channel_list(" T.AAPL , Q.MSFT,T.AAPL")] == ["T.AAPL", "Q.MSFT"]


def test_channel_list_rejects_empty_items_and_too_many():
    with pytest.raises(ClientMessageError, match="stray comma"):
        parse_channel_list("T.AAPL,,Q.MSFT")
    with pytest.raises(ClientMessageError) as caught:
        parse_channel_list(",".join(f"T.S{i}" for i in range(11)), max_channels=10)
    assert caught.value.kind == "too_many_channels"


_types = st.from_regex(r"[A-Z][A-Z0-9]{0,7}", fullmatch=True)
_symbols = st.from_regex(r"[A-Za-z0-9.:/\-]{1,40}", fullmatch=True)
_channels = st.one_of(
    st.just(EVERYTHING_CHANNEL),
    st.builds(Channel, _types, st.just("*")),
    st.builds(Channel, _types, _symbols),
)


@given(st.lists(_channels, min_size=1, max_size=20, unique=True))
def test_channel_list_round_trips(channels):
    text = protocol.format_channel_list(channels)
    assert list(parse_channel_list(text)) == channels
    spaced = " , ".join(channel.text for channel in channels)
    assert list(parse_channel_list(spaced)) == channels


@given(st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and s.strip() != "*"))
def test_random_text_parses_to_a_valid_channel_or_a_protocol_error(text):
    try:
        channel = parse_channel(text)
    except ClientMessageError as error:
        assert error.kind in {"bad_channel", "empty_channel", "channel_too_long"}
        return
    # Whatever is accepted round-trips and only holds allowed characters.
    assert parse_channel(channel.text) == channel
    assert set(channel.symbol) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.:/-*")


# --- client messages -----------------------------------------------------------------------


def test_parse_actions():
    assert parse_client_message('{"action":"auth","params":"k"}') == Auth("k")
    assert parse_client_message('{"action":"subscribe","params":"T.AAPL,Q.*"}') == Subscribe(
        (Channel("T", "AAPL"), Channel("Q", "*"))
    )
    assert parse_client_message('{"action":"unsubscribe","params":"*"}') == Unsubscribe(
        (EVERYTHING_CHANNEL,)
    )
    # Extra keys are tolerated, as Polygon clients sometimes send them.
    assert parse_client_message('{"action":"auth","params":"k","id":1}') == Auth("k")


@pytest.mark.parametrize(
    "message, kind",
    [
        (b'\xff{"action":"auth","params":"k"}', "binary_frame"),
        ("not json", "not_json"),
        ('{"action":"auth"', "not_json"),
        ("[1,2]", "not_object"),
        ('"auth"', "not_object"),
        ('{"params":"k"}', "missing_action"),
        ('{"action":"auth"}', "missing_params"),
        ('{"action":"auth","params":42}', "params_not_string"),
        ('{"action":"subscribe","params":null}', "params_not_string"),
        ('{"action":7,"params":"x"}', "action_not_string"),
        ('{"action":"auth","params":""}', "empty_params"),
        ('{"action":"subscribe","params":"  "}', "empty_params"),
        ('{"action":"dance","params":"x"}', "unknown_action"),
        ('{"action":"subscribe","params":"T.AAPL,bad channel"}', "bad_channel"),
        ("[" * 5000 + "]" * 5000, "too_deep"),
        ('{"action":"auth","params":' + "[" * 5000 + "]" * 5000 + "}", "too_deep"),
    ],
)
def test_malformed_messages_have_distinct_kinds(message, kind):
    with pytest.raises(ClientMessageError) as caught:
        parse_client_message(message)
    assert caught.value.kind == kind
    assert caught.value.message  # a readable sentence for the client


def test_a_binary_message_holding_utf8_json_is_the_same_message_as_text():
    text = '{"action":"subscribe","params":"T.AAPL,Q.*"}'
    assert parse_client_message(text.encode()) == parse_client_message(text)
    with pytest.raises(ClientMessageError) as caught:
        parse_client_message('{"action":"auth","params":"caf\u00e9"}'.encode("latin-1"))
    assert caught.value.kind == "binary_frame" and "not UTF-8" in caught.value.message


def test_lowercase_channels_get_a_warning_naming_what_was_meant():
    assert lowercase_warning(parse_channel_list("T.AAPL,Q.*,*,XT.X:BTC-USD")) is None
    warning = json.loads(lowercase_warning(parse_channel_list("T.aapl,XT.X:btc-usd")))
    assert warning[0]["status"] == "warning"
    assert "T.aapl (did you mean T.AAPL?)" in warning[0]["message"]
    assert "XT.X:btc-usd (did you mean XT.X:BTC-USD?)" in warning[0]["message"]
    many = json.loads(lowercase_warning(parse_channel_list(",".join(f"T.s{i}" for i in range(8)))))
    assert "and 3 more" in many[0]["message"]


def test_ten_thousand_channels_in_one_message_is_the_cap():
    params = ",".join(f"T.S{i}" for i in range(10_001))
    with pytest.raises(ClientMessageError) as caught:
        parse_client_message(json.dumps({"action": "subscribe", "params": params}))
    assert caught.value.kind == "too_many_channels"


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_input_parses_or_raises_protocol_error(message):
    try:
        parse_client_message(message)
    except ClientMessageError:
        pass


# --- symbols -------------------------------------------------------------------------------

_key = msgspec.json.Decoder(EventKey).decode


@pytest.mark.parametrize(
    "event, symbol",
    [
        ('{"ev":"T","sym":"MSFT","p":215.9,"t":1}', "MSFT"),
        ('{"ev":"Q","sym":"MSFT","bp":1}', "MSFT"),
        ('{"ev":"AM","sym":"GTE","v":4110}', "GTE"),
        ('{"ev":"LULD","T":"MSFT","h":218.96}', "MSFT"),
        ('{"ev":"NOI","T":"AAPL"}', "AAPL"),
        ('{"ev":"V","T":"I:SPX","val":1}', "I:SPX"),
        ('{"ev":"XT","pair":"BTC-USD","p":1}', "BTC-USD"),
        ('{"ev":"C","p":"USD/CNH","a":1}', "USD/CNH"),
        ('{"ev":"CA","pair":"USD/EUR"}', "USD/EUR"),
        ('{"ev":"C","p":7.1}', None),  # a price, not a pair: unreadable symbol
        ('{"ev":"T","p":1}', None),
        ('{"sym":"AAPL"}', None),
        ('{"ev":5,"sym":"AAPL"}', None),
        ('{"ev":"NEWTYPE","sym":"AAPL"}', "AAPL"),  # unknown type: first string of sym/pair/T
    ],
)
def test_event_symbol_follows_the_field_table(event, symbol):
    assert event_symbol(_key(event)) == symbol


# --- the fast channel-list parser and answer builder -------------------------------------------


def reference_parse(params: str, max_channels: int = 10_000) -> tuple[Channel, ...] | tuple[str, str]:
    """parse_channel item by item: what the fast path must agree with, errors included."""
    items = params.split(",")
    if len(items) > max_channels:
        return ("too_many_channels", "")
    try:
        return tuple(dict.fromkeys(parse_channel(item) for item in items))
    except ClientMessageError as error:
        return (error.kind, error.message)


def fast_parse(params: str, step: int) -> tuple[Channel, ...] | tuple[str, str]:
    try:
        return protocol.run_steps(protocol.parse_channel_list_steps(params, step=step))
    except ClientMessageError as error:
        return ("too_many_channels", "") if error.kind == "too_many_channels" else (error.kind, error.message)


ITEMS = st.one_of(
    st.sampled_from(["T.AAPL", " Q.* ", "*", "T.BRK.A", "XT.X:BTC-USD", "C.USD/CNH", "T." + "A" * 62,
                     "T." + "A" * 63, " T." + "A" * 62 + " ", "ABCDEFGH.X", "ABCDEFGHI.X", "T.", "", "T.A*"]),
    st.text(alphabet="AT.*: /-9;\t\u00a0é", max_size=8),
)


@given(st.lists(ITEMS, min_size=1, max_size=12), st.sampled_from([0, 1, 2, 5]))
def test_the_fast_channel_parser_agrees_with_parse_channel(items, step):
    params = ",".join(items)
    expected = reference_parse(params)
    assert fast_parse(params, step) == expected
    if isinstance(expected[0], Channel) or expected == ():
        assert all(type(channel) is Channel for channel in expected)


def test_a_bare_star_parsed_fast_is_the_everything_channel():
    assert parse_channel_list("T.AAPL,*,Q.*")[1] is EVERYTHING_CHANNEL


@given(st.lists(st.sampled_from(["T.AAPL", "*", "Q.*", "T.BRK.A", "XT.X:BTC-USD"]), max_size=20), st.sampled_from([0, 1, 3]))
def test_answers_are_polygons_statuses_byte_for_byte(texts, step):
    channels = parse_channel_list(",".join(texts)) if texts else ()
    for verb in ("subscribed", "unsubscribed"):
        expected = msgspec.json.encode(
            [protocol.status_event("success", f"{verb} to: {channel.text}") for channel in channels]).decode()
        assert protocol.run_steps(protocol.subscription_frame_steps(verb, tuple(channels), step=step)) == expected
    message = json.loads(protocol.subscription_message("subscribe", channels))
    assert message == {"action": "subscribe", "params": ",".join(channel.text for channel in channels)}
