"""`babyweight simulate` over a few small spans: a table row per span, as data arrives."""
import pytest

from pipeline import simulate

pytestmark = pytest.mark.slow


def test_simulation_prints_what_each_span_did(tmp_path, capsys):
    # On spans this small two models differ by more than the production 0.02 lb change threshold.
    code = simulate.main(["--spans", "3", "--rows", "1500", "--corrupt", "2:shift", "--output-dir", str(tmp_path),
                          "--set", "eval_rmse_max_increase=0.3"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:3] == ["span", "drift", "found"]))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert rows[0][:4] == ["1", "-", "-", "yes"] and rows[0][-1].isdigit()
    assert rows[1] == ["2", "mother_married", "drift:mother_married", "no", "-", "-", "-"]
    assert rows[2][:4] == ["3", "-", "-", "yes"] and rows[2][-1].isdigit() and rows[2][-1] != rows[0][-1]
    assert float(rows[2][4]) < 1.2  # eval RMSE, below the mean predictor's ~1.3
    assert (tmp_path / "simulation.log").is_file()


def test_bad_corrupt_flag_is_refused(capsys):
    assert simulate.main(["--spans", "3", "--corrupt", "5:shift"]) == 2
    assert "expected SPAN:KIND with SPAN in 1-3" in capsys.readouterr().err
