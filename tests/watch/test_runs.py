"""watch/runs.py with the fast fake run: one run at a time in span order, blocked and crashed spans, a killed
run, and a restarted watcher adopting the run it finds going."""

import json
import os
import pathlib
import time

import pytest

from pipeline import config as config_lib
from pipeline.metadata import watch_store
from tests.watch.fake_run import ledger_lines
from tests.watch.helpers import FAKE_RUN, make_span, run_overrides, watch_config
from watch import runs as runs_lib
from watch.run_span import write_outcome

CHILD_SECONDS = 30  # far more than a fake run takes: a test that waits this long has failed


@pytest.fixture
def open_runs(tmp_path, monkeypatch):
    """Makes Runs on tmp_path with the fake run, each with a connection of its own; all closed, their runs ended."""
    monkeypatch.setattr(runs_lib, "CHILD_MODULE", FAKE_RUN)
    monkeypatch.chdir(config_lib.PROJECT_ROOT)  # where `python -m tests.watch.fake_run` finds its module
    made = []

    def make(**settings: str) -> runs_lib.Runs:
        config = watch_config(tmp_path, **settings)
        runs = runs_lib.Runs(config, watch_store.connect(config.output_dir), run_overrides(config))
        made.append(runs)
        return runs

    yield make
    for runs in made:
        if runs.child is not None and runs.child.process.poll() is None:
            runs.child.process.kill()
            runs.child.process.wait()
        runs.connection.close()


def _state(runs: runs_lib.Runs, span: int) -> dict:
    row = runs.connection.execute("SELECT * FROM spans WHERE span = ?", (span,)).fetchone()
    return dict(row) if row else {}


def _ledger(runs: runs_lib.Runs) -> list:
    return ledger_lines(pathlib.Path(runs.config.output_dir))


def _wait_child(runs: runs_lib.Runs) -> int:
    """Waits for the run going to end; returns its span."""
    assert runs.child is not None, "no run was started"
    runs.child.process.wait(timeout=CHILD_SECONDS)
    return runs.child.span


def _events(runs: runs_lib.Runs) -> list:
    return [(e["key"], e["state"]) for e in runs.connection.execute("SELECT * FROM events ORDER BY seq")]


def test_spans_run_in_order_one_at_a_time(tmp_path, open_runs):
    data = tmp_path / "data"
    make_span(data, 10)
    make_span(data, 9, sleep=0.5)
    runs = open_runs()
    runs.step(time.time())
    assert runs.child.span == 9 and _state(runs, 9)["state"] == "running"
    assert _state(runs, 10)["state"] == "queued"
    make_span(data, 11)  # lands while span 9 runs: queued behind it
    runs.step(time.time())
    assert runs.child.span == 9 and _state(runs, 11)["state"] == "queued"
    for expected in (9, 10, 11):
        assert _wait_child(runs) == expected
        runs.step(time.time())
    assert runs.child is None
    assert _ledger(runs) == ["span 9", "span 10", "span 11"]
    assert [_state(runs, n)["state"] for n in (9, 10, 11)] == ["done"] * 3
    assert not runs.busy(time.time())


def test_a_new_span_run_starts_in_the_first_pass_after_it_lands(tmp_path, open_runs):
    runs = open_runs(watch_settle_seconds="5")
    runs.step(time.time())
    assert runs.child is None and not runs.busy(time.time())
    folder = make_span(tmp_path / "data", 1)
    landed = max(os.stat(p).st_ctime for p in [folder, *folder.iterdir()])
    runs.step(landed + 1)  # still settling
    assert runs.child is None and not _state(runs, 1)
    runs.step(landed + 5 + runs.config.watch_poll_seconds)  # the first look after it settled
    assert runs.child is not None and runs.child.span == 1
    assert _state(runs, 1)["state"] == "running"


def test_a_blocked_span_waits_for_its_files_to_change(tmp_path, open_runs):
    folder = make_span(tmp_path / "data", 1, behaviour="blocked")
    runs = open_runs()
    runs.step(time.time())
    _wait_child(runs)
    runs.step(time.time())
    assert _state(runs, 1)["state"] == "blocked"
    assert "span 1: blocked" in _state(runs, 1)["detail"]
    assert _events(runs) == [("span_blocked|span 1", "open")]
    for later in (60, 3600, 86400):  # no retry, however long it waits
        runs.step(time.time() + later)
        assert runs.child is None
    assert _ledger(runs) == ["span 1"] and _state(runs, 1)["attempts"] == 1
    # the fix: new files in the span
    (folder / "behaviour").write_text("ok")
    with (folder / "data.csv").open("a") as handle:
        handle.write("8.0,25\n")
    runs.step(time.time())
    assert runs.child is not None and runs.child.span == 1
    _wait_child(runs)
    runs.step(time.time())
    assert _state(runs, 1)["state"] == "done"
    assert _ledger(runs) == ["span 1", "span 1"]
    assert _events(runs) == [("span_blocked|span 1", "open"), ("span_blocked|span 1", "resolved")]


def test_a_crash_is_retried_after_a_doubling_wait_then_gives_up_with_an_alert(tmp_path, open_runs):
    make_span(tmp_path / "data", 1, behaviour="crash")
    runs = open_runs(watch_retry_seconds="60", watch_max_attempts="3")
    start = time.time()
    runs.step(start)
    _wait_child(runs)
    runs.step(start + 1)
    assert _state(runs, 1)["state"] == "crashed" and _state(runs, 1)["attempts"] == 1
    assert _state(runs, 1)["detail"] == "the fake run crashed"
    runs.step(start + 60)  # 59 s after the crash: too early
    assert runs.child is None
    runs.step(start + 61)
    assert runs.child is not None and _state(runs, 1)["attempts"] == 2
    _wait_child(runs)
    runs.step(start + 62)
    assert _state(runs, 1)["state"] == "crashed"
    runs.step(start + 62 + 119)  # the wait doubled: 120 s
    assert runs.child is None
    runs.step(start + 62 + 120)
    assert runs.child is not None and _state(runs, 1)["attempts"] == 3
    _wait_child(runs)
    runs.step(start + 200)
    assert _state(runs, 1)["state"] == "gave_up"
    assert _events(runs) == [("run_failed|span 1", "open")]
    runs.step(start + 86400)
    assert runs.child is None
    assert _ledger(runs) == ["span 1 crashed"] * 3


def test_a_run_that_ends_without_an_outcome_is_a_crash(tmp_path, open_runs):
    make_span(tmp_path / "data", 1, behaviour="die")
    runs = open_runs()
    runs.step(time.time())
    _wait_child(runs)
    runs.step(time.time())
    row = _state(runs, 1)
    assert row["state"] == "crashed" and row["attempts"] == 1 and "exit code 3" in row["detail"]


def test_a_run_killed_while_the_watcher_waits_is_a_charged_crash(tmp_path, open_runs):
    make_span(tmp_path / "data", 1, sleep=CHILD_SECONDS)
    runs = open_runs(watch_retry_seconds="60")
    runs.step(time.time())
    runs.step(time.time())
    assert runs.child is not None and _state(runs, 1)["state"] == "running"
    runs.child.process.kill()  # SIGKILL: no outcome
    _wait_child(runs)
    now = time.time()
    runs.step(now)
    row = _state(runs, 1)
    assert row["state"] == "crashed" and row["attempts"] == 1, row
    assert "exit code -9" in row["detail"]
    assert row["next_try"] == pytest.approx(now + 60)
    assert runs.child is None and _ledger(runs) == []


def test_a_run_going_on_too_long_opens_one_alert_that_its_end_resolves(tmp_path, open_runs):
    make_span(tmp_path / "data", 1, sleep=1.0)
    runs = open_runs()
    runs.step(time.time())
    started = _state(runs, 1)["started"]
    runs.step(started + runs_lib.SLOW_RUN_SECONDS - 1)
    assert _events(runs) == []  # not yet
    runs.step(started + runs_lib.SLOW_RUN_SECONDS + 1)
    runs.step(started + runs_lib.SLOW_RUN_SECONDS + 2)
    assert _events(runs) == [("run_slow|span 1", "open")]  # once
    _wait_child(runs)
    runs.step(time.time())
    assert _events(runs) == [("run_slow|span 1", "open"), ("run_slow|span 1", "resolved")]


def test_a_restarted_watcher_adopts_the_run_it_finds_going(tmp_path, open_runs):
    make_span(tmp_path / "data", 1, sleep=1.5)
    first = open_runs()
    first.step(time.time())
    child = first.child.process
    # the first watcher dies: its connection and its hold on the run lock go; the run goes on
    os.close(first.child.lock_fd)
    first.connection.close()
    first.child = None
    second = open_runs()
    second.step(time.time())
    assert second.child is None, "a second run of the same span was started"
    assert _state(second, 1)["state"] == "running"
    child.wait(timeout=CHILD_SECONDS)
    second.step(time.time())
    row = _state(second, 1)
    assert row["state"] == "done" and row["attempts"] == 1
    assert second.child is None and _ledger(second) == ["span 1"]


def test_a_run_lost_with_the_watcher_before_it_started_runs_again_uncharged(tmp_path, open_runs):
    folder = make_span(tmp_path / "data", 1, sleep=CHILD_SECONDS)
    runs = open_runs()
    runs.step(time.time())
    # as if the watcher was killed between journalling the run and starting it: running, no lock, no outcome
    runs.child.process.kill()
    _wait_child(runs)
    os.close(runs.child.lock_fd)
    runs.child = None
    (folder / "sleep").unlink()
    restarted = open_runs()
    restarted.step(time.time())
    assert restarted.child is not None and _state(restarted, 1)["attempts"] == 1
    _wait_child(restarted)
    restarted.step(time.time())
    assert _state(restarted, 1)["state"] == "done" and _ledger(restarted) == ["span 1"]


def test_an_outcome_is_written_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "span-1-attempt-1.json"
    path.write_text('{"ok": fal')  # an earlier attempt's, cut short
    write_outcome(path, {"ok": True, "blocked": False, "crash": "", "recorded": True, "summary": "s"})
    assert json.loads(path.read_text())["ok"] is True
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
