"""The request log under storage faults: it drops and counts what it can't write, keeps its queue bounded, comes
back by itself, and keeps the whole folder (every process's files, past restarts too) within its budget."""

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import orjson
import pytest

from serving.model_server import metrics, request_log
from tests.serving.conftest import wait_for


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(request_log, "RETRY_SECONDS", 0.01)


def _logged_ids(folder: pathlib.Path) -> list:
    return [
        orjson.loads(line).get("request_id")
        for path in request_log.log_files(str(folder))
        for line in path.read_bytes().splitlines()
    ]


def test_a_removed_folder_is_made_again_and_the_log_goes_on(tmp_path):
    folder = tmp_path / "logs"
    log = request_log.RequestLog(str(folder), 1 << 20, 10)
    try:
        log.write({"request_id": "before"})
        wait_for(lambda: "before" in _logged_ids(folder))
        shutil.rmtree(folder)  # an operator's cleanup, or a volume remounted
        log.write({"request_id": "after"})
        assert wait_for(lambda: "after" in _logged_ids(folder))
        assert log.alive
    finally:
        log.close()


def _disk_full_opener(path: pathlib.Path):
    path.symlink_to("/dev/full")  # every write to it fails with ENOSPC, as on a full disk
    return path.open("ab")


@pytest.mark.parametrize("fault", ["folder_is_a_file", "disk_full"])
def test_an_unwritable_folder_drops_and_counts_records_and_the_log_comes_back(tmp_path, monkeypatch, caplog, fault):
    """Tests may run as root, where chmod stops no write: the folder is a regular file, or every write is ENOSPC."""
    folder = tmp_path / "logs"
    real_opener = request_log._open_append
    if fault == "folder_is_a_file":
        folder.write_text("not a folder")
    else:
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        monkeypatch.setattr(request_log, "_open_append", _disk_full_opener)
    caplog.set_level(logging.WARNING)
    log = request_log.RequestLog(str(folder), 1 << 20, 10)
    try:
        for batch in range(5):  # several flushes: several failed tries
            for number in range(10):
                log.write({"request_id": f"lost-{batch}-{number}"})
            time.sleep(request_log.FLUSH_SECONDS * 2)
        dropped, errors = wait_for(lambda: log.counts()[0]["write_error"] == 50 and log.counts())
        assert errors >= 2 and dropped["queue_full"] == 0 and log.alive
        failures = [r for r in caplog.records if "can't write" in r.getMessage()]
        assert len(failures) == 1, "one line per streak of failures, not one per try"
        if fault == "folder_is_a_file":
            folder.unlink()
        else:
            assert list(folder.iterdir()) == []  # a try that wrote nothing leaves no file behind
            monkeypatch.setattr(request_log, "_open_append", real_opener)
        log.write({"request_id": "after"})
        assert wait_for(lambda: _logged_ids(folder) == ["after"])
        assert any("writing again" in r.getMessage() for r in caplog.records)
        assert log.counts()[0]["write_error"] == 50
    finally:
        log.close()


def test_a_stuck_writer_bounds_the_queue_and_never_blocks_the_caller(tmp_path, monkeypatch):
    folder = tmp_path / "logs"
    stuck, release = threading.Event(), threading.Event()
    real_opener = request_log._open_append

    def hung_opener(path):  # a storage that hangs (an NFS server gone) rather than fails
        stuck.set()
        release.wait(10)
        return real_opener(path)

    monkeypatch.setattr(request_log, "_open_append", hung_opener)
    log = request_log.RequestLog(str(folder), 1 << 20, 10, max_pending=100)
    try:
        log.write({"request_id": "first"})
        wait_for(stuck.is_set)
        started, longest = time.perf_counter(), 0
        for number in range(1000):
            log.write({"request_id": f"r{number}"})
            longest = max(longest, len(log._pending))
        assert time.perf_counter() - started < 0.5
        assert longest == 100 and log.counts()[0]["queue_full"] == 900
        release.set()
        expected = ["first"] + [f"r{number}" for number in range(100)]
        assert wait_for(lambda: _logged_ids(folder) == expected)
    finally:
        release.set()
        log.close()


def test_an_unencodable_record_or_an_unexpected_error_does_not_stop_the_writer(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "logs"
    real_opener = request_log._open_append
    failures = []

    def buggy_once(path):
        if not failures:
            failures.append(path)
            raise RuntimeError("a bug")
        return real_opener(path)

    monkeypatch.setattr(request_log, "_open_append", buggy_once)
    log = request_log.RequestLog(str(folder), 1 << 20, 10)
    try:
        log.write({"request_id": "lost"})
        wait_for(lambda: log.counts()[1] == 1)
        log.write({"request_id": "odd", "instance": object()})
        log.write({"request_id": "kept"})
        assert wait_for(lambda: _logged_ids(folder) == ["kept"])
        assert log.alive
        assert log.counts() == ({"queue_full": 0, "write_error": 1, "unencodable": 1}, 1)
        assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)  # a bug shows its traceback
    finally:
        log.close()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.parametrize("budget", [{"keep_files": 2}, {"keep_files": 100, "max_total_bytes": 1200}])
def test_the_folder_budget_deletes_the_oldest_files_of_any_process_but_never_a_live_one(tmp_path, budget):
    """Files left by dead processes (restarts, respawned workers) go oldest first, to the budget in files or bytes;
    a live process's newest file stays even when it is the oldest, and so does this process's own."""
    live, dead = os.getppid(), _dead_pid()
    names = [
        f"requests-20240101T000000-{live}-000001.jsonl",  # the live process's older file: may go
        f"requests-20240101T000100-{live}-000002.jsonl",  # the one it writes: stays
        *[f"requests-20240101T00020{n}-{dead}-00000{n}.jsonl" for n in range(4)],  # a dead process's: all may go
    ]
    for age, name in enumerate(names):
        (tmp_path / name).write_bytes(b'{"n": 1}\n' * 100)  # 900 bytes
        os.utime(tmp_path / name, (1e9 + age, 1e9 + age))
    (tmp_path / "requests-by-hand.jsonl").write_text("{}\n")  # not named as the server names files: not its to delete
    arguments = {"max_bytes": 1 << 20, **budget}
    log = request_log.RequestLog(str(tmp_path), **arguments)
    try:
        log.write({"request_id": "own"})
        wait_for(lambda: "own" in _logged_ids(tmp_path))
    finally:
        log.close()
    own = [p.name for p in tmp_path.glob(f"requests-*-{os.getpid()}-*.jsonl")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], "requests-by-hand.jsonl", *own])
    assert len(own) == 1


def test_metrics_show_the_logs_dropped_records_by_reason_and_its_errors(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    served = metrics.Metrics()
    totals = {"queue_full": 3, "write_error": 0, "unencodable": 0}, 2
    served.watch_request_log(lambda: totals)
    served.flush()
    totals = {"queue_full": 5, "write_error": 7, "unencodable": 0}, 4  # the log's totals grew: only that is added
    text = served.exposition().decode()
    assert 'babyweight_request_log_dropped_records_total{reason="queue_full"} 5.0' in text
    assert 'babyweight_request_log_dropped_records_total{reason="write_error"} 7.0' in text
    assert 'babyweight_request_log_dropped_records_total{reason="unencodable"} 0.0' in text
    assert "babyweight_request_log_errors_total 4.0" in text
