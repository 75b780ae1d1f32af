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


# --- the shared run: `*` frames kept once for the holders in step ---------------------------------

from proxy.core.outbox import SharedRun  # noqa: E402


def members_of(capacity: int = 100, count: int = 3,
               policy: SlowClientPolicy = SlowClientPolicy.DISCONNECT) -> tuple[SharedRun[str], list[Outbox]]:
    run: SharedRun[str] = SharedRun(capacity)
    boxes = [Outbox(capacity, policy) for _ in range(count)]
    for index, box in enumerate(boxes):
        assert run.join(f"m{index}", box)
    return run, boxes


def test_a_shared_run_queues_each_frame_once_and_joins_it_once_for_every_member():
    run, boxes = members_of()
    first, second = b'[{"n":1}]', b' [{"n":2},{"n":3}]\n'
    assert run.add(first, 1, received_at=5.0) and run.add(second, 2, received_at=6.0)
    assert len(run) == 2 and run.events == 3 and run.oldest_received_at == 5.0
    assert all(len(box) == 0 and box.events_waiting == 3 and box.oldest_waiting_at == 5.0 for box in boxes)
    assert run.take_frames() == [b'[{"n":1},{"n":2},{"n":3}]']  # as an outbox joins them: once, for all
    assert len(run) == 0 and run.events == 0 and run.oldest_received_at is None
    run.add(first, 1)
    [alone] = run.take_frames()
    assert alone is first  # a frame alone goes out as upstream sent it


def test_a_put_into_a_member_s_outbox_releases_it_after_the_run_s_frames():
    run, (status_box, other, _) = members_of()
    run.add(b'[{"n":1}]', 1, received_at=1.0)
    status = '[{"ev":"status","status":"upstream_disconnected"}]'
    assert status_box.put_frame(status)  # a status: it keeps its place, after what the run held for it
    assert "m0" not in run.members and status_box.shared is None and other.shared is run
    assert run.take_released() == ["m0"] and run.take_released() == []
    assert status_box.queued_events == 2 and status_box.oldest_received_at == 1.0
    run.add(b'[{"n":2}]', 1)  # not for the one that left: it gets its frames itself from now on
    assert status_box.take_frames() == [b'[{"n":1}]', status]
    assert run.take_frames() == [b'[{"n":1},{"n":2}]']


def test_joining_takes_an_empty_run_and_an_outbox_that_holds_and_owes_nothing():
    run, _ = members_of(count=1)
    behind = Outbox(100)
    behind.put_array(b'[{"n":1}]', 1)
    assert not run.join("behind", behind)  # it has its own frames to send first
    behind.take_frames()
    behind.unsent_events = 1
    assert not run.join("behind", behind)  # its socket has not taken them all
    behind.unsent_events = 0
    run.add(b'[{"n":2}]', 1)
    assert not run.join("behind", behind)  # the run holds frames it may already have
    run.take_frames()
    assert not run.join("smaller", Outbox(10))  # queue counting is per client: the same capacity only
    assert run.join("behind", behind) and set(run.members) == {"m0", "behind"}
    run.leave("behind")
    assert behind.shared is None and set(run.members) == {"m0"}


def test_a_frame_that_would_pass_the_capacity_releases_every_member_and_the_policy_applies_to_each():
    run, boxes = SharedRun[str](3), [Outbox(3, SlowClientPolicy.DISCONNECT), Outbox(3, SlowClientPolicy.DROP_OLDEST)]
    for index, box in enumerate(boxes):
        run.join(f"m{index}", box)
    for n in range(3):
        assert run.add(b'[{"n":%d}]' % n, 1)
    assert not run.add(b'[{"n":3}]', 1)  # 3 + 1 > 3: every member goes on alone, with the run's frames
    assert not run.members and len(run) == 0 and sorted(run.take_released()) == ["m0", "m1"]
    cut, dropping = boxes
    assert not cut.put_array(b'[{"n":3}]', 1) and cut.overflowed and cut.dropped_events == 4
    assert dropping.put_array(b'[{"n":3}]', 1) and dropping.dropped_events == 1
    assert dropping.take_frames() == [b'[{"n":1},{"n":2},{"n":3}]']


def test_a_first_frame_larger_than_the_capacity_is_accepted_as_an_empty_outbox_accepts_it():
    run, _ = members_of(capacity=2, count=2)
    assert run.add(b"[1,2,3,4]", 4) and run.events == 4
    assert not run.add(b"[5]", 1) and not run.members
