"""SessionState: the control conversation of one client, without sockets."""

import json

from proxy.core.errors import CloseReason
from proxy.core import protocol
from proxy.core.entitlements import KeyBook, KeyEntry, hash_key
from proxy.core.keys import key_matches
from proxy.core.protocol import parse_channel
from proxy.core.session import CHANNELS_PER_STEP, Phase, ProxyLimits, Reaction, SessionState


def statuses(reaction):
    return [(event["status"], event["message"]) for reply in reaction.replies for event in json.loads(reply)]


def test_auth_then_subscribe_then_unsubscribe():
    state = SessionState(accepted_keys=frozenset({"good"}))
    assert state.receive('{"action":"auth","params":"good"}').replies == (protocol.AUTH_SUCCESS,)
    assert state.phase is Phase.AUTHENTICATED
    reaction = state.receive('{"action":"subscribe","params":"T.AAPL,Q.MSFT"}')
    assert [c.text for c in reaction.subscribe] == ["T.AAPL", "Q.MSFT"]
    assert statuses(reaction) == [("success", "subscribed to: T.AAPL"), ("success", "subscribed to: Q.MSFT")]
    reaction = state.receive('{"action":"unsubscribe","params":"T.AAPL"}')
    assert [c.text for c in reaction.unsubscribe] == ["T.AAPL"]
    assert statuses(reaction) == [("success", "unsubscribed to: T.AAPL")]


def test_wrong_key_fails_and_closes():
    state = SessionState(accepted_keys=frozenset({"good"}))
    reaction = state.receive('{"action":"auth","params":"bad"}')
    assert reaction.replies == (protocol.AUTH_FAILED,)
    assert reaction.close_code == CloseReason.POLICY_VIOLATION
    assert state.receive('{"action":"auth","params":"good"}').replies == ()  # closed: nothing more


def test_subscribe_before_auth_is_an_error_and_the_session_goes_on():
    state = SessionState(accepted_keys=frozenset({"good"}))
    reaction = state.receive('{"action":"subscribe","params":"T.AAPL"}')
    assert reaction.close_code is None and not reaction.subscribe
    assert statuses(reaction)[0][0] == "error"
    assert state.receive('{"action":"auth","params":"good"}').replies == (protocol.AUTH_SUCCESS,)


def test_malformed_messages_get_an_error_status_not_a_close():
    state = SessionState(accepted_keys=frozenset(), allow_any_key=True)
    for message in ("nope", "[]", '{"action":"x","params":"y"}', b"\x00binary"):
        reaction = state.receive(message)
        assert reaction.close_code is None
        assert statuses(reaction)[0][0] == "error"


def test_auth_twice_is_an_error_and_any_key_mode_accepts_anything():
    state = SessionState(accepted_keys=frozenset(), allow_any_key=True)
    assert state.receive('{"action":"auth","params":"whatever"}').replies == (protocol.AUTH_SUCCESS,)
    assert statuses(state.receive('{"action":"auth","params":"again"}')) == [("error", "already authenticated")]


def test_timeout_answers_auth_timeout_and_closes():
    reaction = SessionState(accepted_keys=frozenset({"k"})).timed_out()
    assert reaction.replies == (protocol.AUTH_TIMEOUT,) and reaction.close_code == CloseReason.POLICY_VIOLATION


def test_key_matches_every_accepted_key_and_nothing_else():
    keys = frozenset({"alpha", "beta"})
    assert key_matches("alpha", keys) and key_matches("beta", keys)
    assert not key_matches("alph", keys) and not key_matches("", keys) and not key_matches("gamma", frozenset())


# --- limits: the control-message budget, the flood, channels, entitlements --------------------


def authenticated(**limits) -> SessionState:
    state = SessionState(accepted_keys=frozenset({"good"}), **limits)
    assert state.receive('{"action":"auth","params":"good"}', 0.0).outcome == "authenticated"
    return state


SUBSCRIBE_AAPL = '{"action":"subscribe","params":"T.AAPL"}'


def test_the_control_budget_is_a_burst_then_the_rate():
    state = authenticated(control_rate=10, control_burst=20)  # the auth took one token at t=0
    outcomes = [state.receive(SUBSCRIBE_AAPL, 0.0).outcome for _ in range(21)]
    assert outcomes == ["ok"] * 19 + ["rate_limited"] * 2
    refused = state.receive(SUBSCRIBE_AAPL, 0.05)  # half a token refilled: still refused
    assert refused.outcome == "rate_limited" and not refused.subscribe and refused.close_code is None
    assert statuses(refused) == [("error", "rate limited: at most 10 control messages a second; this one was ignored")]
    assert state.receive(SUBSCRIBE_AAPL, 0.1).outcome == "ok"  # a whole token by now
    assert state.receive(SUBSCRIBE_AAPL, 0.1).outcome == "rate_limited"
    # a long pause refills the burst, never more than the burst
    assert [state.receive(SUBSCRIBE_AAPL, 100.0).outcome for _ in range(21)] == ["ok"] * 20 + ["rate_limited"]
    assert state.refused_for_rate == 5


def test_a_flood_past_the_refusals_allowed_closes_1008_and_ends_the_conversation():
    state = authenticated(control_rate=1, control_burst=1, flood_limit=3)
    assert [state.receive(SUBSCRIBE_AAPL, 0.0).outcome for _ in range(3)] == ["rate_limited"] * 3
    flood = state.receive(SUBSCRIBE_AAPL, 0.0)
    assert flood.outcome == "flood" and flood.close_code == CloseReason.POLICY_VIOLATION
    assert statuses(flood) == [("error", "control message flood: closing the connection")]
    assert state.phase is Phase.CLOSED
    assert state.receive(SUBSCRIBE_AAPL, 100.0) == Reaction()  # closed: nothing more, however late


def test_a_subscribe_past_the_channels_a_client_may_hold_is_refused_whole():
    state = authenticated(max_channels_per_client=3)
    assert len(state.receive('{"action":"subscribe","params":"T.A,T.B"}').subscribe) == 2
    refused = state.receive('{"action":"subscribe","params":"T.A,T.C,T.D"}')  # T.A held: 2 new, 4 > 3
    assert refused.outcome == "error" and not refused.subscribe
    assert statuses(refused) == [("error", "channel limit: this connection holds 2 channels and may hold 3; "
                                           "nothing of this subscribe was applied")]
    assert {c.text for c in state.channels} == {"T.A", "T.B"}
    # held ones are not new (a reaction lists only what it adds): exactly at the limit is fine
    assert [c.text for c in state.receive('{"action":"subscribe","params":"T.A,T.B,T.C"}').subscribe] == ["T.C"]


def test_a_message_with_more_channels_than_allowed_is_an_error_not_a_close():
    state = authenticated(max_channels_per_message=2)
    reaction = state.receive('{"action":"subscribe","params":"T.A,T.B,T.C"}')
    assert reaction.outcome == "error" and reaction.close_code is None and not reaction.subscribe
    assert state.channels == set()


def test_a_named_key_is_held_to_its_channels_and_its_markets():
    research = KeyEntry("research", hash_key("research-key"), channels=(parse_channel("T.*"),),
                        markets=frozenset({"stocks"}))
    book = KeyBook((research,))
    state = SessionState(accepted_keys=frozenset(), key_book=book)
    assert state.receive('{"action":"auth","params":"research-key"}').outcome == "authenticated"
    assert state.key == research
    refused = state.receive('{"action":"subscribe","params":"T.AAPL,Q.AAPL,*"}')
    assert refused.outcome == "error" and not refused.subscribe and state.channels == set()
    assert statuses(refused) == [("error", "not entitled: key 'research' may not subscribe Q.AAPL, *; "
                                           "nothing of this subscribe was applied")]
    assert [c.text for c in state.receive('{"action":"subscribe","params":"T.AAPL,T.*"}').subscribe] == [
        "T.AAPL", "T.*"]
    options = SessionState(accepted_keys=frozenset(), key_book=book, market="options")
    wrong_market = options.receive('{"action":"auth","params":"research-key"}')
    assert wrong_market.outcome == "auth_failed" and wrong_market.close_code == CloseReason.POLICY_VIOLATION
    assert statuses(wrong_market) == [("auth_failed", "key 'research' is not entitled to the options market")]
    assert options.phase is Phase.CLOSED


def subscribe_message(count: int, prefix: str = "S") -> str:
    return json.dumps({"action": "subscribe", "params": ",".join(f"T.{prefix}{i}" for i in range(count))})


def test_a_proxy_link_gets_its_own_limits_and_is_never_closed_for_a_flood():
    limits = ProxyLimits(max_channels=50_000, control_rate=1000)
    client = SessionState(accepted_keys=frozenset({"k"}), proxy_limits=limits, control_rate=50, control_burst=100)
    proxy = SessionState(accepted_keys=frozenset({"k"}), proxy_limits=limits, control_rate=50, control_burst=100)
    client.receive('{"action":"auth","params":"k"}')
    proxy.receive('{"action":"auth","params":"k","role":"proxy"}')
    assert proxy.downstream_proxy and not client.downstream_proxy
    # the union of many clients' channels: more than one end client may hold
    for part in range(3):
        assert proxy.receive(subscribe_message(10_000, f"P{part}X")).subscribe
    assert len(proxy.channels) == 30_000
    assert client.receive(subscribe_message(10_000, "A")).subscribe
    assert statuses(client.receive(subscribe_message(1, "B")))[0][1].startswith("channel limit")
    # 3,000 messages at once: the client is closed for a flood; the proxy gets a budget of 2,000,
    # then its messages are refused one by one (it relays each refusal), never closed
    client_closed = proxy_closed = refused = 0
    for _ in range(3000):
        client_closed += client.receive('{"action":"unsubscribe","params":"T.A1"}', 1.0).close_code is not None
        reaction = proxy.receive('{"action":"unsubscribe","params":"T.A1"}', 1.0)
        proxy_closed += reaction.close_code is not None
        refused += reaction.outcome == "rate_limited"
    assert client_closed == 1 and proxy_closed == 0 and 900 <= refused <= 1000


def test_the_role_means_nothing_where_proxies_have_no_limits_of_their_own():
    state = SessionState(accepted_keys=frozenset({"k"}))
    assert state.receive('{"action":"auth","params":"k","role":"proxy"}').replies == (protocol.AUTH_SUCCESS,)
    assert not state.downstream_proxy and state.max_channels_per_client == 10_000
    bad = SessionState(accepted_keys=frozenset({"k"}))
    assert statuses(bad.receive('{"action":"auth","params":"k","role":5}')) == [("error", '"role" must be a string')]


def test_a_big_subscribe_is_handled_in_steps_with_the_same_outcome():
    message = subscribe_message(10_000)
    whole, stepped = SessionState(accepted_keys=frozenset({"k"})), SessionState(accepted_keys=frozenset({"k"}))
    for state in (whole, stepped):
        state.receive('{"action":"auth","params":"k"}')
    expected = whole.receive(message)
    steps = stepped.receive_in_steps(message, step=CHANNELS_PER_STEP)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            reaction = done.value
            break
        yields += 1
        assert len(stepped.channels) in (0, 10_000)  # applied at once, once every channel was checked
    assert yields >= 2 * (10_000 // CHANNELS_PER_STEP) - 2  # parsing, then the answer, in slices
    assert reaction == expected and stepped.channels == whole.channels
    # a bad channel anywhere: nothing applied, whatever step it is in
    bad = SessionState(accepted_keys=frozenset({"k"}))
    bad.receive('{"action":"auth","params":"k"}')
    params = ",".join(f"T.S{i}" for i in range(9_000)) + ",T.BAD;"
    assert statuses(bad.receive(json.dumps({"action": "subscribe", "params": params})))[0][0] == "error"
    assert not bad.channels
