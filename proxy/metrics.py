"""What a tier counts, and how Prometheus reads it.

The hot path only adds to plain integers on :class:`TierStats`; a
prometheus-client collector turns them into metric families at scrape time,
so routing pays no lock or registry call per event. The one histogram,
routing latency (frame received from upstream → handed to a client's socket),
is observed once per client write, into plain counts as well
(:class:`LatencyHistogram`).
"""

from __future__ import annotations

import bisect
import itertools
from typing import TYPE_CHECKING, Iterator

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .outbox import SlowClientPolicy

if TYPE_CHECKING:
    from .tier import Tier

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@attrs.define
class LatencyHistogram:
    """Seconds from a frame's arrival from upstream to its events being handed to a client socket.

    Observed once per client write, which is the hot path: a bisect and two
    additions, no lock (prometheus-client's Histogram.observe measured 0.7 µs a
    call, about a tenth of a whole write). Prometheus reads it at scrape time.
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    #: counts[i] observations were at most bounds[i] and above bounds[i - 1]; the last, above all bounds
    counts: list[int] = attrs.field(init=False)
    total_seconds: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total_seconds += seconds

    def family(self, name: str, documentation: str, labels: list[str], values: list[str]) -> HistogramMetricFamily:
        cumulative = list(itertools.accumulate(self.counts))
        buckets = [(floatToGoString(bound), count) for bound, count in zip(self.bounds, cumulative)]
        buckets.append(("+Inf", cumulative[-1]))
        family = HistogramMetricFamily(name, documentation, labels=labels)
        family.add_metric(values, buckets, sum_value=self.total_seconds)
        return family


@attrs.define
class TierStats:
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
    outages: int = 0
    outage_seconds: float = 0.0
    routing_latency: LatencyHistogram = attrs.field(factory=LatencyHistogram)


class TierCollector:
    """Reads a running tier's counters and state when Prometheus scrapes."""

    def __init__(self, tier: Tier) -> None:
        self._tier = tier

    def collect(self) -> Iterator[Metric]:
        tier, stats = self._tier, self._tier.stats
        labels = ["tier"]
        name = [tier.config.tier]

        def counter(metric: str, documentation: str, value: int) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, documentation, labels=labels)
            family.add_metric(name, value)
            return family

        def gauge(metric: str, documentation: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, documentation, labels=labels)
            family.add_metric(name, value)
            return family

        hub, registry, link = tier.hub, tier.registry, tier.link
        yield gauge("proxy_clients_connected", "Clients connected now", len(hub.sessions))
        yield counter("proxy_clients", "Client connections accepted", stats.clients_total)
        yield gauge("proxy_client_channels", "Channels held by clients, summed over clients",
                    sum(registry.count_of(s) for s in hub.sessions))
        yield gauge("proxy_upstream_channels", "Channels held upstream (the * extension included)",
                    registry.upstream_count + len(tier.config.upstream_extra))
        yield counter("proxy_upstream_frames", "Data frames received from upstream", stats.frames_in)
        yield counter("proxy_upstream_events", "Data events received from upstream", stats.events_in)
        yield counter("proxy_upstream_bytes", "Bytes of frames received from upstream", stats.bytes_in)
        yield counter("proxy_upstream_bad_frames", "Malformed upstream frames dropped", stats.bad_frames)
        yield counter("proxy_client_frames_sent", "Frames sent to clients", stats.frames_out)
        yield counter("proxy_client_events_sent", "Events sent to clients", stats.events_out)
        yield counter("proxy_client_bytes_sent", "Bytes sent to clients", stats.bytes_out)
        dropped = CounterMetricFamily("proxy_events_dropped", "Events not delivered to a client, by reason",
                                      labels=["tier", "reason"])
        # closed sessions' losses and those of clients still connected, so a drop_oldest client
        # that keeps losing data shows it now, not when it finally leaves
        dropped.add_metric([*name, "drop_oldest"], hub.dropped(SlowClientPolicy.DROP_OLDEST))
        dropped.add_metric([*name, "slow_consumer"], hub.dropped(SlowClientPolicy.DISCONNECT))
        yield dropped
        yield counter("proxy_slow_consumer_disconnects", "Clients disconnected as slow consumers",
                      stats.slow_consumer_disconnects)
        yield counter("proxy_auth_failures", "Client authentications refused", stats.auth_failures)
        yield counter("proxy_control_errors", "Client control messages answered with an error",
                      stats.control_errors)
        yield counter("proxy_control_rate_limited", "Client control messages refused by the rate limit",
                      stats.control_rate_limited)
        refused = CounterMetricFamily("proxy_clients_refused", "Connections refused by a limit",
                                      labels=["tier", "reason"])
        refused.add_metric([*name, "max_clients"], stats.refused_max_clients)
        refused.add_metric([*name, "max_connections_per_ip"], stats.refused_per_ip)
        yield refused
        yield counter("proxy_upstream_outages", "Upstream outages (connected, then lost)", stats.outages)
        yield counter("proxy_upstream_outage_seconds", "Seconds without upstream after a loss, in all "
                      "(events Polygon sent then are gone)", stats.outage_seconds)  # type: ignore[arg-type]
        yield gauge("proxy_upstream_connected", "1 while the upstream is connected and authenticated",
                    1 if tier.readiness()[0] else 0)
        yield counter("proxy_upstream_reconnects", "Upstream reconnect attempts", link.reconnects)
        yield stats.routing_latency.family(
            "proxy_routing_latency_seconds",
            "Time from a frame's arrival from upstream to its events being handed to a client socket",
            labels, name,
        )
