"""The server's Prometheus metrics, served at /metrics in Prometheus' text format.

With several worker processes, each writes its counters to PROMETHEUS_MULTIPROC_DIR (set by `babyweight serve`
before the workers start) and /metrics adds up every process's, as prometheus_client does under gunicorn.
A request only adds to plain counters in memory; `flush` moves them into prometheus_client's values (shared
memory files in multiprocess mode, a few microseconds a write) every FLUSH_SECONDS and before /metrics answers.
"""

import bisect
import collections
import os
import pathlib
import resource
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from serving.core import manager as manager_lib
from serving.model_server import server

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_SECONDS = 0.5


class _PendingHistogram:
    """Observations not yet flushed: a count per bucket (the last for +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "babyweight_requests",
            "Requests answered, by version, route and HTTP status.",
            ["version", "route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "babyweight_request_seconds",
            "Time from a request's body to its answer, by version and path (cache: every "
            "instance from the table; model: some from the model).",
            ["version", "path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "babyweight_batch_instances",
            "Instances per model call.",
            ["version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.cache = Counter(
            "babyweight_cache_lookups",
            "Instances looked up in the prediction table, by result.",
            ["version", "result"],
            registry=self.registry,
        )
        self.storage_errors = Counter(
            "babyweight_model_storage_errors",
            "Polls of the model folder that failed (listing or reading it); the loaded versions kept serving.",
            registry=self.registry,
        )
        self.experiment_errors = Counter(
            "babyweight_experiment_errors",
            "Experiment records and statistics reads that failed or were dropped (the writer too far behind), by "
            "reason; the clients were answered all the same.",
            ["reason"],
            registry=self.registry,
        )
        self.request_log_dropped = Counter(
            "babyweight_request_log_dropped_records",
            "Request log records not written, by reason (queue_full, write_error, unencodable); answers went out.",
            ["reason"],
            registry=self.registry,
        )
        self.request_log_errors = Counter(
            "babyweight_request_log_errors",
            "Failures to write the request log (folder, file, disk); the writer tries again in a new file.",
            registry=self.registry,
        )
        self._request_log_counts: Optional[Callable[[], Tuple[Mapping[str, int], int]]] = None
        self._request_log_seen: Dict[str, int] = {}  # the totals already added, by reason ('' for errors)
        self.not_a_number_answers = Counter(
            "babyweight_not_a_number_answers",
            "Requests refused (500) because the version answered an instance with no finite number, by version.",
            ["version"],
            registry=self.registry,
        )
        # Gauges: each worker process's own (a pid label in multiprocess mode).
        self.memory = Gauge(
            "babyweight_process_resident_memory_bytes",
            "The worker process's resident memory.",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.cpu = Gauge(
            "babyweight_process_cpu_seconds",
            "CPU time the worker process used since it started (user and system).",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self._versions: Optional[_Versions] = None
        self._counts: Dict[Tuple, float] = collections.defaultdict(float)  # (counter, labels...) -> increment
        self._histograms: Dict[Tuple, _PendingHistogram] = {}

    def request(self, version: str, route: str, code: int) -> None:
        self._counts[(self.requests, version, route, str(code))] += 1

    def observe(self, version: str, path: str, seconds: float) -> None:
        self._pending(self.latency, LATENCY_BUCKETS, version, path).add(seconds)

    def lookups(self, version: str, hits: int, misses: int) -> None:
        if hits:
            self._counts[(self.cache, version, "hit")] += hits
        if misses:
            self._counts[(self.cache, version, "miss")] += misses

    def storage_error(self) -> None:
        """A failed poll of the model folder (from the manager's thread: prometheus_client's own lock)."""
        self.storage_errors.inc()

    def experiment_error(self, reason: str) -> None:
        """An experiment record or refresh lost (from the loop or the writer thread: prometheus_client's own lock)."""
        self.experiment_errors.labels(reason).inc()

    def watch_request_log(self, counts: Callable[[], Tuple[Mapping[str, int], int]]) -> None:
        """Each flush adds what `counts` (RequestLog.counts: dropped records by reason, errors) grew by."""
        self._request_log_counts = counts

    def watch_versions(self, manager: Any) -> None:
        """/metrics shows the manager's versions as this worker holds them: their states and load times (read when
        /metrics is asked, so a version gone from the folder leaves them)."""
        self._versions = _Versions(manager)
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.registry.register(self._versions)

    def _flush_process(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu.set(usage.ru_utime + usage.ru_stime)
        try:
            with open("/proc/self/statm") as handle:
                self.memory.set(int(handle.read().split()[1]) * resource.getpagesize())
        except (OSError, ValueError, IndexError):  # not Linux: the peak instead
            self.memory.set(usage.ru_maxrss * 1024)

    def _flush_request_log(self) -> None:
        if self._request_log_counts is None:
            return
        dropped, errors = self._request_log_counts()  # totals since the start: only what they grew by is added
        for reason, total in dropped.items():
            # inc(0) too: each reason shows in /metrics, at 0 until it happens.
            self.request_log_dropped.labels(reason).inc(total - self._request_log_seen.get(reason, 0))
            self._request_log_seen[reason] = total
        self.request_log_errors.inc(errors - self._request_log_seen.get("", 0))
        self._request_log_seen[""] = errors

    def not_a_number(self, version: str) -> None:
        self._counts[(self.not_a_number_answers, version)] += 1

    def batched(self, version: int, instances: int) -> None:
        self._pending(self.batch, BATCH_BUCKETS, str(version)).add(instances)

    def _pending(self, metric: Histogram, bounds: Tuple[float, ...], *labels: str) -> _PendingHistogram:
        key = (metric,) + labels
        pending = self._histograms.get(key)
        if pending is None:
            pending = self._histograms[key] = _PendingHistogram(bounds)
        return pending

    def flush(self) -> None:
        """Moves what requests added into prometheus_client's values (call it from the thread that adds)."""
        self._flush_request_log()
        self._flush_process()
        counts, self._counts = self._counts, collections.defaultdict(float)
        histograms, self._histograms = self._histograms, {}
        for (metric, *labels), amount in counts.items():
            metric.labels(*labels).inc(amount)
        for (metric, *labels), pending in histograms.items():
            child = metric.labels(*labels)
            # prometheus_client has no call for many observations at once: add them to its buckets and sum.
            buckets: List = child._buckets  # noqa: SLF001 (a test reads the exposition back)
            for bucket, count in zip(buckets, pending.counts):
                if count:
                    bucket.inc(count)
            child._sum.inc(pending.total)  # noqa: SLF001

    def exposition(self) -> bytes:
        """Every process's metrics (multiprocess mode) or this one's."""
        self.flush()
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            _forget_dead_workers(folder)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            if self._versions is not None:
                registry.register(self._versions)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _Versions:
    """A collector of one manager's versions, as TF Serving reports them: 1 for the state each is in (LOADING,
    AVAILABLE, UNLOADING, END) and 0 for the others, and the seconds each available one took to load."""

    def __init__(self, manager: Any):
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily(
            "babyweight_model_version_state",
            "1 for the state each version is in, in the worker that answered /metrics; 0 for the others.",
            labels=["version", "state"],
        )
        seconds = GaugeMetricFamily(
            "babyweight_model_load_seconds",
            "Time each available version took to load, check, warm up and fill its table.",
            labels=["version"],
        )
        for version, state in sorted(dict(self.manager.states).items()):  # the poll thread replaces entries
            for name in manager_lib.STATES:
                states.add_metric([str(version), name], 1.0 if name == state.state else 0.0)
        for version, loaded in sorted(self.manager.available.items()):
            seconds.add_metric([str(version)], loaded.seconds_to_load)
        yield states
        yield seconds


def _forget_dead_workers(folder: str) -> None:
    """The live-only gauges of worker processes that are gone (uvicorn restarted one) leave /metrics."""
    for path in pathlib.Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not server.alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), folder)
