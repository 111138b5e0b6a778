"""`make simulate-loop` at small size: a clean month, then the three problems and the fixing span, through the
real watcher, pipeline runs and server: each problem is flagged in time, nothing else alarms, the fix retrains."""

import re
import subprocess
import sys

import pytest

from pipeline.config import PROJECT_ROOT


@pytest.mark.slow
def test_the_loop_catches_each_problem_in_time_and_retrains(tmp_path, real_export_csv):
    command = [sys.executable, "-m", "watch.simulate_loop", "--rows", str(real_export_csv)]
    command += ["--work-dir", str(tmp_path / "loop"), "--clean-months", "1", "--requests", "2500"]
    # With one clean month the model's eval RMSE varies more than over twelve, and make simulate-loop's 10% change
    # can sit inside the decay margin: 20% here. Whether the next span's model recovers fully depends on the
    # training window (3 spans, 1 of them new), so that goal is the full simulation's (docs/watch.md), not this one's.
    command += ["--check-every", "200", "--relation-shift", "0.2"]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1500)
    report = done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert done.returncode in (0, 1), report  # 1: a goal missed, said in the lines below; not a crash
    assert "false alarms: 0" in lines, report

    def flagged(prefix: str) -> int:
        line = next(line for line in lines if line.startswith(prefix))
        found = re.search(r"after: ([\d,]+)", line)
        assert found, report  # "never" fails here
        return int(found.group(1).replace(",", ""))

    assert flagged("rate shift") <= 5000
    assert flagged("unit bug") <= 500
    assert flagged("decay") <= 2000
    assert any(line.startswith("retrain followed: span 5 -> version") for line in lines), report
    assert "new span's run started in the first pass after it landed: 5 of 5" in lines
    assert (tmp_path / "loop" / "out" / "watch" / "alerts.jsonl").read_text().count('"kind": "decay"') >= 1
