"""/metrics' view of the versions and the workers: what each version is doing, and nothing of what has left."""

import os
import subprocess
import sys
import types

from serving.core import manager
from serving.model_server import metrics


def fake_manager(states, available):
    loaded = {version: types.SimpleNamespace(seconds_to_load=seconds) for version, seconds in available.items()}
    return types.SimpleNamespace(
        states={version: manager.VersionState(state) for version, state in states.items()}, available=loaded
    )


def test_versions_states_and_load_times_follow_the_manager(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    watched = metrics.Metrics()
    versions = fake_manager({1: "AVAILABLE", 2: "LOADING"}, {1: 2.5})
    watched.watch_versions(versions)
    text = watched.exposition().decode()
    assert 'babyweight_model_version_state{state="AVAILABLE",version="1"} 1.0' in text
    assert 'babyweight_model_version_state{state="LOADING",version="1"} 0.0' in text
    assert 'babyweight_model_version_state{state="LOADING",version="2"} 1.0' in text
    assert 'babyweight_model_load_seconds{version="1"} 2.5' in text and 'load_seconds{version="2"}' not in text
    assert "babyweight_process_resident_memory_bytes" in text and "babyweight_process_cpu_seconds" in text
    versions.states = {2: manager.VersionState("AVAILABLE")}  # 1 deleted from the folder, 2 loaded
    versions.available = {2: types.SimpleNamespace(seconds_to_load=1.0)}
    text = watched.exposition().decode()
    assert 'version="1"' not in text and 'babyweight_model_version_state{state="AVAILABLE",version="2"} 1.0' in text


def test_with_worker_processes_a_version_that_left_and_a_worker_that_died_leave_metrics(tmp_path, monkeypatch):
    """In multiprocess mode (babyweight serve's workers) the same: the answering worker's versions, read when asked;
    the memory and CPU of a worker process that is gone are dropped."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    watched = metrics.Metrics()
    versions = fake_manager({1: "AVAILABLE"}, {1: 2.5})
    watched.watch_versions(versions)
    watched.flush()
    # Another worker that wrote its gauges, then died.
    code = "from serving.model_server import metrics\nm = metrics.Metrics(); m.flush()\nimport os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, text=True, check=True)
    pid = dead.stdout.strip().splitlines()[-1]
    assert list(tmp_path.glob(f"gauge_live*_{pid}.db"))
    text = watched.exposition().decode()
    assert f'pid="{pid}"' not in text and not list(tmp_path.glob(f"gauge_live*_{pid}.db"))
    assert 'babyweight_model_version_state{state="AVAILABLE",version="1"} 1.0' in text
    versions.states, versions.available = {}, {}
    assert 'version="1"' not in watched.exposition().decode()
