"""Prometheus metrics of one app instance: requests and latency per route, batch sizes, queue depth, collection
sizes. Each app gets its own registry (tests run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.batcher import BatchStats

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """The app's metric families."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("xclip_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("xclip_request_seconds", "HTTP request latency by route", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("xclip_batch_size", "Items per encoder batch", ["modality"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("xclip_batch_seconds", "Encoder time per batch", ["modality"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_batch(self, modality: str, stats: BatchStats) -> None:
        self.batch_size.labels(modality).observe(stats.size)
        self.batch_seconds.labels(modality).observe(stats.seconds)

    def add_gauges(self, queue_depths: Callable[[], Iterable[tuple[str, str, int]]],
                   collection_sizes: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Gauges read at scrape time: queue depth per (model, modality) and items per collection."""
        self.registry.register(_GaugeCollector(queue_depths, collection_sizes))


class _GaugeCollector(Collector):
    def __init__(self, queue_depths, collection_sizes):
        self.queue_depths, self.collection_sizes = queue_depths, collection_sizes

    def collect(self):
        queue = GaugeMetricFamily("xclip_queue_depth", "Items waiting for a batch", labels=["model", "modality"])
        for model, modality, depth in self.queue_depths():
            queue.add_metric([model, modality], depth)
        items = GaugeMetricFamily("xclip_collection_items", "Items per collection", labels=["collection"])
        for name, count in self.collection_sizes():
            items.add_metric([name], count)
        yield queue
        yield items
