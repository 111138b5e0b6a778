"""Reference models computed beside the trained model in every run: gradient-boosted trees and the mean.

A model's eval RMSE means little alone. `TreeBaseline` fits scikit-learn's HistGradientBoostingRegressor
on the same training rows (the training window's train splits, with the Trainer's recency weights) and
the same model features as the Trainer, scores the same eval rows as the Evaluator (the new span's eval
split, rows with a label), and records both RMSEs with the row counts; the summary and the report print
them next to the model's. The trees are a yardstick, never served.
"""

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
from tfx import types
from tfx import v1 as tfx
from tfx.types import artifact_utils
from tfx.utils import io_utils

from models import features
from pipeline.artifacts import EVAL_SPLIT, TRAIN_SPLIT

BASELINE_FILE = "baseline.json"
PARSE_BATCH = 4096
# Rows read per split at most: a local run stays below it; the whole table on Vertex (about 110 million
# training rows) would not fit the pipeline container, and the first 2 million tell the trees' RMSE as well.
MAX_ROWS = 2_000_000


class BaselineMetrics(types.Artifact):
    """Eval RMSE of gradient-boosted trees and of the training mean, on the Evaluator's rows (JSON)."""

    TYPE_NAME = "babyweight.BaselineMetrics"  # namespace.Name, as Vertex Pipelines requires


def read_examples(
    files: Sequence[str], limit: Optional[int] = None, columns: Optional[Sequence[features.Column]] = None
) -> pd.DataFrame:
    """The model features and the label (or `columns`) of gzipped tf.Example files, one row per example (the first
    `limit`).

    Text features as str ('' where none), numbers as float (NaN where none), as `serving_raw` takes them.
    """
    import tensorflow as tf

    from models.preprocessing import dense_raw

    dtypes = {"string": tf.string, "int": tf.int64, "float": tf.float32}
    columns = list(columns or (*features.FEATURES, features.LABEL))
    spec = {c.name: tf.io.VarLenFeature(dtypes[c.dtype]) for c in columns}
    parts: Dict[str, List[np.ndarray]] = {c.name: [] for c in columns}
    records = tf.data.TFRecordDataset(list(files), compression_type="GZIP")
    for batch in (records.take(limit) if limit else records).batch(PARSE_BATCH):
        parsed = tf.io.parse_example(batch, spec)
        for column in columns:
            parts[column.name].append(dense_raw(parsed[column.name]).numpy())
    frame = pd.DataFrame({name: np.concatenate(values) if values else np.array([]) for name, values in parts.items()})
    for column in columns:
        if column.dtype == "string":
            frame[column.name] = frame[column.name].map(lambda v: v.decode() if isinstance(v, bytes) else v)
        else:
            frame[column.name] = frame[column.name].astype(float)
    return frame


def tree_inputs(frame: pd.DataFrame, columns: Sequence[features.Column] = features.FEATURES) -> np.ndarray:
    """The trees' input matrix: numbers as they are, flags as 1/0, NaN for missing values and 'unknown' codes."""
    matrix = []
    for column in columns:
        values = frame[column.name] if column.name in frame else pd.Series(np.nan, index=frame.index)
        if column.dtype == "string":
            text = values.fillna("").astype(str).str.lower()
            numbers = np.where(text == "true", 1.0, np.where(text == "false", 0.0, np.nan))
        else:
            numbers = pd.to_numeric(values.replace("", np.nan)).astype(float).to_numpy(copy=True)
            numbers[np.isin(numbers, column.missing_codes)] = np.nan
        matrix.append(numbers)
    return np.column_stack(matrix)


def fit_trees(
    frame: pd.DataFrame,
    sample_weight: Optional[np.ndarray] = None,
    columns: Sequence[features.Column] = features.FEATURES,
):
    """HistGradientBoostingRegressor with scikit-learn's defaults (seeded) on the labelled rows of `frame`."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    labelled = frame[features.LABEL.name].notna().to_numpy()
    weight = None if sample_weight is None else np.asarray(sample_weight)[labelled]
    trees = HistGradientBoostingRegressor(random_state=0)
    return trees.fit(tree_inputs(frame[labelled], columns), frame[features.LABEL.name][labelled], sample_weight=weight)


def rmse(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Root mean squared error over the rows that have a label."""
    labelled = ~np.isnan(labels)
    return float(np.sqrt(np.mean((np.asarray(predictions)[labelled] - labels[labelled]) ** 2)))


def read(uri: str) -> Dict:
    return json.loads(io_utils.read_string_file(os.path.join(uri, BASELINE_FILE)))


def split_files(examples: types.Artifact, split: str) -> List[str]:
    """The files of one split of an Examples artifact."""
    import tensorflow as tf

    return tf.io.gfile.glob(io_utils.all_files_pattern(artifact_utils.get_split_uri([examples], split)))


@tfx.dsl.components.component
def TreeBaseline(
    training_examples: tfx.dsl.components.InputArtifact[List[tfx.types.standard_artifacts.Examples]],
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    baseline: tfx.dsl.components.OutputArtifact[BaselineMetrics],
    code_fingerprint: tfx.dsl.components.Parameter[str],  # pipeline/cache.py: reruns the step when its code changes
    recency_half_life_spans: tfx.dsl.components.Parameter[float] = 0.0,
) -> None:
    """Fits trees on the train splits of `training_examples`; scores them and the mean on `examples`' eval split."""
    from models.model import recency_weights
    from pipeline.artifacts import span_of

    window = list(training_examples)
    spans = [span_of(a.mlmd_artifact) for a in window]
    weights = recency_weights(dict(enumerate(spans)), recency_half_life_spans)
    frames = [read_examples(split_files(artifact, TRAIN_SPLIT), MAX_ROWS // len(window)) for artifact in window]
    train = pd.concat(frames, ignore_index=True)
    sample_weight = np.concatenate([np.full(len(f), weights[i]) for i, f in enumerate(frames)])
    evaluation = read_examples(split_files(examples, EVAL_SPLIT), MAX_ROWS)
    labels = evaluation[features.LABEL.name].to_numpy()
    trees = fit_trees(train, sample_weight)
    labelled = train[features.LABEL.name].notna().to_numpy()
    train_mean = float(np.average(train[features.LABEL.name][labelled], weights=sample_weight[labelled]))
    record = {
        "train_rows": int(labelled.sum()),
        "eval_rows": int((~np.isnan(labels)).sum()),
        "trees_rmse": rmse(trees.predict(tree_inputs(evaluation)), labels),
        "mean_rmse": rmse(np.full(len(labels), train_mean), labels),
        "train_spans": spans,
        "eval_span": span_of(examples.mlmd_artifact),
    }
    io_utils.write_string_file(os.path.join(baseline.uri, BASELINE_FILE), json.dumps(record, indent=1))
    baseline.set_float_custom_property("trees_rmse", record["trees_rmse"])
    baseline.set_float_custom_property("mean_rmse", record["mean_rmse"])
    logging.info(
        "baseline on %d eval rows: trees RMSE %.3f, mean RMSE %.3f",
        record["eval_rows"],
        record["trees_rmse"],
        record["mean_rmse"],
    )
