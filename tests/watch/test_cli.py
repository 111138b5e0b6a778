"""`babyweight watch` as a process (with the fake run): --once's exit status and the one watcher per output folder.

Each watcher process loads TensorFlow (TFDV): these tests start as few as they can."""

import subprocess

import pytest

from pipeline import config as config_lib
from tests.watch.helpers import make_span, subprocess_env, wait_for, watcher_command

START_SECONDS = 120  # a watcher's start, TensorFlow's import included, on a busy machine


def _once(tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        watcher_command(tmp_path / "data", tmp_path / "out", "--once"),
        cwd=config_lib.PROJECT_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=START_SECONDS,
    )


@pytest.mark.slow
def test_once_exits_0_without_alerts_and_1_listing_an_open_one(tmp_path):
    make_span(tmp_path / "data", 1)
    passed = _once(tmp_path)
    assert passed.returncode == 0, passed.stderr[-3000:]
    assert "no open alerts" in passed.stdout
    assert (tmp_path / "out" / "ledger.txt").read_text() == "span 1\n"  # --once waited for the run
    make_span(tmp_path / "data", 2, behaviour="blocked")
    blocked = _once(tmp_path)
    assert blocked.returncode == 1, blocked.stderr[-3000:]
    assert "1 open alert" in blocked.stdout
    assert "span_blocked: span 2" in blocked.stdout
    assert (tmp_path / "out" / "ledger.txt").read_text() == "span 1\nspan 2\n"


@pytest.mark.slow
def test_a_second_watcher_on_the_same_output_folder_exits_2_naming_the_first(tmp_path):
    (tmp_path / "data").mkdir()
    lock = tmp_path / "out" / "watch" / "watcher.lock"
    first = subprocess.Popen(
        watcher_command(tmp_path / "data", tmp_path / "out"),
        cwd=config_lib.PROJECT_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: first.poll() is not None or (lock.exists() and lock.read_text().strip() == str(first.pid)),
            START_SECONDS,
            "the first watcher's lock",
            interval=0.2,
        )
        assert first.poll() is None, f"the first watcher ended with {first.returncode}"
        second = _once(tmp_path)
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(timeout=30)
    assert first.returncode == 0  # SIGTERM: it stops between passes


@pytest.mark.slow
def test_the_docs_command_watches_an_empty_folder_for_spans_and_exits_0(tmp_path):
    # docs/watch.md's `babyweight watch --once`, with the real command (no span yet: no run)
    (tmp_path / "data").mkdir()
    done = subprocess.run(
        [str(config_lib.PROJECT_ROOT / ".venv" / "bin" / "babyweight"), "watch", "--once"]
        + ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")],
        cwd=config_lib.PROJECT_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=START_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no open alerts" in done.stdout
    assert "does not exist yet" in done.stderr  # the request log the server hasn't written: said, not an error
    assert (tmp_path / "out" / "watch" / "watch.sqlite").is_file()
