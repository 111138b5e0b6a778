"""Output monitoring: the model's predictions on the newest span, compared with the previous run's.

TFMA's change thresholds compare a candidate with the baseline model on the same data; they don't say
whether the predictions the model will serve have moved since the previous run. PredictionMonitor
predicts the new span's eval split with the trained model (its serving signature, as a client would),
records the distribution (mean, spread, quantiles) and the residuals (label - prediction) per slice of
the inputs, and compares the distribution with the previous run's record.
"""
import json
import logging
import os
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import tensorflow as tf
from ml_metadata import metadata_store
from tfx import types
from tfx import v1 as tfx
from tfx.utils import io_utils, path_utils

from models import features
from models.model import SCORE_SIGNATURE
from pipeline.baseline import read_examples, split_files

MONITOR_FILE = "prediction_statistics.json"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SPLIT = "eval"
BATCH = 1024


class PredictionStatistics(types.Artifact):
    """The distribution of a model's predictions on one span, and its residuals per slice (JSON)."""

    TYPE_NAME = "babyweight.PredictionStatistics"  # namespace.Name, as Vertex Pipelines requires


class PreviousPredictions(tfx.dsl.experimental.ResolverStrategy):
    """The latest PredictionStatistics in the pipeline, or nothing on a first run.

    TFX's LatestArtifactStrategy would fail the resolver step when there is none yet.
    """

    def resolve_artifacts(self, store: metadata_store.MetadataStore,
                          input_dict: Dict[str, List[types.Artifact]]) -> Dict[str, List[types.Artifact]]:
        return {key: sorted(artifacts, key=lambda a: a.id)[-1:] for key, artifacts in input_dict.items()}


def _slice_values(rows: pd.DataFrame) -> Dict[str, np.ndarray]:
    """Each slice feature's value per example as text; a numeric feature with buckets by its bucket."""
    result = {}
    for column in features.FEATURES:
        if column.name not in features.SLICE_FEATURES and not column.bucket_boundaries:
            continue
        values = rows[column.name].to_numpy()
        if column.bucket_boundaries:
            known = ~np.isnan(values) & ~np.isin(values, column.missing_codes)
            edges = (-np.inf,) + tuple(column.bucket_boundaries) + (np.inf,)
            labels = np.array([f"[{lo:g}, {hi:g})" for lo, hi in zip(edges, edges[1:])])
            buckets = np.digitize(np.nan_to_num(values), column.bucket_boundaries)
            result[column.name] = np.where(known, labels[buckets], "missing")
        else:
            result[column.name] = np.array([v if isinstance(v, str) else ("" if np.isnan(v) else f"{v:g}")
                                            for v in values])
    return result


def describe(predictions: np.ndarray, labels: np.ndarray, slices: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Distribution of the predictions and residuals overall and per slice value."""
    labelled = ~np.isnan(labels)
    residuals = labels - predictions

    def residual_stats(mask: np.ndarray) -> Dict[str, float]:
        chosen = mask & labelled
        if not chosen.any():
            return {"n": 0}
        return {"n": int(chosen.sum()), "mean_residual": float(residuals[chosen].mean()),
                "rmse": float(np.sqrt((residuals[chosen] ** 2).mean())),
                "mean_prediction": float(predictions[chosen].mean())}

    return {
        "n": int(len(predictions)),
        "mean": float(predictions.mean()),
        "std": float(predictions.std()),
        "quantiles": {f"{q:g}": float(np.quantile(predictions, q)) for q in QUANTILES},
        "residuals": {"overall": residual_stats(np.ones(len(predictions), bool)),
                      **{f"{name}={value}": residual_stats(values == value)
                         for name, values in slices.items() for value in sorted(set(values))}},
    }


def compare(current: Dict[str, Any], previous: Optional[Dict[str, Any]], threshold: float) -> Dict[str, Any]:
    """Change of mean and quantiles since the previous run's predictions; shifted if the mean moved > threshold."""
    if previous is None:
        return {"previous": None, "shifted": False}
    deltas = {q: current["quantiles"][q] - previous["quantiles"][q] for q in current["quantiles"]}
    mean_change = current["mean"] - previous["mean"]
    return {"previous": {"span": previous.get("span"), "mean": previous["mean"]}, "mean_change": mean_change,
            "quantile_changes": deltas, "shifted": abs(mean_change) > threshold, "threshold": threshold}


def read(uri: str) -> Dict[str, Any]:
    return json.loads(io_utils.read_string_file(os.path.join(uri, MONITOR_FILE)))


def _predict(model_uri: str, files: List[str]) -> tuple:
    model = tf.saved_model.load(path_utils.serving_model_path(model_uri))
    serve = model.signatures[SCORE_SIGNATURE]
    predictions = [serve(examples=batch)["predictions"].numpy().ravel()
                   for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(BATCH)]
    rows = read_examples(files)
    return np.concatenate(predictions), rows[features.LABEL.name].to_numpy(), _slice_values(rows)


@tfx.dsl.components.component
def PredictionMonitor(
    model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Model],
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    monitoring: tfx.dsl.components.OutputArtifact[PredictionStatistics],
    code_fingerprint: tfx.dsl.components.Parameter[str],  # pipeline/cache.py: reruns the step when its code changes
    previous: tfx.dsl.components.InputArtifact[PredictionStatistics] = None,
    shift_threshold: tfx.dsl.components.Parameter[float] = 0.25,
) -> None:
    """Predicts the eval split of `examples`, records the distribution and residuals, compares with `previous`."""
    from pipeline.artifacts import span_of

    predictions, labels, slices = _predict(model.uri, split_files(examples, SPLIT))
    record = describe(predictions, labels, slices)
    record["span"] = span_of(examples.mlmd_artifact)
    record["change"] = compare(record, read(previous.uri) if previous is not None else None, shift_threshold)
    io_utils.write_string_file(os.path.join(monitoring.uri, MONITOR_FILE), json.dumps(record, indent=1))
    monitoring.set_float_custom_property("mean_prediction", record["mean"])
    monitoring.set_int_custom_property("shifted", int(record["change"]["shifted"]))
    if record["change"]["shifted"]:
        logging.warning("predictions moved: mean %.3f lb, %+.3f lb since the previous run (threshold %.2f)",
                        record["mean"], record["change"]["mean_change"], shift_threshold)
