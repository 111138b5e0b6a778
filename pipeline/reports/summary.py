"""What a run did, read back from ML Metadata and the artifacts it recorded."""

import json
import pathlib
from typing import Dict, List, Optional, Tuple

import tensorflow_model_analysis as tfma
from google.protobuf import text_format
from ml_metadata.proto import metadata_store_pb2
from tensorflow_metadata.proto.v0 import statistics_pb2
from tfx.types import artifact_utils

from pipeline.artifacts import span_of
from pipeline.components import baseline, infra_validator, monitor, tflite_export
from pipeline.components.csv_check import CsvSummary
from pipeline.components.validation import Verdict, load_statistics, read_verdict
from pipeline.config import PipelineConfig
from pipeline.metadata import mlmd
from pipeline.reports import slices


def side_by_side(steps: List[mlmd.StepRecord]) -> str:
    """The steps that ran at the same time (pipeline/runner.py) and for how long, as the summary and bench say it."""
    return (
        "; ".join(f"{first} and {second} {seconds:.1f} s" for first, second, seconds in mlmd.overlaps(steps)) or "none"
    )


def output_of(steps: List[mlmd.StepRecord], node_id: str, key: str) -> Optional[metadata_store_pb2.Artifact]:
    """The artifact a step of the run wrote under `key`, or None if it didn't run or wrote none."""
    for step in steps:
        if step.node_id == node_id and step.outputs.get(key):
            return step.outputs[key][-1]
    return None


def split_stats(statistics: metadata_store_pb2.Artifact) -> Dict[str, statistics_pb2.DatasetFeatureStatistics]:
    """The statistics of each split of a StatisticsGen output."""
    splits = artifact_utils.decode_split_names(statistics.properties["split_names"].string_value)
    return {split: load_statistics(statistics.uri, split).datasets[0] for split in splits}


def slice_metrics(evaluation_uri: str) -> Dict[str, Dict[str, float]]:
    """TFMA metrics of an Evaluator output by slice, named for people ('overall', 'boys', 'twins', ...), in order."""
    return dict(
        slices.ordered(
            {
                tuple(slice_key): {
                    metric: value.get("doubleValue", float("nan")) for metric, value in metrics[""][""].items()
                }
                for slice_key, metrics in tfma.load_eval_result(evaluation_uri).slicing_metrics
            }
        )
    )


def evaluation_thresholds(store: mlmd.Store, evaluation: metadata_store_pb2.Artifact) -> Dict[str, List[Dict]]:
    """The thresholds of each metric the Evaluator that wrote `evaluation` ran with (its eval_config in ML Metadata),
    by the metric's name, as the metrics are (our metric classes have names of their own:
    pipeline/components/evaluation/tfma_metrics.py)."""
    from pipeline.components.evaluation import tfma_metrics

    evaluator = store.producer(evaluation)
    eval_config = json.loads(mlmd.value_of(evaluator.custom_properties["eval_config"])) if evaluator else {}
    return {
        tfma_metrics.NAMES.get(metric["class_name"], metric["class_name"]): [
            t["threshold"] for t in metric["per_slice_thresholds"]
        ]
        for spec in eval_config.get("metrics_specs", [])
        for metric in spec["metrics"]
        if metric.get("per_slice_thresholds")
    }


def upper_bounds(thresholds: Dict[str, List[Dict]]) -> Dict[str, float]:
    """The upper bound of each metric's value threshold (`evaluation_thresholds`), for metrics that have one."""
    return {
        name: threshold["value_threshold"]["upper_bound"]
        for name, found in thresholds.items()
        for threshold in found
        if "upper_bound" in threshold.get("value_threshold", {})
    }


def reference_line(record: Dict) -> str:
    """The reference models' eval RMSE (pipeline/components/baseline.py), on the rows the model was evaluated on."""
    return (
        f"gradient-boosted trees: RMSE {record['trees_rmse']:.3f} lb; predicting the training mean: "
        f"RMSE {record['mean_rmse']:.3f} lb; {record['eval_rows']} eval rows"
    )


def _evaluation_lines(
    evaluation: metadata_store_pb2.Artifact, blessing: Optional[metadata_store_pb2.Artifact], reference: Optional[Dict]
) -> List[str]:
    metrics = slice_metrics(evaluation.uri)
    overall = metrics.pop("overall")
    lines = [
        f"  eval RMSE {overall['root_mean_squared_error']:.3f} lb, MAE {overall['mean_absolute_error']:.3f} lb"
        + (f" ({reference_line(reference)})" if reference else ""),
        "  per slice:",
    ]
    lines.extend(
        f"    {name:<32} RMSE {values['root_mean_squared_error']:6.3f}  "
        f"MAE {values['mean_absolute_error']:6.3f}  n={values['weighted_example_count']:.0f}"
        for name, values in metrics.items()
    )
    return lines + evaluation_verdict_lines(evaluation.uri, blessing)


def evaluation_verdict_lines(evaluation_uri: str, blessing: Optional[metadata_store_pb2.Artifact]) -> List[str]:
    """Blessed or not, and each threshold the model failed."""
    lines = []
    if blessing is not None:
        blessed = blessing.custom_properties["blessed"].int_value == 1
        lines.append(f"  blessed: {'yes' if blessed else 'no'}")
    validation = tfma.load_validation_result(evaluation_uri)
    for per_slice in validation.metric_validations_per_slice:
        for failure in per_slice.failures:
            threshold = text_format.MessageToString(failure.metric_threshold, as_one_line=True)
            lines.append(
                f"    why not: {failure.metric_key.name} = {failure.metric_value.double_value.value:.3f} "
                f"fails its threshold {threshold}"
                + (" against the blessed baseline" if failure.metric_key.is_diff else "")
            )
    return lines


def validation_lines(verdict: Verdict) -> List[str]:
    """The six questions with their answers, then each anomaly found."""
    compared = (
        f"compared with span {verdict.baseline_span}"
        if verdict.baseline_span is not None
        else "no earlier validated span to compare with"
    )
    lines = [f"  data validation of span {verdict.span} ({compared}):"]
    for number, answer in enumerate(verdict.answers(), start=1):
        features_found = f" ({', '.join(answer['features'])})" if answer["features"] else ""
        lines.append(f"    {number}. {answer['question']:<72} {answer['status']}{features_found}")
    found, blocking = verdict.lines(), verdict.lines(blocking_only=True)
    lines.append(f"  anomalies: {len(found) or 'none'}" + (f" ({len(blocking)} blocking)" if found else ""))
    lines.extend(f"    {line}" for line in found)
    return lines


def _window_line(steps: List[mlmd.StepRecord]) -> Optional[str]:
    trainer = next((step for step in steps if step.node_id == "Trainer"), None)
    if trainer is None or not trainer.inputs.get("examples"):
        return None
    spans = sorted(span_of(a) for a in trainer.inputs["examples"])
    return f"  trained on span(s) {', '.join(map(str, spans))}"


def tuning_record(best_hyperparameters_uri: str, tuner_results_uri: str) -> Dict:
    """What the Tuner found: the chosen values, and every completed trial (values, validation RMSE), best first."""
    from tfx.components.tuner import executor as tuner_executor
    from tfx.utils import io_utils

    from models import tuning

    def read(uri: str, name: str) -> object:
        return json.loads(io_utils.read_string_file(f"{uri}/{name}"))

    return {
        "chosen": read(best_hyperparameters_uri, tuner_executor._DEFAULT_BEST_HP_FILE_NAME)["values"],
        "trials": tuning.results(read(tuner_results_uri, tuner_executor._DEFAULT_TUNER_RESULTS_FILE_NAME)),
    }


def tuning_lines(record: Dict, step: Optional[mlmd.StepRecord] = None, indent: str = "  ") -> List[str]:
    """The search's trials as a table (validation RMSE on rows held out of the train split, best first), the
    profile's own settings (the first trial) and the values chosen for the Trainer; `step`: the Tuner's."""
    from models.tuning import OBJECTIVE

    trials = record["trials"]
    took = ""
    if step is not None:
        took = (
            " (cached: an earlier run's search on the same data, code and settings)"
            if step.state == "cached"
            else f" in {step.seconds:.0f} s"
        )
    names = list(record["chosen"])

    def text(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    widths = {name: max([len(name)] + [len(text(row["values"].get(name))) for row in trials]) for name in names}
    lines = [
        f"{indent}tuning: {len(trials)} trials completed{took}; validation RMSE on rows held out of the "
        "train split (models/tuning.py):",
        f"{indent}  trial  val RMSE  " + "  ".join(name.ljust(widths[name]) for name in names),
    ]
    for row in trials:
        mark = ("*" if row["values"] == record["chosen"] else " ") + ("p" if row["trial"] == 1 else " ")
        lines.append(
            f"{indent}  {row['trial']:>4} {mark}{row[OBJECTIVE]:8.4f}  "
            + "  ".join(text(row["values"].get(name)).ljust(widths[name]) for name in names).rstrip()
        )
    lines.append(f"{indent}  (* chosen; p the profile's own settings, always trial 1)")
    lines.append(
        f"{indent}  chosen, the Trainer's hyperparameters: "
        + ", ".join(f"{name}={text(value)}" for name, value in record["chosen"].items())
    )
    return lines


def run_tuning_lines(steps: List[mlmd.StepRecord], indent: str = "  ") -> List[str]:
    """The Tuner's trials and choice in a run (none in a run without a Tuner, or whose Tuner failed)."""
    best = output_of(steps, "Tuner", "best_hyperparameters")
    tuner_results = output_of(steps, "Tuner", "tuner_results")
    if best is None or tuner_results is None:
        return []
    tuner = next(step for step in steps if step.node_id == "Tuner")
    return tuning_lines(tuning_record(best.uri, tuner_results.uri), tuner, indent)


def monitor_lines(record: Dict) -> List[str]:
    """The predictions' distribution on the new span, its change since the previous run, residuals by slice."""
    quantiles = " ".join(f"{value:.2f}" for value in record["quantiles"].values())
    lines = [
        f"  predictions on span {record['span']} (eval split, {record['n']} rows): mean {record['mean']:.3f} lb, "
        f"sd {record['std']:.3f}, quantiles 5/25/50/75/95%: {quantiles}"
    ]
    change = record["change"]
    if change["previous"] is None:
        lines.append("    no earlier run's predictions to compare with")
    else:
        verdict = "MOVED beyond" if change["shifted"] else "within"
        lines.append(
            f"    since the previous run (span {change['previous']['span']}): "
            f"mean {change['mean_change']:+.3f} lb, "
            f"median {change['quantile_changes']['0.5']:+.3f} lb: {verdict} {change['threshold']:.2f} lb"
        )
    lines.append("    residuals (label - prediction) by slice:")
    lines.extend(
        f"      {name:<30} mean {values['mean_residual']:+.3f}  RMSE {values['rmse']:.3f}  n={values['n']}"
        for name, values in record["residuals"].items()
        if values["n"]
    )
    return lines


def infra_lines(record: Dict, indent: str = "  ") -> List[str]:
    """The infra validation's verdict, and each check with its figure and the requests that failed it."""
    if "skipped" in record:
        return [f"{indent}infra validation: not run ({record['skipped']})"]
    lines = [
        f"{indent}infra validation (the candidate served by babyweight serve): "
        f"{'blessed' if record['blessed'] else 'REFUSED'}"
    ]
    for check in record["checks"]:
        lines.append(f"{indent}  {check['name']:<8} {'ok' if check['passed'] else 'FAILED':<6} {check['figure']}")
        lines.extend(f"{indent}    {failure}" for failure in check["failures"])
    return lines


def tflite_lines(record: Dict, indent: str = "  ") -> List[str]:
    """Where the TFLite models went (or why they didn't), their sizes, and each parity check with its figure."""
    if not record["files"]:
        return [f"{indent}TFLite: not exported ({record['skipped']})"]
    sizes = ", ".join(
        f"{described['name']} {described['bytes'] / 1024:.0f} KiB ({variant})"
        for variant, described in record["files"].items()
    )
    lines = [
        f"{indent}TFLite: {sizes}: "
        + (f"pushed to {record['destination']}" if record["pushed"] else f"NOT pushed: {record['skipped']}")
    ]
    if record["checks"]:
        lines.append(
            f"{indent}  checked against the SavedModel on {record['figures']['rows']} eval rows the serving "
            "contract accepts:"
        )
    lines.extend(
        f"{indent}    {item['name']:<8} {'ok' if item['passed'] else 'FAILED':<6} {item['figure']}"
        for item in record["checks"]
    )
    return lines


def bulk_inference_line(config: PipelineConfig, uri: str) -> str:
    """How many of bulk_inference_dir's rows BulkInferrer predicted, and where the predictions are."""
    import csv
    import glob

    import tensorflow as tf

    from pipeline.pipeline import PREDICTED_COLUMN

    files = tf.io.gfile.glob(f"{uri}/Split-*/*")
    if not files:
        return "  bulk inference: nothing predicted (the Evaluator did not bless the model)"
    predicted = sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    rows = 0
    for path in glob.glob(f"{config.bulk_inference_dir}/*.csv"):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows += max(0, sum(1 for row in csv.reader(handle) if any(field.strip() for field in row)) - 1)
    left_out = f", {rows - predicted} of {rows} left out: they lack a required feature" if rows > predicted else ""
    return (
        f"  bulk inference: {predicted} unlabelled rows predicted{left_out}; tf.Examples with "
        f"{PREDICTED_COLUMN}: {files[0].rsplit('/', 1)[0]}"
    )


def latest_run(config: PipelineConfig) -> Optional[Tuple[str, List[mlmd.StepRecord]]]:
    """The latest run's name and steps, or None before the first run."""
    if not pathlib.Path(config.metadata_path).is_file():
        return None
    store = mlmd.open_sqlite(config.metadata_path)
    runs = store.runs()
    return (runs[-1].name, store.steps(runs[-1])) if runs else None


def summarize_run(
    config: PipelineConfig, run_name: str, steps: List[mlmd.StepRecord], checked: Optional[CsvSummary] = None
) -> str:
    """A short human summary of a run: data checks, RMSE, blessing, push, seconds per step."""
    lines = [f"Run {run_name} of pipeline {config.pipeline_name}"]

    statistics = output_of(steps, "StatisticsGen", "statistics")
    stats_by_split = split_stats(statistics) if statistics else {}
    if stats_by_split:
        lines.append("  rows: " + ", ".join(f"{split} {stats.num_examples}" for split, stats in stats_by_split.items()))

    if checked is not None:
        lines.append(
            f"  input: {checked.rows} rows in {len(checked.files)} file(s)"
            + (f", span {checked.span}" if checked.span is not None else "")
        )
        lines.extend(f"    {note}" for note in checked.notes)

    anomalies = output_of(steps, "DataValidator", "anomalies")
    if anomalies:
        lines.extend(validation_lines(read_verdict(anomalies.uri)))
    window = _window_line(steps)
    if window:
        lines.append(window)

    lines.extend(run_tuning_lines(steps))

    evaluation = output_of(steps, "Evaluator", "evaluation")
    if evaluation:
        reference = output_of(steps, "TreeBaseline", "baseline")
        lines.extend(
            _evaluation_lines(
                evaluation,
                output_of(steps, "Evaluator", "blessing"),
                baseline.read(reference.uri) if reference else None,
            )
        )

    predictions = output_of(steps, "PredictionMonitor", "monitoring")
    if predictions is not None:
        lines.extend(monitor_lines(monitor.read(predictions.uri)))

    infra = output_of(steps, "InfraValidator", "blessing")
    infra_record = infra_validator.read(infra.uri) if infra is not None else {}
    if infra_record:
        lines.extend(infra_lines(infra_record))

    pushed = output_of(steps, "Pusher", "pushed_model")
    if pushed is not None and pushed.custom_properties["pushed"].int_value == 1:
        lines.append(f"  pushed: {pushed.custom_properties['pushed_destination'].string_value}")
    elif pushed is not None:
        refused = [check["name"] for check in infra_record.get("checks", []) if not check["passed"]]
        lines.append(
            "  pushed: no ("
            + (f"infra validation failed: {', '.join(refused)}" if refused else "the Evaluator did not bless the model")
            + ")"
        )

    exported = output_of(steps, "TFLiteExporter", "tflite_model")
    if exported is not None:
        lines.extend(tflite_lines(tflite_export.read(exported.uri)))

    inferred = output_of(steps, "BulkInferrer", "output_examples")
    if inferred is not None:
        line = bulk_inference_line(config, inferred.uri)
        unpushed = lines[-1].startswith("  pushed: no") and "nothing predicted" not in line
        lines.append(line + (" (by a model that was not pushed)" if unpushed else ""))

    lines.append("  seconds per component:")
    lines.extend(f"    {step.node_id:<32} {step.state:<9} {step.seconds:6.1f}" for step in steps)
    lines.append(f"    {'total':<32} {'':<9} {sum(step.seconds for step in steps):6.1f}")
    lines.append(f"  side by side: {side_by_side(steps)}")
    return "\n".join(lines)
