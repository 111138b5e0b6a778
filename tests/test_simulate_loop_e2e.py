"""`make simulate-loop` at small size: a clean month, then the three problems and the fixing span, through the
real watcher, pipeline runs and server; every goal of the loop must hold (the command exits 1 otherwise)."""

import subprocess
import sys

import pytest

from pipeline.config import PROJECT_ROOT


@pytest.mark.slow
def test_the_loop_catches_each_problem_in_time_and_retrains(tmp_path, real_export_csv):
    command = [sys.executable, "-m", "watch.simulate_loop", "--rows", str(real_export_csv)]
    command += ["--work-dir", str(tmp_path / "loop"), "--clean-months", "1", "--requests", "2500"]
    command += ["--check-every", "200", "--relation-shift", "0.2"]
    # the profile's training, as make simulate-loop. With one clean month the model's eval RMSE varies more than
    # over twelve, and 10% (make simulate-loop's change) can sit inside the decay margin: 20% here
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1500)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "false alarms: 0" in lines
    assert any(line.startswith("retrain followed: span 5 -> version") for line in lines)
    assert "new span's run started in the first pass after it landed: 5 of 5" in lines
    assert (tmp_path / "loop" / "out" / "watch" / "alerts.jsonl").read_text().count('"kind": "decay"') >= 1
