"""Prometheus metrics: an HTTP exposition endpoint and collectors that read live counters.

Services keep plain counters in their own objects (the engine, the
dispatcher); a collector turns them into metric families when Prometheus
scrapes, so the hot paths never touch a metrics library.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class SnapshotCollector(Collector):
    """Builds metric families from a callback at scrape time."""

    def __init__(self, snapshot: Callable[[], Iterable[Metric]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        yield from self._snapshot()


def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> CounterMetricFamily:
    """A counter family with one sample (`name` without the `_total` suffix)."""
    family = CounterMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def labelled_counter(name: str, doc: str, samples: dict[tuple[str, ...], float],
                     label_names: Iterable[str]) -> CounterMetricFamily:
    """A counter family (`name` without `_total`) with one sample per label tuple."""
    family = CounterMetricFamily(name, doc, labels=list(label_names))
    for labels, value in samples.items():
        family.add_metric(list(labels), value)
    return family


def gauge(name: str, doc: str, samples: dict[tuple[str, ...], float] | float, label_names: Iterable[str] = ()) -> Metric:
    """A gauge family: one value, or values keyed by label tuples."""
    family = GaugeMetricFamily(name, doc, labels=list(label_names))
    if isinstance(samples, dict):
        for labels, value in samples.items():
            family.add_metric(list(labels), value)
    else:
        family.add_metric([], samples)
    return family


# Bucket bounds shared by the services' histograms (Prometheus `le`), chosen to span a CPU and a GPU mesh.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    """A histogram kept as plain bucket counts per label value: `observe` is a bisect and two additions on the
    hot path (under a lock, since the scrape reads from the exposition thread), `family` builds the metric at
    scrape time."""

    def __init__(self, name: str, doc: str, bounds: Sequence[float], label: str) -> None:
        self.name, self.doc, self.bounds, self.label = name, doc, tuple(bounds), label
        self._counts: dict[str, list[int]] = {}  # label value -> [count per bucket..., count above the last]
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, label_value: str = "") -> None:
        with self._lock:
            counts = self._counts.get(label_value)
            if counts is None:
                counts = self._counts[label_value] = [0] * (len(self.bounds) + 1)
                self._sums[label_value] = 0.0
            counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sums[label_value] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        with self._lock:
            snapshot = [(value, list(counts), self._sums[value]) for value, counts in self._counts.items()]
        for value, counts, total in snapshot:
            cumulative, buckets = 0, []
            for bound, count in zip((*map(_le, self.bounds), "+Inf"), counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([value], buckets, total)
        return family


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{bound:.1f}"


def median(samples: Iterable[float]) -> float:
    """The median of `samples` (0.0 for none): the p50 gauges of recent latencies."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] if ordered else 0.0


def serve_metrics(host: str, port: int, snapshot: Callable[[], Iterable[Metric]]) -> tuple[str, Callable[[], None]]:
    """Expose `snapshot`'s metrics on http://host:port/metrics (port 0: a free one); returns (address, stop)."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return f"{host}:{server.server_port}", stop
