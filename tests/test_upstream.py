"""The upstream link's timing, without sockets and under a MockClock: the reconnect backoff
(growth, jitter, cap, reset after a healthy connection, the long wait after a refusal) and the
keepalive. The connection is scripted: a subclass replaces ``_connect_and_serve``.
(Real reconnects over sockets: test_firehose, test_reliability, test_first_hour.)"""

from __future__ import annotations

import attrs
import pytest
import trio

from proxy.core.backoff import Backoff
from proxy.net.beacon import Beacon
from proxy.net.upstream import LinkState, UpstreamLink, UpstreamProtocolError, UpstreamRefused

BACKOFF = Backoff(initial_seconds=0.5, max_seconds=30, healthy_after_seconds=10, refused_seconds=60)


@attrs.define(eq=False)
class ScriptedLink(UpstreamLink):
    """An UpstreamLink whose connections do what ``script`` says, one entry per try:

    ``"fail"`` (the connection cannot be made), ``"refuse"`` (auth_failed), or
    ``("connected", seconds, carried_data)`` (authenticated, then lost after ``seconds``).
    After the script, tries fail. ``tries`` records when each try started.
    """

    script: list = attrs.field(factory=list, kw_only=True)
    tries: list[float] = attrs.field(factory=list, kw_only=True)
    lost: list[str] = attrs.field(factory=list, kw_only=True)

    async def _connect_and_serve(self) -> None:
        self.tries.append(trio.current_time())
        step = self.script.pop(0) if self.script else "fail"
        await trio.sleep(0.001)  # a try takes a moment
        if step == "fail":
            raise OSError("connection refused")
        if step == "refuse":
            raise UpstreamRefused("auth_failed", "authentication failed")
        _, seconds, carried_data = step
        self.state = LinkState.CONNECTED
        self._carried_data = carried_data
        await trio.sleep(seconds)
        raise OSError("connection reset")


def scripted(*script: object, backoff: Backoff = BACKOFF) -> ScriptedLink:
    frames, _ = trio.open_memory_channel(0)
    link = ScriptedLink("Polygon", "ws://upstream.invalid", "key", desired=frozenset, demand_changed=Beacon(),
                        frames=frames, backoff=backoff, api_key_source="POLYGON_API_KEY", script=list(script))
    link.on_disconnected = link.lost.append
    return link


async def run_for(link: ScriptedLink, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await link.run()


def waits(link: ScriptedLink, durations: list[float]) -> list[float]:
    """The wait before each try after the first, given how long each try lasted."""
    return [later - (earlier + lasted) for earlier, later, lasted in zip(link.tries, link.tries[1:], durations)]


async def test_failures_back_off_exponentially_with_jitter_up_to_the_cap(autojump_clock):
    link = scripted()
    await run_for(link, 600)
    gaps = waits(link, [0.001] * len(link.tries))
    ceilings = [min(BACKOFF.max_seconds, BACKOFF.initial_seconds * 2 ** n) for n in range(len(gaps))]
    for gap, ceiling in zip(gaps, ceilings):
        assert ceiling / 2 <= gap + 1e-9 and gap <= ceiling + 1e-9, (gap, ceiling)
    assert ceilings[:7] == [0.5, 1, 2, 4, 8, 16, 30] and len(gaps) > 20  # at the cap: ~30 s apart at most
    assert len(set(round(gap, 6) for gap in gaps[8:])) > 1  # jittered: tries do not march in step
    assert link.lost == []  # never connected: no outage to report
    assert link.reconnects == len(link.tries) and link.state is LinkState.DISCONNECTED  # each try's end counts


async def test_a_refusal_waits_the_long_delay_and_does_not_grow_the_backoff(autojump_clock):
    link = scripted("fail", "fail", "refuse")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        await trio.sleep(30)
        assert link.state is LinkState.REFUSED and len(link.tries) == 3
        assert link.last_error == "auth_failed: authentication failed (Polygon refused the key in POLYGON_API_KEY)"
        await trio.sleep(40)
        nursery.cancel_scope.cancel()
    gaps = waits(link, [0.001] * len(link.tries))
    assert gaps[2] == pytest.approx(BACKOFF.refused_seconds)
    assert 1 <= gaps[3] <= 2  # after the refusal, the backoff goes on from where the failures left it


async def test_a_connection_that_carried_data_resets_the_backoff(autojump_clock):
    link = scripted(*["fail"] * 8, ("connected", 1, True))
    await run_for(link, 400)
    gaps = waits(link, [0.001] * 8 + [1.001] + [0.001] * 10)
    assert gaps[7] >= 30 / 2  # eight failures: the long wait
    assert BACKOFF.initial_seconds / 2 <= gaps[8] <= BACKOFF.initial_seconds  # healthy: short again
    assert link.lost == ["OSError: connection reset"]  # one outage, reported once


@pytest.mark.parametrize("lasted, healthy", [(9.0, False), (10.5, True)])
async def test_a_connection_without_data_is_healthy_only_once_it_lasted(autojump_clock, lasted, healthy):
    link = scripted(*["fail"] * 6, ("connected", lasted, False))
    await run_for(link, 200)
    gaps = waits(link, [0.001] * 6 + [lasted + 0.001] + [0.001] * 10)
    if healthy:
        assert BACKOFF.initial_seconds / 2 <= gaps[6] <= BACKOFF.initial_seconds
    else:
        assert gaps[6] >= 30 / 2  # it went on growing: seven failures
    assert link.lost == ["OSError: connection reset"]


async def test_a_long_outage_never_overflows_the_backoff(autojump_clock):
    link = scripted()
    link.failures = 10_000  # 2 ** 10_000 would overflow a float
    await run_for(link, 100)
    gaps = waits(link, [0.001] * len(link.tries))
    assert gaps and all(BACKOFF.max_seconds / 2 <= gap <= BACKOFF.max_seconds for gap in gaps)


# --- keepalive -----------------------------------------------------------------------------------


class PingedUpstream:
    """What the keepalive uses of an UpstreamSocket: ``ping``, answered after ``answer_after``."""

    def __init__(self, answer_after: float | None) -> None:
        self.answer_after = answer_after
        self.pings: list[float] = []

    async def ping(self, payload: bytes) -> None:
        self.pings.append(trio.current_time())
        if self.answer_after is None:
            await trio.sleep_forever()
        await trio.sleep(self.answer_after)


async def test_a_silent_upstream_is_given_up_after_the_interval_and_the_timeout(autojump_clock):
    link = scripted()
    link.keepalive_interval, link.keepalive_timeout = 10.0, 20.0
    upstream = PingedUpstream(answer_after=None)
    start = trio.current_time()
    with pytest.raises(UpstreamProtocolError, match="no answer to a ping for 20s: upstream is silent"):
        await link._keepalive(upstream)  # type: ignore[arg-type]
    assert upstream.pings == [pytest.approx(start + 10)]
    assert trio.current_time() == pytest.approx(start + 30)


async def test_an_upstream_that_sends_data_is_kept_however_late_its_pong(autojump_clock):
    """Its pong waits behind the data it queued for us: while frames come, the link is not silent.
    Before: given up 30 s in (the ping's 20 s timeout), with frames arriving every second."""
    link = scripted()
    link.keepalive_interval, link.keepalive_timeout = 10.0, 20.0
    upstream = PingedUpstream(answer_after=None)  # the pong never comes
    start = trio.current_time()

    async def frames_for(seconds: float) -> None:
        while trio.current_time() < start + seconds:
            link.last_received_at = trio.current_time()
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(frames_for, 100.0)
        with pytest.raises(UpstreamProtocolError, match="no answer to a ping for 20s: upstream is silent"):
            await link._keepalive(upstream)  # type: ignore[arg-type]
    # the last frame came at 99 s: silent from there, given up 20 s later
    assert trio.current_time() == pytest.approx(start + 99 + 20)


async def test_an_upstream_that_answers_pings_in_time_is_kept(autojump_clock):
    link = scripted()
    link.keepalive_interval, link.keepalive_timeout = 10.0, 20.0
    upstream = PingedUpstream(answer_after=19.0)  # slow, but within the timeout
    start = trio.current_time()
    with trio.move_on_after(3600):
        await link._keepalive(upstream)  # type: ignore[arg-type]
    # the next ping an interval after the last answer, for as long as the link lives
    assert upstream.pings == pytest.approx([start + 10 + 29 * n for n in range(124)])
