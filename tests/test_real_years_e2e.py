"""The real export through the pipeline as people would feed it: a span per year, and a file saved by Excel.

The share of rows with ever_born (and the sizes of the years) changes from year to year in the real
export: 2003-2004 and 2008 have it in 30-40% of rows, 2005-2007 in 96%. Spans by year run in order
without a block; what moves between years is reported.
"""

import pathlib

import pandas as pd
import pytest

from pipeline import config as config_lib
from pipeline.components import validation
from tests.conftest import run_pipeline

pytestmark = pytest.mark.slow

# Validation is what these runs are for: a short training keeps them quick.
QUICK = {"train_epochs": "1", "min_train_steps": "100"}


@pytest.fixture(scope="module")
def year_runs(tmp_path_factory, real_export_csv):
    """One run per year of the export, in order, each year's rows as it is in the export."""
    root = tmp_path_factory.mktemp("years")
    export = pd.read_csv(real_export_csv, dtype=str, keep_default_na=False)
    runs = {}
    for span, (year, rows) in enumerate(export.groupby("year", sort=True), start=1):
        folder = root / "arrivals" / f"span-{span}"
        folder.mkdir(parents=True)
        rows.to_csv(folder / f"natality-{year}.csv", index=False)
        config = config_lib.load_config(
            overrides=dict(QUICK, data_dir=str(root / "arrivals"), output_dir=str(root / "out"))
        )
        runs[int(year)] = run_pipeline(config)
    return runs


def test_each_year_in_order_passes_validation_and_trains(year_runs):
    assert sorted(year_runs) == [2003, 2004, 2005, 2006, 2007, 2008]
    for year, run in year_runs.items():
        assert run.outcome.ok, (year, run.outcome.summary)
        assert run.steps["DataGate"].state == "complete", year
        assert run.steps["Trainer"].state in ("complete", "cached"), year


def test_what_moves_between_small_years_is_reported_not_blocking(year_runs):
    summary = year_runs[2008].outcome.summary
    drift = [line for line in summary.splitlines() if "[warning] drift: feature 'ever_born'" in line]
    assert drift and "under min_drift_rows (1000) a distance is mostly sampling noise" in drift[0], summary
    assert "compared with span 5" in summary


def _excel(text: str) -> bytes:
    """A CSV file as Excel's "CSV UTF-8" saves it: a byte-order mark, CRLF line ends."""
    return b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()


def test_a_file_saved_by_excel_runs_like_the_plain_file(tmp_path, real_export_csv):
    with real_export_csv.open() as handle:
        text = "".join(next(handle) for _ in range(2001))  # the header and the first 2,000 rows
    runs = {}
    for name, data in (("plain", text.encode()), ("excel", _excel(text))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "natality.csv").write_bytes(data)
        config = config_lib.load_config(
            overrides=dict(QUICK, data_dir=str(tmp_path / name), output_dir=str(tmp_path / f"out-{name}"))
        )
        runs[name] = (config, run_pipeline(config))
    for name, (_, run) in runs.items():
        assert run.outcome.ok, (name, run.outcome.summary)
        assert "anomalies: none" in run.outcome.summary, (name, run.outcome.summary)
    # ExampleGen wrote the same records, byte for byte, in the same splits and order.
    records = {
        name: {
            split: [
                path.read_bytes()
                for path in sorted(
                    pathlib.Path(run.steps["CsvExampleGen"].outputs["examples"][0].uri, f"Split-{split}").glob("*")
                )
            ]
            for split in ("train", "eval")
        }
        for name, (_, run) in runs.items()
    }
    assert records["excel"] == records["plain"]
    # And TFDV counted the same: its means and deviations may differ in the last digit, as its batches are
    # sized by timing (Beam's BatchElements), so they add in another order.
    statistics = {
        name: [
            validation.load_statistics(run.steps["StatisticsGen"].outputs["statistics"][0].uri, split)
            for split in ("train", "eval")
        ]
        for name, (_, run) in runs.items()
    }
    for excel, plain in zip(statistics["excel"], statistics["plain"]):
        assert _counts(excel) == _counts(plain)
        for ours, theirs in zip(excel.datasets[0].features, plain.datasets[0].features):
            assert ours.num_stats.mean == pytest.approx(theirs.num_stats.mean, rel=1e-12)
    assert statistics["plain"][0].datasets[0].num_examples + statistics["plain"][1].datasets[0].num_examples == 2000


def _counts(statistics):
    """Each feature's type and number of rows with and without a value."""
    return [
        (
            feature.path.step[0],
            feature.type,
            feature.WhichOneof("stats"),
            getattr(feature, feature.WhichOneof("stats")).common_stats.num_non_missing,
            getattr(feature, feature.WhichOneof("stats")).common_stats.num_missing,
        )
        for feature in statistics.datasets[0].features
    ]
