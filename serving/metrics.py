"""The server's Prometheus metrics, served at /metrics in Prometheus' text format.

With several worker processes, each writes its counters to PROMETHEUS_MULTIPROC_DIR (set by `babyweight serve`
before the workers start) and /metrics adds up every process's, as prometheus_client does under gunicorn.
"""
import os
from typing import Dict, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("babyweight_requests", "Requests answered, by version, route and HTTP status.",
                                ["version", "route", "code"], registry=self.registry)
        self.latency = Histogram("babyweight_request_seconds",
                                 "Time from a request's body to its answer, by version and path (cache, model, "
                                 "examples).", ["version", "path"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("babyweight_batch_instances", "Instances per model call.", ["version"],
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.cache = Counter("babyweight_cache_lookups", "Instances looked up in the prediction table, by result.",
                             ["version", "result"], registry=self.registry)
        self._children: Dict[Tuple, object] = {}

    def _child(self, metric, *labels):
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, version: str, route: str, code: int) -> None:
        self._child(self.requests, version, route, str(code)).inc()

    def observe(self, version: str, path: str, seconds: float) -> None:
        self._child(self.latency, version, path).observe(seconds)

    def lookups(self, version: str, hits: int, misses: int) -> None:
        if hits:
            self._child(self.cache, version, "hit").inc(hits)
        if misses:
            self._child(self.cache, version, "miss").inc(misses)

    def batched(self, version: int, instances: int) -> None:
        self._child(self.batch, str(version)).observe(instances)

    def exposition(self) -> bytes:
        """Every process's metrics (multiprocess mode) or this one's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
