"""Metrics counted in memory and flushed give what prometheus_client would; the request log rotates by size."""

import json
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serving.model_server import metrics, request_log


def test_flushed_histograms_equal_prometheus_own_observations():
    served = metrics.Metrics()
    reference = Histogram(
        "babyweight_request_seconds",
        "x",
        ["version", "path"],
        buckets=metrics.LATENCY_BUCKETS,
        registry=CollectorRegistry(),
    )
    values = [0.0001, 0.0002, 0.00021, 0.003, 0.003, 0.7, 9.0]
    for value in values:
        served.observe("3", "cache", value)
        reference.labels("3", "cache").observe(value)
    served.request("3", "predict", 200)
    served.lookups("3", hits=5, misses=2)
    text = served.exposition().decode()
    assert _histogram_lines(text) == _histogram_lines(_exposition(reference)) != {}
    assert 'babyweight_requests_total{code="200",route="predict",version="3"} 1.0' in text
    assert 'babyweight_cache_lookups_total{result="hit",version="3"} 5.0' in text


def _histogram_lines(text: str) -> dict:
    return dict(
        line.split(" ")
        for line in text.splitlines()
        if line.startswith("babyweight_request_seconds_") and "_created" not in line
    )


def _exposition(histogram) -> str:
    registry = CollectorRegistry()
    registry.register(histogram)
    return generate_latest(registry).decode()


def test_the_log_starts_a_new_file_at_its_size_and_keeps_the_newest(tmp_path):
    log = request_log.RequestLog(str(tmp_path), max_bytes=2000, keep_files=3)
    for number in range(200):
        log.write({"request_id": f"r{number}", "instance": {"mother_age": 30, "gestation_weeks": 39}, "index": 0})
        if number % 20 == 19:
            time.sleep(request_log.FLUSH_SECONDS * 2)  # each flush writes what is queued, then checks the size
    log.close()
    files = request_log.log_files(str(tmp_path))
    assert len(files) == 3 and all(f.stat().st_size < 2000 + 20 * 120 for f in files)
    records = [json.loads(line) for f in files for line in f.open()]
    assert records[-1]["request_id"] == "r199"  # the newest kept, the oldest files deleted
    assert [r["request_id"] for r in request_log.recent_records(str(tmp_path), 5)] != []
