"""What a run did, read back from ML Metadata and the artifacts it recorded."""
import dataclasses
import math
import pathlib
from typing import Dict, List, Optional, Tuple

import tensorflow_data_validation as tfdv
import tensorflow_model_analysis as tfma
from ml_metadata import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tensorflow_metadata.proto.v0 import statistics_pb2
from tfx import v1 as tfx
from tfx.types import artifact, artifact_utils, standard_artifacts

from models import features
from pipeline.anomalies_gate import describe_anomalies
from pipeline.config import PipelineConfig

STATES = {value: name.lower() for name, value in metadata_store_pb2.Execution.State.items()}
OUTPUT_EVENTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)


@dataclasses.dataclass
class StepRecord:
    """One component's execution in a run."""

    node_id: str
    state: str  # complete, cached, failed, running, ...
    seconds: float
    outputs: Dict[str, List[metadata_store_pb2.Artifact]]


def connect(metadata_path: str) -> metadata_store.MetadataStore:
    """Opens the local SQLite ML Metadata store, failing if it does not exist."""
    if not pathlib.Path(metadata_path).is_file():
        raise FileNotFoundError(f"no ML Metadata store at {metadata_path}")
    return metadata_store.MetadataStore(tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path))


def run_ids(store: metadata_store.MetadataStore) -> List[str]:
    """Ids of the pipeline runs in the store, oldest first."""
    runs = store.get_contexts_by_type("pipeline_run")
    return [run.name for run in sorted(runs, key=lambda run: (run.create_time_since_epoch, run.id))]


def run_steps(store: metadata_store.MetadataStore, run_id: str) -> List[StepRecord]:
    """The executions of one run, in the order they started, with their output artifacts."""
    run = store.get_context_by_type_and_name("pipeline_run", run_id)
    executions = sorted(store.get_executions_by_context(run.id), key=lambda e: (e.create_time_since_epoch, e.id))
    steps = []
    for execution in executions:
        node = next((c.name for c in store.get_contexts_by_execution(execution.id)
                     if store.get_context_types_by_id([c.type_id])[0].name == "node"), execution.name)
        outputs: Dict[str, List[metadata_store_pb2.Artifact]] = {}
        events = [e for e in store.get_events_by_execution_ids([execution.id]) if e.type in OUTPUT_EVENTS]
        artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
        for event in events:
            key = next((step.key for step in event.path.steps if step.HasField("key")), "")
            outputs.setdefault(key, []).append(artifacts[event.artifact_id])
        steps.append(StepRecord(
            node_id=node.split(".", 1)[-1],
            state=STATES.get(execution.last_known_state, "unknown"),
            seconds=(execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0,
            outputs=outputs))
    return steps


def _output(steps: List[StepRecord], node_id: str, key: str) -> Optional[metadata_store_pb2.Artifact]:
    for step in steps:
        if step.node_id == node_id and step.outputs.get(key):
            return step.outputs[key][-1]
    return None


def _split_stats(statistics: metadata_store_pb2.Artifact) -> Dict[str, statistics_pb2.DatasetFeatureStatistics]:
    """The statistics of each split of a StatisticsGen output."""
    result = {}
    for split in artifact_utils.decode_split_names(statistics.properties["split_names"].string_value):
        path = f"{artifact_utils.get_split_uri([_artifact_as_tfx(statistics, standard_artifacts.ExampleStatistics)], split)}/FeatureStats.pb"
        result[split] = tfdv.load_stats_binary(path).datasets[0]
    return result


def _label_mean_std(dataset: statistics_pb2.DatasetFeatureStatistics) -> Tuple[float, float]:
    for feature in dataset.features:
        if feature.path.step and feature.path.step[0] == features.LABEL.name:
            return feature.num_stats.mean, feature.num_stats.std_dev
    raise KeyError(f"no statistics for {features.LABEL.name}")


def mean_predictor_rmse(split_stats: Dict[str, statistics_pb2.DatasetFeatureStatistics]) -> float:
    """Eval RMSE of always predicting the training mean, from the statistics of both splits."""
    train_mean, _ = _label_mean_std(split_stats["train"])
    eval_mean, eval_std = _label_mean_std(split_stats["eval"])
    return math.sqrt(eval_std ** 2 + (eval_mean - train_mean) ** 2)


def _artifact_as_tfx(artifact: metadata_store_pb2.Artifact, artifact_class: type) -> artifact.Artifact:
    wrapped = artifact_class()
    wrapped.set_mlmd_artifact(artifact)
    return wrapped


def _evaluation_lines(evaluation: metadata_store_pb2.Artifact, blessing: Optional[metadata_store_pb2.Artifact],
                      baseline_rmse: float) -> List[str]:
    result = tfma.load_eval_result(evaluation.uri)
    lines = []
    for slice_key, metrics in sorted(result.slicing_metrics, key=lambda item: str(item[0])):
        values = metrics[""][""]
        rmse = values.get("root_mean_squared_error", {}).get("doubleValue", float("nan"))
        mae = values.get("mean_absolute_error", {}).get("doubleValue", float("nan"))
        count = values.get("weighted_example_count", {}).get("doubleValue", 0)
        name = "overall" if not slice_key else ", ".join(f"{k}={v}" for k, v in slice_key)
        if not slice_key:
            lines.insert(0, f"  eval RMSE {rmse:.3f} lb, MAE {mae:.3f} lb "
                            f"(predicting the training mean: RMSE {baseline_rmse:.3f} lb)")
        else:
            lines.append(f"    {name:<32} RMSE {rmse:6.3f}  MAE {mae:6.3f}  n={count:.0f}")
    lines.insert(1, "  per slice:")
    validation = tfma.load_validation_result(evaluation.uri)
    if blessing is not None:
        blessed = blessing.custom_properties["blessed"].int_value == 1
        lines.append(f"  blessed: {'yes' if blessed else 'no'}")
    failures = [f"{failure.metric_key.name} {failure.metric_value.double_value:.3f}: {failure.message}"
                for per_slice in validation.metric_validations_per_slice for failure in per_slice.failures]
    lines.extend(f"    why not: {failure}" for failure in failures)
    if not validation.validation_ok and not failures:
        lines.extend(f"    why not: {d}" for d in validation.validation_details.ListFields())
    return lines


def summarize_latest_run(config: PipelineConfig) -> str:
    """A short human summary of the latest run: rows, anomalies, RMSE, blessing, push, seconds per step."""
    store = connect(config.metadata_path)
    ids = run_ids(store)
    if not ids:
        return "no pipeline run recorded yet"
    run_id = ids[-1]
    steps = run_steps(store, run_id)
    lines = [f"Run {run_id} of pipeline {config.pipeline_name}"]

    statistics = _output(steps, "StatisticsGen", "statistics")
    split_stats = _split_stats(statistics) if statistics else {}
    if split_stats:
        lines.append("  rows: " + ", ".join(f"{split} {stats.num_examples}" for split, stats in split_stats.items()))

    anomalies = _output(steps, "ExampleValidator", "anomalies")
    if anomalies:
        found = describe_anomalies(_artifact_as_tfx(anomalies, standard_artifacts.ExampleAnomalies))
        lines.append(f"  anomalies: {len(found) or 'none'}")
        lines.extend(f"    {line}" for line in found)

    evaluation = _output(steps, "Evaluator", "evaluation")
    if evaluation and split_stats:
        lines.extend(_evaluation_lines(evaluation, _output(steps, "Evaluator", "blessing"),
                                       mean_predictor_rmse(split_stats)))

    pushed = _output(steps, "Pusher", "pushed_model")
    if pushed is not None and pushed.custom_properties["pushed"].int_value == 1:
        lines.append(f"  pushed: {pushed.custom_properties['pushed_destination'].string_value}")
    elif pushed is not None:
        lines.append("  pushed: no (the model was not blessed)")

    lines.append("  seconds per component:")
    lines.extend(f"    {step.node_id:<32} {step.state:<9} {step.seconds:6.1f}" for step in steps)
    lines.append(f"    {'total':<32} {'':<9} {sum(step.seconds for step in steps):6.1f}")
    return "\n".join(lines)
