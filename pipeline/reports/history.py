"""The history page, outputs/reports/index.html: every run of the pipeline, read back from ML Metadata.

One row per run (span, rows, validation verdict and what blocked it, eval RMSE, blessing, pushed version,
seconds) linking to the run's report, and plots over the runs: eval RMSE with its threshold, rows per span,
the predictions' mean and spread, and each feature's drift distance with its threshold. It is rebuilt after
every run from the store alone, so it shows what ML Metadata holds, whichever process wrote it. Above the runs,
when `babyweight watch` has run: its open alerts, checks and spans journal (watch_section.py).
"""

import dataclasses
import html
import logging
import pathlib
from typing import Dict, List, Optional, Tuple

from ml_metadata.proto import metadata_store_pb2

from pipeline.artifacts import span_of
from pipeline.components import monitor
from pipeline.components.validation import Verdict, read_verdict
from pipeline.metadata import mlmd
from pipeline.reports import plots, report, summary, watch_section

INDEX = "index.html"
STYLE = (
    report.STYLE
    + ".BLOCKED,.FAILED,.INTERRUPTED,.unreadable{color:#b00;font-weight:bold}td{white-space:nowrap}"
    + watch_section.STYLE
)


@dataclasses.dataclass
class RunRow:
    """What one run did, as ML Metadata recorded it."""

    number: int  # 1 for the store's first run
    run: str  # its name: when it started
    span: Optional[int]
    rows: Optional[int]  # of the span, all splits (StatisticsGen)
    verdict: str  # passed, passed with warnings, BLOCKED, FAILED, INTERRUPTED, running, not validated, unreadable
    blocked_by: List[str]  # blocking anomalies as check:feature, or the step that failed or was interrupted
    drift_found: List[str]  # features whose drift distance passed its threshold
    drift: Dict[str, Tuple[float, float]]  # feature -> (distance to the previous validated span, threshold)
    trained: bool
    eval_rmse: Optional[float]
    rmse_threshold: Optional[float]
    blessed: Optional[bool]
    pushed_version: str  # '' when nothing was pushed
    seconds: float
    prediction: Optional[Dict[str, float]]  # mean, 5% and 95% quantiles of the predictions on the eval split
    report: str  # the run's report, relative to the history page; '' if there is none


def verdict_of(verdict: Optional[Verdict], status: str, steps: List[mlmd.StepRecord]) -> Tuple[str, List[str]]:
    """A run's verdict for the history and what stopped it: BLOCKED by validation (its blocking anomalies as
    check:feature), FAILED or INTERRUPTED in a step, still running, or passed (with warnings) or not validated."""
    blocking = sorted({f"{f.check}:{f.feature or 'dataset'}" for f in verdict.blocking}) if verdict else []
    if blocking:
        return "BLOCKED", blocking
    if status in ("failed", "interrupted", "running"):
        where = "failed" if status == "failed" else "running"  # the state ML Metadata left the step in
        return (
            status if status == "running" else status.upper(),
            [f"{step.node_id} {status}" for step in steps if step.state == where],
        )
    if verdict is None:
        return "not validated", []
    return ("passed with warnings" if verdict.findings else "passed"), []


def run_row(config, store: mlmd.Store, run: metadata_store_pb2.Context, number: int) -> RunRow:
    """One run's row, from its steps' artifacts."""
    steps = store.steps(run)
    _, seconds = store.run_times(run)
    anomalies = summary.output_of(steps, "DataValidator", "anomalies")
    verdict = read_verdict(anomalies.uri) if anomalies is not None else None
    drift = (
        {
            name: (distance, threshold)
            for name, (_, distance, threshold) in report.drift_measurements(
                report.read_anomalies(anomalies.uri)
            ).items()
        }
        if anomalies
        else {}
    )
    examples = summary.output_of(steps, "CsvExampleGen", "examples")
    statistics = summary.output_of(steps, "StatisticsGen", "statistics")
    state, blocked_by = verdict_of(verdict, store.run_status(run, config.metadata_path), steps)
    evaluation = summary.output_of(steps, "Evaluator", "evaluation")
    blessing = summary.output_of(steps, "Evaluator", "blessing")
    pushed = summary.output_of(steps, "Pusher", "pushed_model")
    predictions = summary.output_of(steps, "PredictionMonitor", "monitoring")
    record = monitor.read(predictions.uri) if predictions is not None else None
    path = report.report_path(config, run.name)
    return RunRow(
        number=number,
        run=run.name,
        span=verdict.span if verdict else span_of(examples) if examples is not None else None,
        rows=sum(s.num_examples for s in summary.split_stats(statistics).values()) if statistics else None,
        verdict=state,
        blocked_by=blocked_by,
        drift_found=sorted({f.feature for f in verdict.findings if f.check == "drift"}) if verdict else [],
        drift=drift,
        trained=summary.output_of(steps, "Trainer", "model") is not None,
        eval_rmse=summary.slice_metrics(evaluation.uri)["overall"]["root_mean_squared_error"] if evaluation else None,
        rmse_threshold=summary.upper_bounds(summary.evaluation_thresholds(store, evaluation)).get(
            "root_mean_squared_error"
        )
        if evaluation
        else None,
        blessed=blessing.custom_properties["blessed"].int_value == 1 if blessing else None,
        pushed_version=(
            pathlib.Path(pushed.custom_properties["pushed_destination"].string_value).name
            if pushed is not None and pushed.custom_properties["pushed"].int_value == 1
            else ""
        ),
        seconds=seconds,
        prediction={"mean": record["mean"], "low": record["quantiles"]["0.05"], "high": record["quantiles"]["0.95"]}
        if record
        else None,
        report=path.name if path.is_file() else "",
    )


def rows(config) -> List[RunRow]:
    """Every run in the pipeline's ML Metadata store, oldest first; a run whose artifacts can't be read gets a
    row that says why (and the log a warning), so one damaged run doesn't hide the others."""
    store = mlmd.open_sqlite(config.metadata_path)
    result = []
    for number, run in enumerate(store.runs(), start=1):
        try:
            result.append(run_row(config, store, run, number))
        except Exception as error:  # an artifact deleted or from an older layout: name it, keep the other runs
            logging.warning("history: run %s can't be read: %s", run.name, error, exc_info=True)
            result.append(
                RunRow(
                    number,
                    run.name,
                    None,
                    None,
                    "unreadable",
                    [f"{type(error).__name__}: {error}"],
                    [],
                    {},
                    False,
                    None,
                    None,
                    None,
                    "",
                    0.0,
                    None,
                    "",
                )
            )
    return result


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(runs: List[RunRow]) -> str:
    head = [
        "#",
        "run",
        "span",
        "rows",
        "validation",
        "blocked by",
        "drift found",
        "eval RMSE",
        "blessed",
        "pushed version",
        "seconds",
    ]
    lines = ["<table><tr>" + "".join(f"<th>{name}</th>" for name in head) + "</tr>"]
    for row in reversed(runs):  # newest first
        name = f"<a href='{html.escape(row.report)}'>{html.escape(row.run)}</a>" if row.report else html.escape(row.run)
        cells = [
            str(row.number),
            name,
            _cell(row.span),
            _cell(row.rows),
            f"<span class='{row.verdict.split()[0]}'>{html.escape(row.verdict)}</span>",
            _cell(", ".join(row.blocked_by)),
            _cell(", ".join(row.drift_found)),
            _cell(row.eval_rmse),
            _cell(row.blessed),
            _cell(row.pushed_version),
            f"{row.seconds:.0f}",
        ]
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return "".join(lines) + "</table>"


def _plots(runs: List[RunRow]) -> str:
    labels = [f"{row.number}: span {row.span}" if row.span is not None else str(row.number) for row in runs]
    images = [
        plots.over_runs(
            labels,
            {"eval RMSE": [row.eval_rmse for row in runs]},
            "Eval RMSE per run, with its threshold",
            "RMSE (lb)",
            limits=[row.rmse_threshold for row in runs],
        ),
        plots.over_runs(labels, {"rows": [row.rows for row in runs]}, "Rows of each run's span", "rows", bars=True),
        plots.over_runs(
            labels,
            {"mean prediction": [row.prediction["mean"] if row.prediction else None for row in runs]},
            "Predictions on the eval split: mean, and 5-95% of them",
            "weight (lb)",
            band=[(row.prediction["low"], row.prediction["high"]) if row.prediction else (None, None) for row in runs],
            band_label="5-95%",
        ),
    ]
    features = sorted({name for row in runs for name in row.drift})
    if features:
        images.append(
            plots.drift_over_runs(
                labels,
                {name: [row.drift[name][0] if name in row.drift else None for row in runs] for name in features},
                {name: [row.drift[name][1] if name in row.drift else None for row in runs] for name in features},
                "Drift distance to the previous validated span per feature (dashed: its threshold)",
            )
        )
    return "<div class='plots'>" + "".join(images) + "</div>"


def write_index(config) -> pathlib.Path:
    """Rebuilds outputs/reports/index.html from ML Metadata (and the watcher's file, if any) and returns its path
    (written whole, then renamed)."""
    runs = rows(config)
    path = report.reports_dir(config) / INDEX
    body = (
        f"<h1>babyweight: the runs of pipeline {html.escape(config.pipeline_name)}</h1>"
        f"<p>{len(runs)} run(s) recorded in {html.escape(str(config.metadata_path))}, read back after the latest "
        "run. Each run's name links to its report.</p>"
        + watch_section.section(config)  # the watcher's alerts and checks, if `babyweight watch` ever ran
        + (_plots(runs) + "<h2>Runs, newest first</h2>" + _table(runs) if runs else "<p>No runs yet.</p>")
    )
    report.write_page(
        path,
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>babyweight runs</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>",
    )
    return path
