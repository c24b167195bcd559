"""Prometheus metrics: one registry per process role so tests and demos can run side by side."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Metrics:
    registry: CollectorRegistry
    consumed: Counter
    published: Counter
    dead_lettered: Counter
    intents: Counter
    results: Counter
    outcomes: Counter
    handler_latency: Histogram
    open_signals: Gauge
    recovered: Counter
    pending_releases: Gauge
    owned_partitions: Gauge
    full_gc: Histogram
    forgotten: Counter
    fenced_batches: Counter
    signals_paused: Gauge
    signal_pauses: Counter
    _children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict, repr=False)

    def count(self, metric: Counter, *labels: str) -> None:
        """`metric.labels(*labels).inc()`, with the labelled child remembered: `labels` checks
        its arguments and takes a lock on every call, and a release counts five things."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        child.inc()

    @classmethod
    def create(cls, role: str) -> Metrics:
        r = CollectorRegistry()
        ns = "orch"
        return cls(
            registry=r,
            consumed=Counter(
                "messages_consumed", "Records consumed", ["topic"], namespace=ns, registry=r
            ),
            published=Counter(
                "messages_published", "Records published", ["topic"], namespace=ns, registry=r
            ),
            dead_lettered=Counter(
                "dead_lettered",
                "Records refused and sent to the dead-letter topic",
                ["topic", "error_type"],
                namespace=ns,
                registry=r,
            ),
            intents=Counter(
                "intents", "Order intents released", ["kind"], namespace=ns, registry=r
            ),
            results=Counter(
                "results", "Execution results published", ["status"], namespace=ns, registry=r
            ),
            outcomes=Counter(
                "decisions",
                "Decisions by input kind and outcome (planned, duplicate, out_of_order, ...)",
                ["input", "outcome"],
                namespace=ns,
                registry=r,
            ),
            handler_latency=Histogram(
                "handler_seconds",
                f"{role}: time from poll to committed offset, per batch",
                ["subscriber"],
                namespace=ns,
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            open_signals=Gauge(
                "open_signals", "Signals not yet terminal", namespace=ns, registry=r
            ),
            pending_releases=Gauge(
                "pending_releases",
                "Intents scheduled and not yet released",
                namespace=ns,
                registry=r,
            ),
            owned_partitions=Gauge(
                "owned_partitions",
                "Partitions (and so portfolios) this worker decides for",
                namespace=ns,
                registry=r,
            ),
            forgotten=Counter(
                "forgotten_signals",
                "Finished signals let go from memory after lingering",
                namespace=ns,
                registry=r,
            ),
            fenced_batches=Counter(
                "lease_fenced_batches",
                "Producer batches of decision records not sent: the group lease had ended "
                "between handing them over and the send (a frozen or cut-off worker woke)",
                namespace=ns,
                registry=r,
            ),
            signals_paused=Gauge(
                "signals_paused",
                "1 while new signals wait in Kafka (backpressure), else 0",
                namespace=ns,
                registry=r,
            ),
            signal_pauses=Counter(
                "signal_pauses",
                "Times new signals were paused, by reason (reports_waiting, open_signals)",
                ["reason"],
                namespace=ns,
                registry=r,
            ),
            full_gc=Histogram(
                "full_gc_seconds",
                f"{role}: pause of each full garbage collection of the frozen heap",
                namespace=ns,
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            recovered=Counter(
                "recovered_outbox_records",
                "Outputs republished at start-up from an unfinished outbox",
                ["topic"],
                namespace=ns,
                registry=r,
            ),
        )


class _CountersCollector(Collector):
    """Exposes every int field of a counters dataclass as a Prometheus counter, read at scrape."""

    def __init__(self, prefix: str, counters: object) -> None:
        self._prefix, self._counters = prefix, counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        for f in fields(self._counters):  # type: ignore[arg-type]
            value = getattr(self._counters, f.name)
            if isinstance(value, int):
                yield CounterMetricFamily(
                    f"{self._prefix}_{f.name}", f.name.replace("_", " "), value
                )


def counters_registry(prefix: str, counters: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_CountersCollector(prefix, counters))
    return registry
