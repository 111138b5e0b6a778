"""Output monitoring: the model's predictions on the newest span, compared with the previous run's.

TFMA's change thresholds compare a candidate with the baseline model on the same data; they don't say
whether the predictions the model will serve have moved since the previous run. PredictionMonitor
predicts the new span's eval split with the trained model (its serving signature, as a client would),
records the distribution (mean, spread, quantiles), the residuals (label - prediction) per slice of the
inputs with their spread, and predicted against actual weights on a grid (the report plots both), and
compares the distribution with the previous run's record.
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow as tf
from ml_metadata import metadata_store
from tfx import types
from tfx import v1 as tfx
from tfx.utils import io_utils, path_utils

from models import features
from models.signatures import SCORE_SIGNATURE, TRANSFORM_SIGNATURE
from pipeline.components.baseline import read_examples, split_files
from pipeline.reports import slices

MONITOR_FILE = "prediction_statistics.json"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SPLIT = "eval"
BATCH = 1024
GRID_CELL_POUNDS = 0.25  # a cell of the predicted-against-actual grid is a quarter pound either way


class PredictionStatistics(types.Artifact):
    """The distribution of a model's predictions on one span, and its residuals per slice (JSON)."""

    TYPE_NAME = "babyweight.PredictionStatistics"  # namespace.Name, as Vertex Pipelines requires


class PreviousPredictions(tfx.dsl.experimental.ResolverStrategy):
    """The latest PredictionStatistics in the pipeline, or nothing on a first run.

    TFX's LatestArtifactStrategy would fail the resolver step when there is none yet.
    """

    def resolve_artifacts(
        self, store: metadata_store.MetadataStore, input_dict: Dict[str, List[types.Artifact]]
    ) -> Dict[str, List[types.Artifact]]:
        return {key: sorted(artifacts, key=lambda a: a.id)[-1:] for key, artifacts in input_dict.items()}


def describe(predictions: np.ndarray, labels: np.ndarray, slice_values: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Distribution of the predictions, residuals overall and per slice (pipeline/reports/slices.py names them), and the
    labelled rows' predicted against actual weights as counts on a grid of GRID_CELL_POUNDS cells."""
    labelled = ~np.isnan(labels)
    residuals = labels - predictions

    def residual_stats(mask: np.ndarray) -> Dict[str, Any]:
        chosen = mask & labelled
        if not chosen.any():
            return {"n": 0}
        return {
            "n": int(chosen.sum()),
            "mean_residual": float(residuals[chosen].mean()),
            "rmse": float(np.sqrt((residuals[chosen] ** 2).mean())),
            "sd": float(residuals[chosen].std()),
            "quantiles": {f"{q:g}": float(np.quantile(residuals[chosen], q)) for q in QUANTILES},
            "mean_prediction": float(predictions[chosen].mean()),
        }

    by_slice = {(): residual_stats(np.ones(len(predictions), bool))}
    by_slice.update(
        {
            ((feature, value),): residual_stats(values == value)
            for feature, values in slice_values.items()
            for value in set(values)
        }
    )
    return {
        "n": int(len(predictions)),
        "mean": float(predictions.mean()),
        "std": float(predictions.std()),
        "quantiles": {f"{q:g}": float(np.quantile(predictions, q)) for q in QUANTILES},
        "residuals": dict(slices.ordered(by_slice)),
        "predicted_vs_actual": _grid(labels[labelled], predictions[labelled]),
    }


def _grid(actual: np.ndarray, predicted: np.ndarray) -> Dict[str, Any]:
    """Counts of (actual, predicted) pairs on a square grid of GRID_CELL_POUNDS cells over the labels' whole pounds
    (predictions beyond them counted in the edge cells), as [actual cell, predicted cell, count] for the cells that
    hold any: a few kB, and bounded by the labels' range however wrong a candidate model is."""
    if not len(actual):
        return {"low": 0.0, "high": 0.0, "bins": 0, "cells": []}
    low = float(np.floor(actual.min()))
    high = max(float(np.ceil(actual.max())), low + 1)
    bins = int(round((high - low) / GRID_CELL_POUNDS))
    counts, _, _ = np.histogram2d(actual, np.clip(predicted, low, high), bins=bins, range=[[low, high], [low, high]])
    cells = [[int(i), int(j), int(counts[i, j])] for i, j in zip(*np.nonzero(counts))]
    return {"low": low, "high": high, "bins": bins, "cells": cells}


def compare(current: Dict[str, Any], previous: Optional[Dict[str, Any]], threshold: float) -> Dict[str, Any]:
    """Change of mean and quantiles since the previous run's predictions; shifted if the mean moved > threshold."""
    if previous is None:
        return {"previous": None, "shifted": False}
    deltas = {q: current["quantiles"][q] - previous["quantiles"][q] for q in current["quantiles"]}
    mean_change = current["mean"] - previous["mean"]
    return {
        "previous": {"span": previous.get("span"), "mean": previous["mean"]},
        "mean_change": mean_change,
        "quantile_changes": deltas,
        "shifted": abs(mean_change) > threshold,
        "threshold": threshold,
    }


def read(uri: str) -> Dict[str, Any]:
    return json.loads(io_utils.read_string_file(os.path.join(uri, MONITOR_FILE)))


def _predict(model_uri: str, files: List[str]) -> tuple:
    """Predictions, labels and slice values of the rows in `files`: bucket ids from the model's own transform, as
    TFMA slices on them (the transform clips a value to the training range before bucketing it)."""
    model = tf.saved_model.load(path_utils.serving_model_path(model_uri))
    serve, transform = model.signatures[SCORE_SIGNATURE], model.signatures[TRANSFORM_SIGNATURE]
    predictions, bucket_ids = [], {name: [] for name in slices.BUCKETED}
    for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(BATCH):
        predictions.append(serve(examples=batch)["predictions"].numpy().ravel())
        transformed = transform(examples=batch)
        for name, ids in bucket_ids.items():
            ids.append(transformed[name].numpy().ravel())
    rows = read_examples(files)
    return (
        np.concatenate(predictions),
        rows[features.LABEL.name].to_numpy(),
        slices.values_by_slice(rows, {name: np.concatenate(ids) for name, ids in bucket_ids.items()}),
    )


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
        logging.warning(
            "predictions moved: mean %.3f lb, %+.3f lb since the previous run (threshold %.2f)",
            record["mean"],
            record["change"]["mean_change"],
            shift_threshold,
        )
