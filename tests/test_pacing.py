"""FlushPacer (CLIENT_FLUSH_MS), socket-free: who is written now, who at the end of the interval."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from proxy.core.pacing import FlushPacer


def test_a_client_never_written_or_quiet_for_an_interval_is_written_at_once():
    pacer: FlushPacer[str] = FlushPacer(0.005)
    assert pacer.ready("a", 10.0)
    pacer.written("a", 10.0)
    assert pacer.ready("a", 10.005)  # exactly an interval later
    assert pacer.next_due() is None and len(pacer) == 0


def test_within_the_interval_the_write_waits_for_its_end_and_is_scheduled_once():
    pacer: FlushPacer[str] = FlushPacer(0.005)
    pacer.written("a", 10.0)
    assert not pacer.ready("a", 10.001)
    assert not pacer.ready("a", 10.004)  # more for it meanwhile: still the one write
    assert pacer.next_due() == 10.005 and len(pacer) == 1
    assert pacer.due(10.0049) == []
    assert pacer.due(10.005) == ["a"]
    assert pacer.due(10.006) == [] and pacer.next_due() is None


def test_scheduled_writes_come_out_by_their_time_not_by_when_they_were_scheduled():
    pacer: FlushPacer[str] = FlushPacer(0.010)
    pacer.written("early", 0.000)
    pacer.written("late", 0.008)
    assert not pacer.ready("late", 0.009)  # due 0.018
    assert not pacer.ready("early", 0.0095)  # scheduled after it, due before it: 0.010
    assert pacer.next_due() == 0.010
    assert pacer.due(0.020) == ["early", "late"]


def test_a_write_made_meanwhile_cancels_the_scheduled_one_and_a_client_that_left_is_forgotten():
    pacer: FlushPacer[str] = FlushPacer(0.005)
    pacer.written("a", 1.0)
    pacer.written("b", 1.0)
    assert not pacer.ready("a", 1.001) and not pacer.ready("b", 1.001)
    pacer.written("a", 1.002)  # its writer wrote (an answer, a drained backlog) and took the events along
    pacer.forget("b")
    assert pacer.next_due() is None and pacer.due(2.0) == [] and len(pacer) == 0
    assert pacer.ready("b", 1.003)  # back as new: nothing remembered


@settings(max_examples=300, deadline=None)
@given(
    interval_ms=st.integers(min_value=1, max_value=20),
    touches=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 15)), min_size=1, max_size=80),
)
def test_every_client_is_written_at_most_once_per_interval_and_never_later_than_one_after_its_data(
        interval_ms, touches):
    """A tier's use of the pacer, with times in whole microseconds so that the bounds are exact: each
    touch (client, µs since the previous) is new data for that client, written now if the pacer says so;
    the flusher makes every scheduled write exactly when it is due."""
    interval = interval_ms * 1000
    pacer: FlushPacer[int] = FlushPacer(interval)
    writes: dict[int, list[int]] = {}
    pending: dict[int, int] = {}  # client -> when its oldest unwritten data came

    def write(client: int, now: int) -> None:
        writes.setdefault(client, []).append(now)
        came = pending.pop(client, None)
        assert came is not None and came <= now <= came + interval  # never later than an interval
        pacer.written(client, now)

    now = 0
    for client, step in touches:
        now += step * 1000 // 3
        while (due := pacer.next_due()) is not None and due <= now:  # the flusher, on time
            for ready in pacer.due(due):
                write(ready, due)
        pending.setdefault(client, now)
        quiet = not writes.get(client) or now - writes[client][-1] >= interval
        if pacer.ready(client, now):
            assert quiet
            write(client, now)  # a lone frame after a quiet spell goes out at once
        else:
            assert not quiet
    while (due := pacer.next_due()) is not None:
        for ready in pacer.due(due):
            write(ready, due)
    assert pending == {}  # everything was written
    for times in writes.values():
        assert all(later - earlier >= interval for earlier, later in zip(times, times[1:]))


def test_a_forgotten_client_is_referenced_nowhere():
    """A closed session must be freed at once: the pacer keeps no reference to a client it forgot,
    nor to one written meanwhile, whatever its heap still holds."""
    import gc
    import weakref

    class Client:
        pass

    pacer: FlushPacer[Client] = FlushPacer(0.005)
    left, written = Client(), Client()
    for client in (left, written):
        pacer.written(client, 1.0)
        assert not pacer.ready(client, 1.001)
    pacer.written(written, 1.002)
    references = [weakref.ref(left), weakref.ref(written)]
    pacer.forget(left)
    pacer.forget(written)
    del left, written, client
    gc.collect()
    assert [reference() for reference in references] == [None, None]
