"""`make soak-serving`'s scenarios at a small size: hostile requests, pushes, log and model folder faults, under wrk."""

import json
import shutil

import psutil
import pytest

from serving.bench import soak
from tests.conftest import skip_or_fail_in_ci


@pytest.mark.slow
def test_the_soak_at_a_small_size_passes_every_scenario_and_stops_every_process(toy_versions, tmp_path, capsys):
    if shutil.which("wrk") is None:
        skip_or_fail_in_ci("wrk is not installed (make test installs it: apt-get install wrk)")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    code = soak.main(
        ["--model-dir", str(toy_versions), "--pushes", "3", "--fault-seconds", "2", "--hostile-rounds", "1"]
        + ["--output-dir", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    results = {result["scenario"]: result for result in json.loads((tmp_path / "bench" / "soak.json").read_text())}
    assert code == 0, printed
    assert list(results) == ["hostile", "pushes", "log", "models"]
    for result in results.values():  # wrk's valid requests: none failed, in any scenario
        assert result["ok"] and result["valid_requests"] > 100 and result["valid_non2xx"] == 0
    hostile = results["hostile"]
    assert hostile["hostile_families"] == len({family for family, *_ in soak.HOSTILE}) == 12
    assert hostile["hostile_4xx"] == hostile["hostile_sent"] == 2 * len(soak.HOSTILE)
    assert len(results["pushes"]["rss_last_mib"]) == 2 and results["pushes"]["rss_growth"] <= 0.10
    assert results["log"]["log_dropped_records"] > 0 and results["log"]["log_errors"] > 0
    assert results["models"]["still_available"] and results["models"]["storage_errors"] > 0
    assert "| hostile | yes |" in printed and "| models | yes |" in printed
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= before  # the server is gone
