"""How Prometheus reads a tier: its counters and state as metric families, rendered at scrape time.

:class:`TierCollector` is a prometheus-client collector over a callable that
returns a :class:`~proxy.core.stats.TierSnapshot`; nothing here runs on the hot
path.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ..core.stats import LatencyHistogram, TierSnapshot

__all__ = ["TierCollector", "histogram_family"]


def histogram_family(histogram: LatencyHistogram, name: str, documentation: str,
                     labels: list[str], values: list[str]) -> HistogramMetricFamily:
    """``histogram`` as one Prometheus histogram family with the given label values."""
    cumulative = histogram.cumulative()
    buckets = [(floatToGoString(bound), count) for bound, count in zip(histogram.bounds, cumulative)]
    buckets.append(("+Inf", cumulative[-1]))
    family = HistogramMetricFamily(name, documentation, labels=labels)
    family.add_metric(values, buckets, sum_value=histogram.total_seconds)
    return family


class TierCollector:
    """Reads a running tier's counters and state when Prometheus scrapes: one series per market
    and feed the tier serves (labels ``tier`` and ``market``: ``stocks``, ``delayed/stocks``)."""

    def __init__(self, snapshots: Callable[[], Iterable[TierSnapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        """The tier's metric families, as they are now (prometheus-client's collector protocol)."""
        families: dict[str, Metric] = {}
        for snapshot in self._snapshots():
            for family in _families(snapshot):
                merged = families.setdefault(family.name, family)
                if merged is not family:
                    merged.samples.extend(family.samples)
        yield from families.values()


def _families(snapshot: TierSnapshot) -> Iterator[Metric]:
    """One market's part of every family (the collector merges the markets' samples)."""
    stats = snapshot.stats
    labels = ["tier", "market"]
    name = [snapshot.tier, snapshot.market]

    def counter(metric: str, documentation: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(metric, documentation, labels=labels)
        family.add_metric(name, value)
        return family

    def gauge(metric: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(metric, documentation, labels=labels)
        family.add_metric(name, value)
        return family

    yield gauge("proxy_clients_connected", "Clients connected now", snapshot.clients_connected)
    yield counter("proxy_clients", "Client connections accepted", stats.clients_total)
    yield gauge("proxy_client_channels", "Channels held by clients, summed over clients",
                snapshot.client_channels)
    yield gauge("proxy_upstream_channels", "Channels held upstream (the * extension included)",
                snapshot.upstream_channels)
    yield counter("proxy_upstream_frames", "Data frames received from upstream", stats.frames_in)
    yield counter("proxy_upstream_events", "Data events received from upstream", stats.events_in)
    yield counter("proxy_upstream_bytes", "Bytes of frames received from upstream", stats.bytes_in)
    yield counter("proxy_upstream_bad_frames", "Malformed upstream frames dropped", stats.bad_frames)
    yield counter("proxy_client_frames_sent", "Frames sent to clients", stats.frames_out)
    yield counter("proxy_client_events_sent", "Events sent to clients", stats.events_out)
    yield counter("proxy_client_bytes_sent", "Bytes sent to clients", stats.bytes_out)
    dropped = CounterMetricFamily("proxy_events_dropped", "Events not delivered to a client, by reason",
                                  labels=[*labels, "reason"])
    # closed sessions' losses and those of clients still connected, so a drop_oldest client
    # that keeps losing data shows it now, not when it finally leaves
    dropped.add_metric([*name, "drop_oldest"], snapshot.dropped_drop_oldest)
    dropped.add_metric([*name, "slow_consumer"], snapshot.dropped_slow_consumer)
    yield dropped
    yield counter("proxy_slow_consumer_disconnects", "Clients disconnected as slow consumers",
                  stats.slow_consumer_disconnects)
    yield counter("proxy_dead_clients_closed", "Clients closed for answering no ping (1011)",
                  stats.dead_clients_closed)
    yield counter("proxy_auth_failures", "Client authentications refused", stats.auth_failures)
    yield counter("proxy_control_errors", "Client control messages answered with an error",
                  stats.control_errors)
    yield counter("proxy_control_rate_limited", "Client control messages refused by the rate limit",
                  stats.control_rate_limited)
    refused = CounterMetricFamily("proxy_clients_refused", "Connections refused by a limit",
                                  labels=[*labels, "reason"])
    refused.add_metric([*name, "max_clients"], stats.refused_max_clients)
    refused.add_metric([*name, "max_connections_per_ip"], stats.refused_per_ip)
    refused.add_metric([*name, "key_max_connections"], stats.refused_per_key)
    yield refused
    yield counter("proxy_upstream_outages", "Upstream outages (connected, then lost)", stats.outages)
    yield counter("proxy_upstream_outage_seconds", "Seconds without upstream after a loss, in all "
                  "(events Polygon sent then are gone)", stats.outage_seconds)
    yield gauge("proxy_upstream_connected", "1 while the upstream is connected and authenticated",
                1 if snapshot.upstream_connected else 0)
    yield gauge("proxy_upstream_refused", "1 while upstream refuses us (not entitled, or the key's "
                "connection is in use elsewhere) and the link waits the long backoff",
                1 if snapshot.upstream_refused else 0)
    yield counter("proxy_upstream_evictions", "Upstream connections ended or refused because another "
                  "program is using this key's connection for the market", snapshot.upstream_evictions)
    yield counter("proxy_subscribes_refused_by_upstream_rules", "Client subscribes refused whole because "
                  "they would pass the market's upstream caps or ask a wildcard Polygon refuses",
                  stats.cap_refusals)
    yield counter("proxy_upstream_reconnects", "Upstream reconnect attempts", snapshot.upstream_reconnects)
    yield counter("proxy_replays", "Replays begun for clients resuming with \"from\"", stats.replays)
    yield counter("proxy_replay_events", "Events sent to clients in replays", stats.replay_events)
    yield counter("proxy_replays_refused", "Subscribes with \"from\" refused with an error (nothing applied)",
                  stats.replays_refused)
    journal = snapshot.journal
    if journal is not None:
        yield counter("proxy_journal_records", "Records journaled (frames from upstream, outages)", journal.records)
        yield gauge("proxy_journal_memory_records", "Journal records held in memory", journal.memory_records)
        yield gauge("proxy_journal_memory_bytes", "Journal bytes held in memory (frames plus an estimate "
                    "of their objects)", journal.memory_bytes)
        # the disk's families are served (as 0) without JOURNAL_DIR too: a dashboard or an
        # alert reads the same names whatever the configuration
        yield counter("proxy_journal_disk_records", "Journal records written to disk",
                      journal.disk_records_written)
        yield counter("proxy_journal_disk_bytes", "Journal bytes written to disk (compressed)",
                      journal.disk_bytes_written)
        yield counter("proxy_journal_disk_records_dropped", "Journal records the disk writer could not "
                      "queue (they become gaps)", journal.disk_records_dropped)
        yield counter("proxy_journal_disk_gaps", "Gap records written: stretches of seqs not on disk",
                      journal.disk_gaps)
        yield counter("proxy_journal_disk_seqs_missing", "Journal seqs not on disk (covered by gap records)",
                      journal.disk_seqs_missing)
        yield counter("proxy_journal_disk_write_errors", "Journal disk writes or syncs that failed",
                      journal.disk_write_errors)
    per_key = [("proxy_key_clients", "Clients connected now, per key name", GaugeMetricFamily, 0),
               ("proxy_key_events_sent", "Events sent to clients, per key name", CounterMetricFamily, 1),
               ("proxy_key_events_dropped", "Events not delivered to clients, per key name",
                CounterMetricFamily, 2)]
    for metric, documentation, kind, index in per_key:
        family = kind(metric, documentation, labels=[*labels, "key"])
        for key, figures in sorted(snapshot.keys.items()):
            family.add_metric([*name, key], figures[index])
        yield family
    yield histogram_family(
        stats.routing_latency, "proxy_routing_latency_seconds",
        "Time from a frame's arrival from upstream to its events being handed to a client socket",
        labels, name,
    )
