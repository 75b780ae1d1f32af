"""What an upstream link sends and how it reads the answers, without sockets (proxy.core.upstream_control)."""

from __future__ import annotations

import json

from proxy.core import protocol
from proxy.core.protocol import EVERYTHING_CHANNEL, Channel, parse_channel_list
from proxy.core.upstream_control import PendingAnswers, SubscriptionPlan, TokenBucket

NOTHING: frozenset[Channel] = frozenset()


def fmv(*numbers: int) -> list[Channel]:
    return [Channel("FMV", f"S{number}") for number in numbers]


def drain(plan: SubscriptionPlan, wanted, extra=NOTHING) -> list[tuple[str, list[Channel]]]:
    while not plan.classify(wanted, extra, 100):
        pass
    messages = []
    while (message := plan.next_message(wanted, extra)) is not None:
        messages.append(message)
    return messages


def test_a_big_change_goes_out_in_chunks_subscribes_first():
    plan = SubscriptionPlan(chunk=500)
    held = set(fmv(*range(2000)))
    plan.touch(held)
    assert [(verb, len(channels)) for verb, channels in drain(plan, held)] == [("subscribe", 500)] * 4
    wanted = (held - set(fmv(*range(300)))) | set(fmv(*range(5000, 5700)))
    plan.touch(fmv(*range(300)) + fmv(*range(5000, 5700)))
    messages = drain(plan, wanted)
    assert [(verb, len(channels)) for verb, channels in messages] == [
        ("subscribe", 500), ("subscribe", 200), ("unsubscribe", 300)]
    assert plan.sent == wanted and plan.idle


def test_a_change_undone_before_it_went_out_costs_nothing():
    plan = SubscriptionPlan()
    plan.touch(fmv(1, 2))
    assert drain(plan, set(fmv(1, 2))) == [("subscribe", fmv(1, 2))]
    # FMV.S3 subscribed then dropped, FMV.S1 dropped then taken again, all before the link looked
    plan.touch(fmv(3))
    plan.touch(fmv(1))
    assert drain(plan, set(fmv(1, 2))) == []
    # looked at, queued, and undone before its message was made
    plan.touch(fmv(4))
    assert plan.classify(set(fmv(1, 2, 4)), NOTHING, 100)
    assert plan.next_message(set(fmv(1, 2)), NOTHING) is None
    assert plan.sent == set(fmv(1, 2)) and plan.idle


def test_unsubscribes_wait_until_every_changed_channel_was_looked_at():
    # T.* arriving while T.AAPL goes: the wildcard must be asked for before the symbol is dropped
    plan = SubscriptionPlan()
    aapl, trades = Channel("T", "AAPL"), Channel("T", "*")
    plan.touch([aapl])
    drain(plan, {aapl})
    plan.touch([aapl, trades])
    assert not plan.classify({trades}, NOTHING, 1)  # looked at T.AAPL only: its unsubscribe waits
    assert plan.next_message({trades}, NOTHING) is None
    assert drain(plan, {trades}) == [("subscribe", [trades]), ("unsubscribe", [aapl])]


def test_the_extra_channels_go_first_and_are_never_dropped():
    plan = SubscriptionPlan()
    extra = frozenset({EVERYTHING_CHANNEL})
    plan.touch(extra)
    plan.touch(fmv(1))
    assert drain(plan, set(fmv(1)), extra) == [("subscribe", [EVERYTHING_CHANNEL, *fmv(1)])]
    plan.touch([EVERYTHING_CHANNEL, *fmv(1)])
    assert drain(plan, set(), extra) == [("unsubscribe", fmv(1))]


def test_the_token_bucket_paces_under_the_budget():
    bucket = TokenBucket(rate=100, burst=20)
    now, sent = 0.0, []
    while now < 3.0:
        now += bucket.delay(now)
        bucket.take(now)
        sent.append(now)
    assert len([t for t in sent if t < 1.0]) <= 20 + 100  # a burst, then the rate
    assert all(len([t for t in sent if start <= t < start + 1.0]) <= 20 + 100 for start in sent)
    assert abs(len(sent) - (20 + 300)) <= 1


def statuses(frame: str) -> list[dict]:
    return json.loads(frame)


def test_answers_in_full_refuse_nothing():
    answers = PendingAnswers()
    channels = fmv(*range(500))
    answers.sent("subscribe", channels, 0.0)
    assert answers.read(statuses(protocol.subscription_frame("subscribed", channels)), 0.1) == []
    assert len(answers) == 0


def test_an_error_refuses_the_oldest_waiting_request():
    # A tier of ours refuses a whole message with one status naming no channel.
    answers = PendingAnswers()
    answers.sent("subscribe", fmv(1, 2), 0.0)
    answers.sent("subscribe", fmv(3, 4), 0.0)
    answers.sent("unsubscribe", fmv(5), 0.0)
    assert answers.read(statuses(protocol.subscription_frame("subscribed", fmv(1, 2))), 0.1) == []
    refusal = protocol.error_frame("channel limit: this connection holds 3000 channels")
    assert answers.read(statuses(refusal), 0.2) == [(tuple(fmv(3, 4)), "channel limit: this connection holds 3000 channels")]
    assert answers.read(statuses(protocol.error_frame("rate limited")), 0.3) == []  # an unsubscribe: nothing to take back
    assert len(answers) == 0


def test_polygon_answers_channel_by_channel_and_refuses_what_it_did_not_acknowledge():
    answers = PendingAnswers()
    answers.sent("subscribe", fmv(1, 2, 3), 0.0)
    assert answers.read(statuses(protocol.subscription_frame("subscribed", fmv(1))), 0.1) == []
    mixed = [protocol.status_event("success", "subscribed to: FMV.S2"),
             protocol.status_event("error", "unknown channel: FMV.S3")]
    assert answers.read(mixed, 0.2) == [(tuple(fmv(3)), "unknown channel: FMV.S3")]
    assert len(answers) == 0


def test_a_relayed_refusal_names_its_channels_and_answers_no_request():
    answers = PendingAnswers()
    answers.sent("subscribe", fmv(9), 0.0)
    relayed = protocol.refusal_frame(fmv(1, 2), "unknown channel: FMV.S1")
    assert answers.read(statuses(relayed), 0.1) == [
        (tuple(fmv(1, 2)), "upstream refused FMV.S1,FMV.S2 (unknown channel: FMV.S1)")]
    assert len(answers) == 1  # FMV.S9 still waits for its answer
    assert protocol.refused_channels("upstream refused T.AAPL (x)") == parse_channel_list("T.AAPL")
    assert protocol.refused_channels("rate limited: at most 50 control messages a second") is None


def test_a_request_never_answered_is_let_go():
    answers = PendingAnswers(timeout=30.0)
    answers.sent("subscribe", fmv(1), 0.0)  # e.g. a type Polygon does not know: no answer at all
    answers.sent("subscribe", fmv(2), 40.0)
    assert answers.read(statuses(protocol.error_frame("channel limit")), 41.0) == [(tuple(fmv(2)), "channel limit")]
