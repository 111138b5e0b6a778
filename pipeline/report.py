"""One self-contained HTML report per run, in the run's output folder (outputs/reports/).

It puts together what the run summary prints and what TFDV renders: the six questions, TFDV's anomaly
and drift tables, the new span's statistics next to the previous validated span's, TFMA's metrics per
slice with the thresholds that decided the blessing, and the predictions' distribution and residuals.
Tables are plain HTML, so the file opens anywhere; TFDV's interactive Facets view is embedded as well,
for browsers that can load Facets from the web.
"""
import html
import pathlib
import re
from typing import Dict, List, Optional, Tuple

import pandas as pd
from tensorflow_data_validation.utils import display_util
from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2
from tfx.utils import io_utils

from models import features
from pipeline import baseline, infra_validator, mlmd, monitor, summary, tflite_export
from pipeline.validation import ANOMALIES_FILE, DRIFT_SPLIT, Verdict, load_statistics, read_verdict, split_file

STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;font-size:90%}h2{margin-top:1.5em}
.BLOCKING{color:#b00;font-weight:bold}.warning{color:#a60}.ok{color:#070}"""
MODEL_COLUMNS = [c.name for c in features.FEATURES] + [features.LABEL.name]


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
            row.update(mean=f"{feature.num_stats.mean:.3f}", sd=f"{feature.num_stats.std_dev:.3f}",
                       min=f"{feature.num_stats.min:g}", max=f"{feature.num_stats.max:g}")
        else:
            total = sum(v.frequency for v in feature.string_stats.top_values) or 1
            row["top values"] = ", ".join(f"{v.value} {v.frequency / total:.0%}"
                                          for v in feature.string_stats.top_values[:4])
        rows[name] = row
    return rows


def _statistics_section(current: statistics_pb2.DatasetFeatureStatisticsList,
                        previous: Optional[statistics_pb2.DatasetFeatureStatisticsList],
                        drift: pd.DataFrame, verdict: Verdict) -> str:
    now = _feature_rows(current.datasets[0])
    before = _feature_rows(previous.datasets[0]) if previous is not None else {}
    records = []
    for name in MODEL_COLUMNS:
        for label, rows in ((f"span {verdict.span}", now), (f"span {verdict.baseline_span}", before)):
            if name in rows:
                records.append({"feature": name, "span": label, **rows[name]})
    frame = pd.DataFrame(records).fillna("")
    parts = [f"<p>Train split: {current.datasets[0].num_examples} rows in span {verdict.span}"
             + (f", {previous.datasets[0].num_examples} in span {verdict.baseline_span}" if previous else "")
             + ".</p>", _table(frame.set_index(["feature", "span"]) if len(frame) else frame)]
    parts += ["<h3>Drift: distance to the previous span, by TFDV</h3>", _table(drift)]
    facets = display_util.get_statistics_html(current, previous, lhs_name=f"span {verdict.span}",
                                              rhs_name=f"span {verdict.baseline_span}") if previous else \
        display_util.get_statistics_html(current)
    parts.append("<details><summary>TFDV's interactive view (Facets; needs a connection to load)</summary>"
                 f"<iframe style='width:100%;height:60em;border:0' srcdoc=\"{html.escape(facets)}\"></iframe>"
                 "</details>")
    return "\n".join(parts)


def _validation_section(anomalies_uri: str, verdict: Verdict) -> Tuple[str, pd.DataFrame]:
    """The answers and anomalies as HTML, and TFDV's drift measurements of the train split."""
    questions = "".join(
        f"<tr><td>{number}</td><td>{html.escape(a['question'])}</td>"
        f"<td class='{a['status'].split(':')[0]}'>{html.escape(a['status'])}</td>"
        f"<td>{html.escape(', '.join(a['features']))}</td></tr>"
        for number, a in enumerate(verdict.answers(), start=1))
    parts = [f"<table><tr><th></th><th>question</th><th>answer</th><th>features</th></tr>{questions}</table>",
             "<h3>Anomalies</h3>", "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in verdict.lines())
             + "</ul>" if verdict.findings else "<p>none</p>"]
    anomalies = anomalies_pb2.Anomalies()
    anomalies.ParseFromString(io_utils.read_bytes_file(split_file(anomalies_uri, DRIFT_SPLIT, ANOMALIES_FILE)))
    parts += ["<h3>TFDV's anomalies table (train split)</h3>", _table(display_util.get_anomalies_dataframe(anomalies))]
    return "\n".join(parts), display_util.get_drift_skew_dataframe(anomalies)


def _evaluation_section(evaluation_uri: str, blessing, reference: Optional[Dict]) -> str:
    metrics = pd.DataFrame(summary.slice_metrics(evaluation_uri)).T.sort_index()
    lines = summary.evaluation_verdict_lines(evaluation_uri, blessing)
    if reference is not None:
        lines.insert(0, f"Reference models on the same rows: {summary.reference_line(reference)}.")
    return _table(metrics) + "<p>" + "<br>".join(html.escape(line.strip()) for line in lines) + "</p>"


def _predictions_section(record: Dict) -> str:
    residuals = pd.DataFrame(record["residuals"]).T
    return ("<p>" + "<br>".join(html.escape(line.strip()) for line in summary.monitor_lines(record)[:2]) + "</p>"
            + "<h3>Residuals (label - prediction) by slice</h3>" + _table(residuals))


def write_report(config, run_name: str, steps: List[mlmd.StepRecord], outcome: str) -> pathlib.Path:
    """Writes outputs/reports/<run>.html for the run's steps and returns its path."""
    sections = [f"<h1>babyweight run {html.escape(run_name)}</h1><p>{html.escape(outcome)}</p>"]
    anomalies = summary.output_of(steps, "DataValidator", "anomalies")
    statistics = summary.output_of(steps, "StatisticsGen", "statistics")
    if anomalies is not None and statistics is not None:
        verdict = read_verdict(anomalies.uri)
        validation, drift = _validation_section(anomalies.uri, verdict)
        sections += [f"<h2>Data validation of span {verdict.span}</h2>", validation]
        current = load_statistics(statistics.uri, DRIFT_SPLIT)
        previous = load_statistics(verdict.baseline_statistics, DRIFT_SPLIT) if verdict.baseline_statistics else None
        sections += ["<h2>Statistics: the new span next to the previous validated span</h2>",
                     _statistics_section(current, previous, drift, verdict)]
    tuning = summary.run_tuning_lines(steps, indent="")
    if tuning:
        sections += ["<h2>Tuning: the trials, and the values the Trainer took</h2>",
                     "<pre>" + html.escape("\n".join(tuning)) + "</pre>"]
    evaluation = summary.output_of(steps, "Evaluator", "evaluation")
    if evaluation is not None:
        reference = summary.output_of(steps, "TreeBaseline", "baseline")
        sections += ["<h2>Evaluation by slice (TFMA)</h2>",
                     _evaluation_section(evaluation.uri, summary.output_of(steps, "Evaluator", "blessing"),
                                         baseline.read(reference.uri) if reference else None)]
    predictions = summary.output_of(steps, "PredictionMonitor", "monitoring")
    if predictions is not None:
        sections += ["<h2>Predictions on the new span</h2>", _predictions_section(monitor.read(predictions.uri))]
    infra = summary.output_of(steps, "InfraValidator", "blessing")
    if infra is not None:
        sections += ["<h2>Infra validation: the candidate served before the push</h2>",
                     "<pre>" + html.escape("\n".join(summary.infra_lines(infra_validator.read(infra.uri), indent="")))
                     + "</pre>"]
    exported = summary.output_of(steps, "TFLiteExporter", "tflite_model")
    if exported is not None:
        sections += ["<h2>TFLite models for devices</h2>",
                     "<pre>" + html.escape("\n".join(summary.tflite_lines(tflite_export.read(exported.uri), indent="")))
                     + "</pre>"]
    steps_frame = pd.DataFrame([{"step": s.node_id, "state": s.state, "seconds": s.seconds} for s in steps])
    sections += ["<h2>Steps</h2>", _table(steps_frame.set_index("step"))]
    name = re.sub(r"[^0-9A-Za-z]+", "-", run_name).strip("-")
    path = pathlib.Path(config.output_dir) / "reports" / f"run-{name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>babyweight {html.escape(run_name)}"
                    f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    return path
