"""A run killed outright in the Trainer: `babyweight metadata` calls it interrupted and names the step, and a rerun
completes, reusing the steps that had completed."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from data import generator
from pipeline import config as config_lib
from pipeline.metadata import metadata_cli
from pipeline.reports import history
from tests.conftest import PROJECT_ROOT, run_pipeline

pytestmark = pytest.mark.slow


def _metadata(capsys, *args):
    code = metadata_cli.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_a_killed_run_is_interrupted_in_its_step_and_a_rerun_completes_from_the_cache(tmp_path, capsys):
    generator.write(2_000, 3, tmp_path / "data")
    # The profile's training (many seconds of model.fit): the kill must land inside it.
    overrides = dict(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"))
    config = config_lib.load_config(overrides=overrides)
    console = (tmp_path / "console.txt").open("w")
    runner = subprocess.Popen(
        [sys.executable, "runner_local.py", *(f"--set={key}={value}" for key, value in overrides.items())],
        cwd=PROJECT_ROOT,
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        log = pathlib.Path(config.log_path)
        while "epoch 1/" not in (log.read_text() if log.exists() else ""):  # inside the Trainer's model.fit
            assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "console.txt").read_text()
            time.sleep(0.2)
        # While its process lives the run is running, not interrupted.
        live = json.loads(_metadata(capsys, "runs", "--store", config.metadata_path, "--json"))
        assert [run["status"] for run in live] == ["running"] and runner.poll() is None
    finally:
        os.killpg(runner.pid, signal.SIGKILL)  # no handler runs: as a lost machine
        runner.wait()
        console.close()

    runs = json.loads(_metadata(capsys, "runs", "--store", config.metadata_path, "--json"))
    assert [run["status"] for run in runs] == ["interrupted"]
    steps = json.loads(_metadata(capsys, "run", "-1", "--store", config.metadata_path, "--json"))
    assert [step["step"] for step in steps if step["state"] == "interrupted"] == ["Trainer"]
    assert "interrupted in Trainer: no process is running this run any more" in _metadata(
        capsys, "run", "-1", "--store", config.metadata_path
    )

    rerun = run_pipeline(config)
    assert rerun.outcome.ok, rerun.outcome.summary
    assert {name: rerun.steps[name].state for name in ("CsvExampleGen", "StatisticsGen", "Transform", "Trainer")} == {
        "CsvExampleGen": "cached",
        "StatisticsGen": "cached",
        "Transform": "cached",
        "Trainer": "complete",
    }
    runs = json.loads(_metadata(capsys, "runs", "--store", config.metadata_path, "--json"))
    assert [run["status"] for run in runs] == ["interrupted", "complete"]
    # The history page, rebuilt by the rerun, says so too.
    assert [(row.verdict, row.blocked_by) for row in history.rows(config)] == [
        ("INTERRUPTED", ["Trainer interrupted"]),
        ("passed", []),
    ]
    page = (pathlib.Path(config.output_dir) / "reports" / history.INDEX).read_text()
    assert "<span class='INTERRUPTED'>INTERRUPTED</span>" in page and "Trainer interrupted" in page
