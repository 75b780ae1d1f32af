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
