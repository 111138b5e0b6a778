"""The run reports and the history page of real runs, read against ML Metadata and opened in headless Chromium.

Uses the shared sequence of runs (conftest.pipeline_runs): clean data, the same file with is_male recoded
(blocked by validation), the clean data again.
"""

import base64
import pathlib
import re

import pytest

from pipeline.components import monitor
from pipeline.metadata import mlmd
from pipeline.reports import browser, history, report, summary
from tests.conftest import skip_or_fail_in_ci

pytestmark = pytest.mark.slow

MODEL_COLUMNS = report.MODEL_COLUMNS
PAGE_BYTES = 600_000  # a report with its plots stays a few hundred kB


def report_of(run) -> pathlib.Path:
    return pathlib.Path(run.outcome.summary.split("  report: ")[1].splitlines()[0])


@pytest.fixture(scope="module")
def chromium():
    if browser.executable() is None:
        skip_or_fail_in_ci("headless Chromium is not installed (make test installs Debian's chromium as root)")
    try:
        opened = browser.Chromium()
    except browser.BrowserError as error:
        skip_or_fail_in_ci(f"headless Chromium does not start here: {error}")
    with opened:
        yield opened


def test_the_history_has_one_row_per_run_as_ml_metadata_recorded_it(pipeline_runs):
    config = pipeline_runs["config"]
    store = mlmd.open_sqlite(config.metadata_path)
    runs = store.runs()
    rows = history.rows(config)
    assert [row.run for row in rows] == [run.name for run in runs] and len(rows) == 3
    first, corrupt, fixed = rows
    assert first.verdict == "passed" and fixed.verdict == "passed", (first, fixed)
    assert corrupt.verdict == "BLOCKED" and "domain:is_male" in corrupt.blocked_by
    assert corrupt.eval_rmse is None and corrupt.blessed is None and corrupt.pushed_version == ""
    for row, run, fixture in ((first, runs[0], pipeline_runs["first"]), (fixed, runs[2], pipeline_runs["fixed"])):
        steps = {step.node_id: step for step in store.steps(run)}
        evaluation = steps["Evaluator"].outputs["evaluation"][0]
        assert row.eval_rmse == summary.slice_metrics(evaluation.uri)["overall"]["root_mean_squared_error"]
        assert row.rmse_threshold == config.eval_rmse_threshold
        assert row.blessed is True and row.pushed_version in fixture.pushed_versions
        assert (
            row.rows
            == sum(
                s.num_examples for s in summary.split_stats(steps["StatisticsGen"].outputs["statistics"][0]).values()
            )
            == 6_000
        )
        assert row.report == report_of(fixture).name and row.span == 0
        assert 5 < row.prediction["low"] < row.prediction["mean"] < row.prediction["high"] < 10
    assert first.pushed_version != fixed.pushed_version
    # The second run compared the recoded file with the first's: drift measured for every compared feature.
    assert corrupt.drift and all(threshold > 0 for _, threshold in corrupt.drift.values())
    assert not first.drift  # nothing earlier to compare with
    assert [row.seconds > 0 for row in rows] == [True] * 3


def test_a_run_whose_artifacts_cannot_be_read_gets_a_row_saying_why(pipeline_runs, monkeypatch, caplog):
    config = pipeline_runs["config"]
    corrupt_uri = pipeline_runs["corrupt"].steps["DataValidator"].outputs["anomalies"][0].uri
    read = report.read_anomalies

    def damaged(uri, *args):
        if uri == corrupt_uri:
            raise OSError(f"{uri}/Split-train/SchemaDiff.pb: no such file")
        return read(uri, *args)

    monkeypatch.setattr(report, "read_anomalies", damaged)
    rows = history.rows(config)
    assert [row.verdict for row in rows] == ["passed", "unreadable", "passed"]
    assert rows[1].blocked_by == [f"OSError: {corrupt_uri}/Split-train/SchemaDiff.pb: no such file"]
    assert "history: run" in caplog.text and "can't be read" in caplog.text


def test_every_run_prints_where_the_history_page_is_and_it_links_each_report(pipeline_runs):
    for name in ("first", "corrupt", "fixed"):
        index = pathlib.Path(pipeline_runs[name].outcome.summary.split("  history: ")[1].splitlines()[0])
        assert index.name == "index.html" and index.parent == report_of(pipeline_runs[name]).parent
    page = index.read_text()
    for name in ("first", "corrupt", "fixed"):
        assert f"href='{report_of(pipeline_runs[name]).name}'" in page
    assert page.count("<tr>") == 4 and "BLOCKED" in page and "domain:is_male" in page


def test_the_report_names_each_slice_the_same_way_in_every_table(pipeline_runs):
    """TFMA's table and the monitor's residuals: one name per slice, and the same rows in it (the monitor takes the
    bucket ids from the model's transform, as TFMA does; it also has slices of missing raw values, TFMA none)."""
    run = pipeline_runs["fixed"]
    page = report_of(run).read_text()
    tfma = summary.slice_metrics(run.steps["Evaluator"].outputs["evaluation"][0].uri)
    residuals = monitor.read(run.steps["PredictionMonitor"].outputs["monitoring"][0].uri)["residuals"]
    assert {"overall", "boys", "girls", "singletons", "twins", "gestation 37-41 weeks"} <= set(tfma)
    assert {name: tfma[name]["weighted_example_count"] for name in tfma} == {
        name: residuals[name]["n"] for name in tfma
    }
    for section in ("<h2>Evaluation by slice (TFMA)</h2>", "<h3>Residuals (label - prediction) by slice</h3>"):
        table = page.split(section)[1].split("<h2>")[0]
        assert set(tfma) <= set(re.findall(r"<th>([^<]+)</th>\s*<td>", table))
    assert "bucket_xf" not in page and "is_male=" not in page


def test_the_metrics_plot_draws_the_thresholds_the_evaluator_ran_with(pipeline_runs):
    config = pipeline_runs["config"]
    page = report_of(pipeline_runs["fixed"]).read_text()
    tag = next(tag for tag in re.findall(r"<img class='plot'[^>]+>", page) if "metrics per slice" in tag)
    svg = base64.b64decode(re.search(r"base64,([^']+)'", tag).group(1)).decode()
    assert f"threshold {config.eval_rmse_threshold:g} (overall)" in svg
    assert f"threshold {config.eval_mae_threshold:g} (overall)" in svg


def test_a_report_opens_offline_in_chromium_with_every_plot(pipeline_runs, chromium):
    path = report_of(pipeline_runs["fixed"])
    assert path.stat().st_size < PAGE_BYTES, f"{path}: {path.stat().st_size} bytes"
    page = chromium.open(path)
    assert page.errors == [] and page.outside_requests == []
    assert page.images and all(image["loaded"] and image["width"] > 100 for image in page.images), page.images
    for heading in (
        "Data validation of span 0",
        "Statistics: the new span next to the previous validated span",
        "Evaluation by slice (TFMA)",
        "Predictions on the new span",
        "Steps",
    ):
        assert heading in page.headings
    titles = [image["alt"] for image in page.images]
    plotted = {title.split("\n")[0].split(":")[0] for title in titles}
    assert set(MODEL_COLUMNS) <= plotted  # every feature and the label
    # The rerun is cached: its validation is the first run's, which had no earlier span to compare with.
    assert all(title.endswith("\nno earlier validated span to compare with") for title in titles[: len(MODEL_COLUMNS)])
    for expected in ("TFMA's metrics per slice", "Predicted against actual weight", "Residuals (label - prediction)"):
        assert any(title.startswith(expected) for title in titles), (expected, titles)
    assert any(link.endswith("-facets.html") for link in page.links)


def test_a_blocked_spans_report_puts_the_blocking_feature_first_and_titles_each_drift(pipeline_runs, chromium):
    page = chromium.open(report_of(pipeline_runs["corrupt"]))
    assert page.errors == [] and all(image["loaded"] for image in page.images)
    titles = [image["alt"] for image in page.images]
    assert titles[0].startswith("is_male: BLOCKING domain")
    # Compared with the first run's span: each compared column's distance and threshold, as TFDV measured them.
    measured = report.drift_measurements(
        report.read_anomalies(pipeline_runs["corrupt"].steps["DataValidator"].outputs["anomalies"][0].uri)
    )
    assert len(measured) >= 8
    for name, (measure, distance, threshold) in measured.items():
        title = next(title for title in titles if title.split("\n")[0].split(":")[0] == name)
        assert f"{measure} {distance:.3f} {'>' if distance > threshold else '<='} threshold {threshold:g}" in title
    assert "Evaluation by slice (TFMA)" not in page.headings


def test_the_history_page_opens_offline_with_its_plots_over_runs(pipeline_runs, chromium):
    index = report.reports_dir(pipeline_runs["config"]) / history.INDEX
    assert index.stat().st_size < PAGE_BYTES, f"{index}: {index.stat().st_size} bytes"
    page = chromium.open(index)
    assert page.errors == [] and page.outside_requests == []
    titles = [image["alt"] for image in page.images]
    for expected in (
        "Eval RMSE per run, with its threshold",
        "Rows of each run's span",
        "Predictions on the eval split",
        "Drift distance to the previous validated span per feature",
    ):
        assert any(title.startswith(expected) for title in titles), (expected, titles)
    assert all(image["loaded"] for image in page.images)
    assert page.links == [report_of(pipeline_runs[name]).name for name in ("fixed", "corrupt", "first")]


def test_an_image_that_cannot_load_is_caught(tmp_path, chromium):
    """The check itself: a broken plot and a console error show, so the checks above could fail."""
    broken = base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'><text>unclosed").decode()
    page = tmp_path / "broken.html"
    page.write_text(
        f"<!DOCTYPE html><html><body><h1>x</h1><img alt='bad' src='data:image/svg+xml;base64,{broken}'>"
        "<img alt='remote' src='https://example.com/plot.png'><script>console.error('boom')</script>"
        "</body></html>"
    )
    found = chromium.open(page)
    assert [image["loaded"] for image in found.images] == [False, False]
    assert any("boom" in error for error in found.errors)
    assert found.outside_requests == ["https://example.com/plot.png"]
