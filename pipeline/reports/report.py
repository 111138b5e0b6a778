"""One self-contained HTML report per run, in the run's output folder (outputs/reports/).

It puts together what the run summary prints and what TFDV renders: the six questions, TFDV's anomaly
and drift tables, each model column's distribution in the new span over the previous validated span's
(drift distance and threshold in the title, the anomalous ones first), TFMA's metrics per slice as bars
with the thresholds that decided the blessing, predicted against actual weights and the residuals per
slice. Slices carry the names of pipeline/reports/slices.py in every table and plot. Plots are SVG inside the
page (pipeline/reports/plots.py), so the file opens offline; TFDV's interactive Facets view, which loads its code
from the web, is a page of its own beside the report, linked from it.
"""

import html
import logging
import os
import pathlib
import re
from typing import Dict, List, Optional, Tuple

import pandas as pd
from tensorflow_data_validation.utils import display_util
from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2
from tfx.utils import io_utils

from models import features
from pipeline.components import baseline, infra_validator, monitor, tflite_export
from pipeline.components.validation import (
    ANOMALIES_FILE,
    DRIFT_SPLIT,
    Verdict,
    load_statistics,
    read_verdict,
    split_file,
)
from pipeline.metadata import mlmd
from pipeline.reports import plots, summary

STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;font-size:90%}h2{margin-top:1.5em}
.BLOCKING{color:#b00;font-weight:bold}.warning{color:#a60}.ok{color:#070}
.plots{display:flex;flex-wrap:wrap;gap:.5em}img.plot{max-width:100%;height:auto}"""
MODEL_COLUMNS = [c.name for c in features.FEATURES] + [features.LABEL.name]
MEASURES = {
    "L_INFTY": "L-infinity",
    "JENSEN_SHANNON_DIVERGENCE": "Jensen-Shannon",
    "NORMALIZED_ABSOLUTE_DIFFERENCE": "normalized difference",
}  # TFDV's drift measures, short for plot titles
METRICS = {"root_mean_squared_error": "RMSE", "mean_absolute_error": "MAE"}
# Numeric model columns with 'unknown' codes (99 weeks, ...): their plots read the rows, to draw the codes apart.
CODED_COLUMNS = {
    c.name: c.missing_codes for c in (*features.FEATURES, features.LABEL) if c.missing_codes and c.dtype != "string"
}
PLOT_ROWS = 100_000  # rows read per span for those plots: the first of the drift split, in file order


def reports_dir(config) -> pathlib.Path:
    """The folder of the run reports and the history page: outputs/reports."""
    return pathlib.Path(config.output_dir) / "reports"


def report_path(config, run_name: str) -> pathlib.Path:
    """Where the report of run `run_name` goes: outputs/reports/run-<run>.html."""
    return reports_dir(config) / f"run-{re.sub(r'[^0-9A-Za-z]+', '-', run_name).strip('-')}.html"


def write_page(path: pathlib.Path, text: str) -> None:
    """Writes a page whole: to a hidden file beside it, then renamed over it (a reader never sees half a page)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def drift_measurements(anomalies: anomalies_pb2.Anomalies) -> Dict[str, Tuple[str, float, float]]:
    """TFDV's drift measurement of each feature with a comparator: (measure, distance, threshold)."""
    found = {}
    for info in anomalies.drift_skew_info:
        for measurement in info.drift_measurements:
            measure = anomalies_pb2.DriftSkewInfo.Measurement.Type.Name(measurement.type)
            found[info.path.step[0]] = (MEASURES.get(measure, measure), measurement.value, measurement.threshold)
    return found


def read_anomalies(anomalies_uri: str, split: str = DRIFT_SPLIT) -> anomalies_pb2.Anomalies:
    """TFDV's anomalies of one split of a DataValidator output."""
    anomalies = anomalies_pb2.Anomalies()
    anomalies.ParseFromString(io_utils.read_bytes_file(split_file(anomalies_uri, split, ANOMALIES_FILE)))
    return anomalies


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(border=0, escape=True, float_format=lambda v: f"{v:.4g}") if len(frame) else "<p>none</p>"


def _feature_rows(dataset: statistics_pb2.DatasetFeatureStatistics) -> Dict[str, Dict[str, object]]:
    rows = {}
    for feature in dataset.features:
        name = feature.path.step[0]
        if name not in MODEL_COLUMNS:
            continue
        kind = feature.WhichOneof("stats")
        common = getattr(feature, kind).common_stats
        row = {"present": f"{common.tot_num_values / max(dataset.num_examples, 1):.1%}"}
        if kind == "num_stats":
            row.update(
                mean=f"{feature.num_stats.mean:.3f}",
                sd=f"{feature.num_stats.std_dev:.3f}",
                min=f"{feature.num_stats.min:g}",
                max=f"{feature.num_stats.max:g}",
            )
        else:
            total = sum(v.frequency for v in feature.string_stats.top_values) or 1
            row["top values"] = ", ".join(
                f"{v.value} {v.frequency / total:.0%}" for v in feature.string_stats.top_values[:4]
            )
        rows[name] = row
    return rows


def coded_values(store: mlmd.Store, statistics_uri: str) -> Optional[pd.DataFrame]:
    """The columns with 'unknown' codes, in the first PLOT_ROWS rows of the drift split that the statistics at
    `statistics_uri` were computed on (its StatisticsGen's input examples); None if they can't be read."""
    try:
        artifact = next(iter(store.artifacts_by_uri(statistics_uri)), None)
        producer = store.producer(artifact) if artifact is not None else None
        examples = store.inputs(producer).get("examples") if producer is not None else None
        if not examples:
            raise ValueError("ML Metadata records no examples for them")
        files = io_utils.all_files_pattern(os.path.join(examples[0].uri, f"Split-{DRIFT_SPLIT}"))
        import tensorflow as tf

        coded = [features.BY_NAME[name] for name in CODED_COLUMNS]
        return baseline.read_examples(sorted(tf.io.gfile.glob(files)), limit=PLOT_ROWS, columns=coded)
    except Exception as error:  # plotted from TFDV's histograms instead: the run and its report go on
        # A span whose column holds text where a number belongs (blocked as a type change) can't be parsed.
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        logging.warning(
            "report: the rows behind %s can't be read (%s); plotted from TFDV's histograms", statistics_uri, reason
        )
        logging.info("the rows behind %s", statistics_uri, exc_info=True)
        return None


def _distribution_plots(
    current: statistics_pb2.DatasetFeatureStatistics,
    previous: Optional[statistics_pb2.DatasetFeatureStatistics],
    verdict: Verdict,
    drift: Dict[str, Tuple[str, float, float]],
    coded: Dict[str, pd.DataFrame],
) -> str:
    """Each model column's distribution over the previous span's: blocking ones first, then warnings, then by
    drift distance against its threshold."""
    now = {f.path.step[0]: f for f in current.features}
    before = {f.path.step[0]: f for f in previous.features} if previous is not None else {}
    found: Dict[str, List] = {}
    for finding in verdict.findings:
        found.setdefault(finding.feature, []).append(finding)

    def rank(name: str) -> tuple:
        flagged = found.get(name, [])
        measure = drift.get(name)
        ratio = measure[1] / measure[2] if measure and measure[2] else 0.0
        return (not any(f.blocking for f in flagged), not flagged, -ratio, MODEL_COLUMNS.index(name))

    images = []
    for name in sorted((n for n in MODEL_COLUMNS if n in now), key=rank):
        flagged = found.get(name, [])
        checks = sorted({f.check for f in flagged})
        head = name + (
            f": {'BLOCKING' if any(f.blocking for f in flagged) else 'warning'} {', '.join(checks)}" if flagged else ""
        )
        if name in drift:
            measure, distance, threshold = drift[name]
            detail = f"{measure} {distance:.3f} {'>' if distance > threshold else '<='} threshold {threshold:g}"
        elif previous is None:
            detail = "no earlier validated span to compare with"
        else:
            detail = "no drift check in the schema"
        values = {key: frame[name].to_numpy() for key, frame in coded.items() if name in frame}
        images.append(
            plots.distribution(
                f"{head}\n{detail}",
                now[name],
                f"span {verdict.span}",
                before.get(name),
                f"span {verdict.baseline_span}",
                alert=bool(flagged),
                values=values,
                unknown_codes=CODED_COLUMNS.get(name, ()),
            )
        )
    return "<div class='plots'>" + "".join(images) + "</div>"


def _statistics_section(
    current: statistics_pb2.DatasetFeatureStatisticsList,
    previous: Optional[statistics_pb2.DatasetFeatureStatisticsList],
    drift: pd.DataFrame,
    verdict: Verdict,
    measurements: Dict[str, Tuple[str, float, float]],
    facets_link: str,
    coded: Dict[str, pd.DataFrame],
) -> str:
    now = _feature_rows(current.datasets[0])
    before = _feature_rows(previous.datasets[0]) if previous is not None else {}
    records = []
    for name in MODEL_COLUMNS:
        for label, rows in ((f"span {verdict.span}", now), (f"span {verdict.baseline_span}", before)):
            if name in rows:
                records.append({"feature": name, "span": label, **rows[name]})
    frame = pd.DataFrame(records).fillna("")
    parts = [
        f"<p>Train split: {current.datasets[0].num_examples} rows in span {verdict.span}"
        + (f", {previous.datasets[0].num_examples} in span {verdict.baseline_span}" if previous else "")
        + (
            f". A column with 'unknown' codes (99 weeks, ...) is drawn from the first {PLOT_ROWS:,} rows of each span, "
            "its codes as a bar of their own"
            if coded
            else ". The columns with 'unknown' codes are drawn from TFDV's histograms (their rows could not be read)"
        )
        + f". TFDV's interactive view of the same statistics: <a href='{html.escape(facets_link)}'>Facets</a> "
        "(it loads its code from the web).</p>",
        _distribution_plots(
            current.datasets[0], previous.datasets[0] if previous else None, verdict, measurements, coded
        ),
        _table(frame.set_index(["feature", "span"]) if len(frame) else frame),
    ]
    parts += ["<h3>Drift: distance to the previous span, by TFDV</h3>", _table(drift)]
    return "\n".join(parts)


def _facets_page(
    current: statistics_pb2.DatasetFeatureStatisticsList,
    previous: Optional[statistics_pb2.DatasetFeatureStatisticsList],
    verdict: Verdict,
) -> str:
    """TFDV's Facets view of the statistics as a page of its own (Facets loads from the web)."""
    facets = (
        display_util.get_statistics_html(
            current, previous, lhs_name=f"span {verdict.span}", rhs_name=f"span {verdict.baseline_span}"
        )
        if previous
        else display_util.get_statistics_html(current)
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Facets: span {verdict.span}</title></head>"
        f"<body>{facets}</body></html>"
    )


def _validation_section(anomalies: anomalies_pb2.Anomalies, verdict: Verdict) -> str:
    """The answers and anomalies as HTML."""
    questions = "".join(
        f"<tr><td>{number}</td><td>{html.escape(a['question'])}</td>"
        f"<td class='{a['status'].split(':')[0]}'>{html.escape(a['status'])}</td>"
        f"<td>{html.escape(', '.join(a['features']))}</td></tr>"
        for number, a in enumerate(verdict.answers(), start=1)
    )
    parts = [
        f"<table><tr><th></th><th>question</th><th>answer</th><th>features</th></tr>{questions}</table>",
        "<h3>Anomalies</h3>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in verdict.lines()) + "</ul>"
        if verdict.findings
        else "<p>none</p>",
    ]
    parts += ["<h3>TFDV's anomalies table (train split)</h3>", _table(display_util.get_anomalies_dataframe(anomalies))]
    return "\n".join(parts)


def _evaluation_section(evaluation_uri: str, blessing, reference: Optional[Dict], thresholds: Dict[str, float]) -> str:
    metrics = summary.slice_metrics(evaluation_uri)
    lines = summary.evaluation_verdict_lines(evaluation_uri, blessing)
    if reference is not None:
        lines.insert(0, f"Reference models on the same rows: {summary.reference_line(reference)}.")
    chart = plots.metrics_by_slice(
        metrics, METRICS, thresholds, "TFMA's metrics per slice of the eval split; the thresholds gate 'overall'"
    )
    return (
        chart
        + _table(pd.DataFrame(metrics).T)
        + "<p>"
        + "<br>".join(html.escape(line.strip()) for line in lines)
        + "</p>"
    )


def _predictions_section(record: Dict) -> str:
    residuals = pd.DataFrame(
        {
            name: {key: value for key, value in stats.items() if key != "quantiles"}
            for name, stats in record["residuals"].items()
        }
    ).T
    images = []
    if record.get("predicted_vs_actual", {}).get("cells"):  # none: no labelled row, or a record from before
        images.append(
            plots.predicted_vs_actual(
                record["predicted_vs_actual"], f"Predicted against actual weight, eval split of span {record['span']}"
            )
        )
        images.append(plots.residuals_by_slice(record["residuals"], "Residuals (label - prediction) by slice"))
    return (
        "<p>"
        + "<br>".join(html.escape(line.strip()) for line in summary.monitor_lines(record)[:2])
        + "</p>"
        + "<div class='plots'>"
        + "".join(images)
        + "</div>"
        + "<h3>Residuals (label - prediction) by slice</h3>"
        + _table(residuals)
    )


def write_report(config, run_name: str, steps: List[mlmd.StepRecord], outcome: str) -> pathlib.Path:
    """Writes outputs/reports/<run>.html for the run's steps and returns its path."""
    sections = [f"<h1>babyweight run {html.escape(run_name)}</h1><p>{html.escape(outcome)}</p>"]
    path = report_path(config, run_name)
    beside = []  # pages the report links to, written just before it
    anomalies = summary.output_of(steps, "DataValidator", "anomalies")
    statistics = summary.output_of(steps, "StatisticsGen", "statistics")
    if anomalies is not None and statistics is not None:
        verdict = read_verdict(anomalies.uri)
        found = read_anomalies(anomalies.uri)
        sections += [f"<h2>Data validation of span {verdict.span}</h2>", _validation_section(found, verdict)]
        current = load_statistics(statistics.uri, DRIFT_SPLIT)
        previous = load_statistics(verdict.baseline_statistics, DRIFT_SPLIT) if verdict.baseline_statistics else None
        facets = path.with_name(path.stem + "-facets.html")
        beside.append((facets, _facets_page(current, previous, verdict)))
        store = mlmd.open_sqlite(config.metadata_path)
        coded = {"now": coded_values(store, statistics.uri)}
        if verdict.baseline_statistics:
            coded["before"] = coded_values(store, verdict.baseline_statistics)
        if any(frame is None for frame in coded.values()):
            coded = {}  # both spans from TFDV's histograms: one span's rows against the other's histogram would mislead
        sections += [
            "<h2>Statistics: the new span next to the previous validated span</h2>",
            _statistics_section(
                current,
                previous,
                display_util.get_drift_skew_dataframe(found),
                verdict,
                drift_measurements(found),
                facets.name,
                coded,
            ),
        ]
    tuning = summary.run_tuning_lines(steps, indent="")
    if tuning:
        sections += [
            "<h2>Tuning: the trials, and the values the Trainer took</h2>",
            "<pre>" + html.escape("\n".join(tuning)) + "</pre>",
        ]
    evaluation = summary.output_of(steps, "Evaluator", "evaluation")
    if evaluation is not None:
        reference = summary.output_of(steps, "TreeBaseline", "baseline")
        thresholds = summary.upper_bounds(
            summary.evaluation_thresholds(mlmd.open_sqlite(config.metadata_path), evaluation)
        )
        sections += [
            "<h2>Evaluation by slice (TFMA)</h2>",
            _evaluation_section(
                evaluation.uri,
                summary.output_of(steps, "Evaluator", "blessing"),
                baseline.read(reference.uri) if reference else None,
                thresholds,
            ),
        ]
    predictions = summary.output_of(steps, "PredictionMonitor", "monitoring")
    if predictions is not None:
        sections += ["<h2>Predictions on the new span</h2>", _predictions_section(monitor.read(predictions.uri))]
    infra = summary.output_of(steps, "InfraValidator", "blessing")
    if infra is not None:
        sections += [
            "<h2>Infra validation: the candidate served before the push</h2>",
            "<pre>"
            + html.escape("\n".join(summary.infra_lines(infra_validator.read(infra.uri), indent="")))
            + "</pre>",
        ]
    exported = summary.output_of(steps, "TFLiteExporter", "tflite_model")
    if exported is not None:
        sections += [
            "<h2>TFLite models for devices</h2>",
            "<pre>"
            + html.escape("\n".join(summary.tflite_lines(tflite_export.read(exported.uri), indent="")))
            + "</pre>",
        ]
    steps_frame = pd.DataFrame([{"step": s.node_id, "state": s.state, "seconds": s.seconds} for s in steps])
    sections += ["<h2>Steps</h2>", _table(steps_frame.set_index("step"))]
    for page, text in beside:
        write_page(page, text)
    write_page(
        path,
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>babyweight {html.escape(run_name)}"
        f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>",
    )
    return path
