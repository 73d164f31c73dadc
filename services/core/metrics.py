"""Prometheus metrics: an HTTP exposition endpoint and collectors that read live counters.

Services keep plain counters in their own objects (the engine, the
dispatcher); a collector turns them into metric families when Prometheus
scrapes, so the hot paths never touch a metrics library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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
