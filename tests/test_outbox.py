"""Outbox: bounded in events, coalescing in order, and both slow-client policies."""

from proxy.core.outbox import Outbox, SlowClientPolicy


def test_runs_of_events_coalesce_into_one_frame_and_whole_frames_stay_verbatim():
    box = Outbox(capacity_events=100)
    box.put_events(b'{"n":1},{"n":2}', 2)
    box.put_events(b'{"n":3}', 1)
    box.put_frame('[{"ev":"status"}]')
    box.put_events(b'{"n":4}', 1)
    assert box.take_frames() == [b'[{"n":1},{"n":2},{"n":3}]', '[{"ev":"status"}]', b'[{"n":4}]']
    assert box.queued_events == 0 and len(box) == 0


def test_disconnect_policy_marks_overflow_and_refuses_more():
    box = Outbox(capacity_events=3, policy=SlowClientPolicy.DISCONNECT)
    assert box.put_events(b"1,2", 2)
    assert not box.put_events(b"3,4", 2)
    assert box.overflowed and box.dropped_events == 4
    assert not box.put_events(b"5", 1)
    assert box.take_frames() == []


def test_drop_oldest_policy_keeps_the_newest_and_counts_the_loss():
    box = Outbox(capacity_events=3, policy=SlowClientPolicy.DROP_OLDEST)
    for n in range(1, 6):
        assert box.put_events(str(n).encode(), 1)
    assert box.take_frames() == [b"[3,4,5]"]
    assert box.dropped_events == 2 and not box.overflowed


def test_one_entry_larger_than_the_capacity_into_an_empty_outbox_is_accepted():
    box = Outbox(capacity_events=2)
    assert box.put_frame("[1,2,3,4]", 4)
    assert box.take_frames() == ["[1,2,3,4]"]


def test_events_written_but_not_yet_taken_by_the_kernel_count_toward_the_capacity():
    box = Outbox(capacity_events=5, policy=SlowClientPolicy.DISCONNECT)
    box.put_events(b"1,2,3", 3)
    box.take_frames()
    box.unsent_events = 3  # the connection's backlog holds them
    assert box.put_events(b"4,5", 2)
    assert not box.put_events(b"6", 1)  # 3 written + 2 queued + 1 > 5
    assert box.overflowed and box.dropped_events == 3  # 4, 5, 6: the written ones are still sent

    box = Outbox(capacity_events=5, policy=SlowClientPolicy.DROP_OLDEST)
    box.unsent_events = 4
    for n in range(1, 4):
        assert box.put_events(str(n).encode(), 1)
    assert box.take_frames() == [b"[3]"] and box.dropped_events == 2  # only the newest fits beside the 4


# --- joining: `*` frames and runs, statuses in place ---------------------------------------------

import json  # noqa: E402

import msgspec  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from proxy.core.outbox import MAX_JOINED_BYTES  # noqa: E402

_raw_events = msgspec.json.Decoder(list[msgspec.Raw]).decode


def test_consecutive_star_frames_become_one_array_and_statuses_keep_their_place():
    box = Outbox(capacity_events=100)
    box.put_array(' [{"n":1} ,\n{"n":2}]\n', 2)  # as upstream sent it: whitespace and all
    box.put_array(b'[{"n":3}]', 1)
    box.put_frame('[{"ev":"status","status":"upstream_disconnected"}]')
    box.put_array(b'[{"n":4}]', 1)
    box.put_events(b'{"n":5}', 1)
    assert box.take_frames() == [b'[{"n":1} ,\n{"n":2},{"n":3}]',
                                 '[{"ev":"status","status":"upstream_disconnected"}]', b'[{"n":4},{"n":5}]']


def test_a_star_frame_alone_goes_out_as_it_came():
    box = Outbox(capacity_events=100)
    frame = ' [{"n":1}]  '
    box.put_array(frame, 1)
    [sent] = box.take_frames()
    assert sent is frame


def test_a_joined_frame_stops_growing_at_the_size_bound():
    box = Outbox(capacity_events=1_000_000)
    event = b'{"x":"' + b"a" * 1000 + b'"}'
    for _ in range(600):  # about 600 kB
        box.put_array(b"[" + event + b"]", 1)
    frames = box.take_frames()
    assert len(frames) == 3 and all(len(frame) <= MAX_JOINED_BYTES + len(event) + 2 for frame in frames)
    assert sum(len(json.loads(frame)) for frame in frames) == 600


_event = st.builds(lambda n: b'{"ev":"T","n":%d}' % n, st.integers(0, 10**6))
_space = st.sampled_from(["", " ", "\n", " \t"])
_entry = st.one_of(
    st.tuples(st.just("events"), st.lists(_event, min_size=1, max_size=5), _space, _space, st.booleans()),
    st.tuples(st.just("array"), st.lists(_event, min_size=1, max_size=5), _space, _space, st.booleans()),
    st.tuples(st.just("status"), st.lists(_event, min_size=1, max_size=1), _space, _space, st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_entry, max_size=30))
def test_taken_frames_are_json_arrays_of_the_original_events_in_order_with_statuses_in_place(entries):
    """Whatever mix of runs, `*` frames (as bytes or text, with whitespace where JSON allows it) and
    verbatim frames is queued: every frame taken is a JSON array; the data events come out byte for
    byte, in order; each status frame comes out as it was, after exactly the data queued before it;
    and no two data frames are adjacent (they would have been one)."""
    box = Outbox(capacity_events=10**6)
    expected: list[object] = []  # data events (bytes), and status frames where they were queued
    for kind, events, before, after, as_text in entries:
        if kind == "events":
            box.put_events(b",".join(events), len(events))
            expected.extend(events)
        elif kind == "array":
            frame = before.encode() + b"[" + (before.encode() + b",").join(events) + b"]" + after.encode()
            box.put_array(frame.decode() if as_text else frame, len(events))
            expected.extend(events)
        else:
            status = '[{"ev":"status","status":"success","message":"%d"}]' % len(expected)
            box.put_frame(status)
            expected.append(status)
    frames = box.take_frames()
    got: list[object] = []
    previous_was_data = False
    for frame in frames:
        if isinstance(frame, str) and '"ev":"status"' in frame:
            got.append(frame)
            previous_was_data = False
            continue
        assert not previous_was_data
        previous_was_data = True
        assert isinstance(json.loads(frame), list)
        got.extend(bytes(raw).strip() for raw in _raw_events(frame))
    assert got == expected
    assert box.queued_events == 0 and len(box) == 0
