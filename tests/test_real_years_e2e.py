"""The real export through the pipeline as people would feed it: a span per year, one of them saved by Excel.

The share of rows with ever_born (and the sizes of the years) changes from year to year in the real
export: 2003-2004 and 2008 have it in 30-40% of rows, 2005-2007 in 96%. Spans by year run in order
without a block; what moves between years is reported. The largest year, 2006, arrives as Excel's "CSV UTF-8"
saves it (a byte-order mark, CRLF line ends) and runs as its plain file would.
"""

import pathlib

import pandas as pd
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline.components import csv_example_gen
from tests.conftest import QUICK_TRAINING, run_pipeline
from tests.pipeline.components.test_csv_example_gen import _run_executor

pytestmark = pytest.mark.slow

EXCEL_YEAR = 2006


@pytest.fixture(scope="module")
def years_root(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("years")


@pytest.fixture(scope="module")
def year_runs(years_root, real_export_csv):
    """One run per year of the export, in order, each year's rows as they are in the export (EXCEL_YEAR's as Excel
    saves them; its plain file is kept beside the arrivals)."""
    root = years_root
    export = pd.read_csv(real_export_csv, dtype=str, keep_default_na=False)
    runs = {}
    for span, (year, rows) in enumerate(export.groupby("year", sort=True), start=1):
        folder = root / "arrivals" / f"span-{span}"
        folder.mkdir(parents=True)
        text = rows.to_csv(index=False, lineterminator="\n")
        if int(year) == EXCEL_YEAR:
            (root / "plain").mkdir()
            (root / "plain" / f"natality-{year}.csv").write_text(text)
        (folder / f"natality-{year}.csv").write_bytes(_excel(text) if int(year) == EXCEL_YEAR else text.encode())
        config = config_lib.load_config(
            overrides=dict(QUICK_TRAINING, data_dir=str(root / "arrivals"), output_dir=str(root / "out"))
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


def test_a_year_saved_by_excel_runs_like_its_plain_file(year_runs, years_root, tmp_path):
    """The Excel-saved span passed like the others (test above) with no anomaly, and ExampleGen wrote the records
    its plain file gives, in the same splits (so TFDV's statistics, computed from them, are the plain file's too)."""
    run = year_runs[EXCEL_YEAR]
    assert "anomalies: none" in run.outcome.summary, run.outcome.summary
    _, plain = _run_executor(csv_example_gen.Executor, years_root / "plain", tmp_path / "plain")
    excel = {}
    for split in ("train", "eval"):
        files = sorted(
            str(path)
            for path in pathlib.Path(run.steps["CsvExampleGen"].outputs["examples"][0].uri, f"Split-{split}").glob("*")
        )
        excel[split] = sorted(
            tf.train.Example.FromString(record.numpy()).SerializeToString(deterministic=True)
            for record in tf.data.TFRecordDataset(files, compression_type="GZIP")
        )
    assert excel == plain
    assert len(plain["train"]) + len(plain["eval"]) == 6281  # the year's rows (docs/validation-and-spans.md)
