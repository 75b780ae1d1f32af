"""What a tier counts: plain numbers the hot path adds to, read by the exposition at scrape time.

The router and the fan-out only add to integers on :class:`TierStats`; nothing
here knows Prometheus (``proxy.app.exposition`` turns these into metric
families), so the counting costs no lock or registry call per event. The one
histogram, routing latency (frame received from upstream → handed to a client's
socket), is plain counts as well (:class:`LatencyHistogram`).
"""

from __future__ import annotations

import bisect
import collections
import itertools

import attrs

__all__ = ["LATENCY_BUCKETS", "JournalFigures", "LatencyHistogram", "Outage", "RateSample", "TierHistory", "TierSnapshot", "TierStats"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@attrs.define
class LatencyHistogram:
    """Seconds from a frame's arrival from upstream to its events being handed to a client socket.

    Observed once per client write, which is the hot path: a bisect and two
    additions, no lock (docs/performance.md has the measurement against
    prometheus-client's own Histogram). Read at scrape time.
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    #: counts[i] observations were at most bounds[i] and above bounds[i - 1]; the last, above all bounds
    counts: list[int] = attrs.field(init=False)
    total_seconds: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        """Count one observation of ``seconds``."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total_seconds += seconds

    def cumulative(self) -> list[int]:
        """Observations at most each bound, then all of them (Prometheus's ``le`` buckets, ``+Inf`` last)."""
        return list(itertools.accumulate(self.counts))


@attrs.define
class TierStats:
    """A tier's running totals since start-up; the exposition reads them at scrape time."""

    frames_in: int = 0
    events_in: int = 0
    bytes_in: int = 0
    bad_frames: int = 0
    frames_out: int = 0
    events_out: int = 0
    bytes_out: int = 0
    dropped_drop_oldest: int = 0
    dropped_slow_consumer: int = 0
    slow_consumer_disconnects: int = 0
    auth_failures: int = 0
    clients_total: int = 0
    control_errors: int = 0
    control_rate_limited: int = 0
    refused_max_clients: int = 0
    refused_per_ip: int = 0
    refused_per_key: int = 0
    dead_clients_closed: int = 0
    outages: int = 0
    outage_seconds: float = 0.0
    #: Resumes ("from"): replays served (begun), events they held, and subscribes with "from"
    #: answered with an error (nothing applied).
    replays: int = 0
    replay_events: int = 0
    replays_refused: int = 0
    #: Client subscribes refused whole because they would pass the market's upstream caps or
    #: ask a wildcard Polygon does not allow there.
    cap_refusals: int = 0
    routing_latency: LatencyHistogram = attrs.field(factory=LatencyHistogram)


@attrs.frozen
class JournalFigures:
    """The journal's figures at one moment: records journaled since start, what the memory
    ring holds, and the disk writer's totals (zero without ``JOURNAL_DIR``)."""

    records: int
    memory_records: int
    memory_bytes: int
    disk: bool = False
    disk_records_written: int = 0
    disk_bytes_written: int = 0
    disk_records_dropped: int = 0
    disk_gaps: int = 0
    disk_seqs_missing: int = 0
    disk_write_errors: int = 0


@attrs.frozen
class TierSnapshot:
    """A tier at one moment, for whoever reports on it (the Prometheus exposition, a status page).

    ``stats`` is the live counters object, read as it is at reading time; the
    other fields are computed when the snapshot is taken.
    """

    tier: str
    stats: TierStats
    clients_connected: int
    client_channels: int
    upstream_channels: int
    dropped_drop_oldest: int
    dropped_slow_consumer: int
    upstream_connected: bool
    upstream_reconnects: int
    #: Per key name: (clients connected, events sent, events dropped), clients that left included.
    keys: dict[str, tuple[int, int, int]] = attrs.field(factory=dict)
    #: The journal's figures; None when the tier keeps no journal.
    journal: JournalFigures | None = None
    #: The market and feed these figures are of (its path: ``stocks``, ``delayed/stocks``).
    market: str = "stocks"
    #: Whether upstream refused us (not entitled, a key in use elsewhere) and we wait the long backoff.
    upstream_refused: bool = False
    #: Times upstream ended or refused our connection because another used the key's connection.
    upstream_evictions: int = 0


@attrs.frozen
class RateSample:
    """Events per second in and out over the second that ended at ``t_ms`` (ms since the epoch)."""

    t_ms: int
    events_in: int
    events_out: int


@attrs.define
class Outage:
    """An upstream outage: when it began (ms since the epoch), how long it lasted (None: going on), why."""

    began_ms: int
    reason: str
    seconds: float | None = None


@attrs.define
class TierHistory:
    """The last minutes of a tier, for a status page: per-second rates and the latest outages.

    Bounded: ``RATE_SECONDS`` samples and ``OUTAGES_KEPT`` outages; the oldest go first.
    """

    RATE_SECONDS = 600
    OUTAGES_KEPT = 50
    rates: collections.deque[RateSample] = attrs.field(
        factory=lambda: collections.deque(maxlen=TierHistory.RATE_SECONDS))
    outages: collections.deque[Outage] = attrs.field(
        factory=lambda: collections.deque(maxlen=TierHistory.OUTAGES_KEPT))
    _last: tuple[float, int, int] | None = None

    def sample(self, now_ms: int, events_in: int, events_out: int) -> None:
        """Record the totals at ``now_ms``; the rate is the change since the previous sample."""
        if self._last is not None:
            then_ms, last_in, last_out = self._last
            elapsed = max((now_ms - then_ms) / 1000, 1e-3)
            self.rates.append(RateSample(now_ms, round((events_in - last_in) / elapsed),
                                         round((events_out - last_out) / elapsed)))
        self._last = (now_ms, events_in, events_out)

    def outage_began(self, now_ms: int, reason: str) -> None:
        """An outage starts now (``now_ms``), for ``reason``."""
        self.outages.append(Outage(began_ms=now_ms, reason=reason))

    def outage_ended(self, seconds: float) -> None:
        """The outage going on ended after ``seconds``."""
        if self.outages and self.outages[-1].seconds is None:
            self.outages[-1].seconds = seconds
