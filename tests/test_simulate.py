"""`babyweight simulate` over a few small spans: a table row per span, as data arrives."""

import pathlib

import pytest

from pipeline.commands import run as run_lib
from pipeline.commands import simulate
from tests.conftest import QUICK_TRAINING

pytestmark = pytest.mark.slow


def test_simulation_prints_what_each_span_did(tmp_path, capsys):
    quick = [f"--set={key}={value}" for key, value in QUICK_TRAINING.items()]  # on enough rows to be blessed
    code = simulate.main(
        ["--spans", "3", "--rows", "6000", "--corrupt", "2:shift", "--output-dir", str(tmp_path), *quick]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:3] == ["span", "drift", "found"]))
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    assert rows[0][:4] == ["1", "-", "-", "yes"] and rows[0][-1].isdigit()
    assert rows[1] == ["2", "mother_married", "drift:mother_married", "no", "-", "-", "-"]
    assert rows[2][:4] == ["3", "-", "-", "yes"] and rows[2][-1].isdigit() and rows[2][-1] != rows[0][-1]
    assert float(rows[2][4]) < 1.2  # eval RMSE, below the mean predictor's ~1.3
    assert (tmp_path / "simulation.log").is_file()
    # It ends with the history page of the three runs, which shows what the table showed.
    assert lines[-1] == f"history of the runs, with plots: {tmp_path / 'pipeline_out' / 'reports' / 'index.html'}"
    page = pathlib.Path(lines[-1].split(": ", 1)[1]).read_text()
    assert page.count("<tr>") == 4 and "drift:mother_married" in page and rows[2][-1] in page


def test_bad_corrupt_flag_is_refused(capsys):
    assert simulate.main(["--spans", "3", "--corrupt", "5:shift"]) == 2
    assert "expected SPAN:KIND with SPAN in 1-3" in capsys.readouterr().err


def test_a_crashed_run_is_told_from_a_block_and_fails_the_command(tmp_path, capsys, monkeypatch):
    """A run that fails for another reason than its data (here: a crash in span 2) is not 'trained no'."""
    outcomes = {
        1: run_lib.Outcome(True, "Run complete."),
        2: run_lib.Outcome(False, "Run FAILED: OSError: disk full", crash="OSError: disk full"),
        3: run_lib.Outcome(False, "Run FAILED: span 3 failed data validation"),
        4: run_lib.Outcome(False, "Run stopped before the pipeline started: ...", recorded=False),
    }
    arrived = []

    def fake_run(config):
        arrived.append(len(list(pathlib.Path(config.data_dir).iterdir())))
        return outcomes[arrived[-1]]

    monkeypatch.setattr(simulate.run_lib, "run_local", fake_run)
    monkeypatch.setattr(
        simulate,
        "span_result",
        lambda config, span: simulate.SpanResult(
            span, "-", "drift:is_male" if span == 3 else "-", span == 1, None, None, "-"
        ),
    )
    code = simulate.main(["--spans", "4", "--rows", "300", "--output-dir", str(tmp_path)])
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[3] for row in rows[:3]] == ["yes", "CRASHED", "no"]
    assert rows[3][:4] == ["4", "-", "input", "refused"]  # not span 3's row read again from ML Metadata
    assert code == 1 and "span 2: the run crashed: OSError: disk full" in captured.err
