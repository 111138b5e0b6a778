"""`preprocessing_fn` for TF Transform: every mapping the model needs, saved in its serving graph.

Vocabularies, means and variances are computed by TFT analyzers over the training split and frozen
into the transform graph, which the exported model applies to raw examples at serving time, so
training and serving cannot skew. 'Unknown' codes (e.g. 99 for father_age) are missing values here
(`is_missing`), as they are to the serving contract's check and to training's masking of inputs.
"""

import math
from typing import Any, Dict, Tuple

import tensorflow as tf
import tensorflow_transform as tft

from models import features
from models.features import Column, Transform


def dense_raw(value: tf.Tensor) -> tf.Tensor:
    """A raw feature as one value per row: text ("" where none) or float32 (NaN where none).

    Takes the sparse tensor parsed from tf.Examples (a row may have no value) or a dense one.
    """
    if isinstance(value, tf.sparse.SparseTensor):
        if value.dtype != tf.string:
            value = tf.sparse.map_values(tf.cast, value, tf.float32)
        return _one_per_row(value, "" if value.dtype == tf.string else float("nan"))
    if value.dtype != tf.string:
        value = tf.cast(value, tf.float32)
    return tf.reshape(value, [-1])


def _one_per_row(value: tf.sparse.SparseTensor, default: Any) -> tf.Tensor:
    """A sparse feature's value in each row, `default` where a row has none (the schema allows one value a row)."""
    return tf.reshape(
        tf.sparse.to_dense(tf.sparse.SparseTensor(value.indices, value.values, [value.dense_shape[0], 1]), default),
        [-1],
    )


def is_missing(column: Column, value: tf.Tensor) -> tf.Tensor:
    """The one definition of a missing value: none ("" or NaN in `dense_raw`'s form), or an 'unknown' code."""
    if value.dtype == tf.string:
        return tf.equal(value, "")
    missing = tf.math.is_nan(value)
    for code in column.missing_codes:
        missing = missing | tf.equal(value, code)
    return missing


def training_ranges(inputs: Dict[str, tf.Tensor]) -> Dict[str, Tuple[tf.Tensor, tf.Tensor]]:
    """Each numeric feature's smallest and largest known value in the training data (two analyzers for all)."""
    columns = features.numeric_features()
    values = [dense_raw(inputs[c.name]) for c in columns]
    missing = [is_missing(c, v) for c, v in zip(columns, values)]
    lows = tft.min(
        tf.stack([tf.where(m, math.inf, v) for m, v in zip(missing, values)], axis=1), reduce_instance_dims=False
    )
    highs = tft.max(
        tf.stack([tf.where(m, -math.inf, v) for m, v in zip(missing, values)], axis=1), reduce_instance_dims=False
    )
    return {c.name: (lows[i], highs[i]) for i, c in enumerate(columns)}


def _numeric(column: Column, value: tf.Tensor, value_range: Tuple[tf.Tensor, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Imputed z-score and missing indicator (plus bucket id) of a numeric feature."""
    x = dense_raw(value)
    missing = is_missing(column, x)
    known = tf.boolean_mask(x, ~missing)
    mean = tft.mean(known)
    std = tf.sqrt(tft.var(known))
    # A value beyond the training data's range (98 earlier births, 98 weeks: the schema allows up to the
    # 'unknown' code 99) is taken as the range's end: the model has learnt nothing out there, and a linear
    # extrapolation answered 64 lb (the infra validator's edge cases found it).
    x = tf.clip_by_value(x, *value_range)
    imputed = tf.where(missing, mean, x)
    outputs = {
        features.transformed_name(column.name): (imputed - mean) / tf.maximum(std, 1e-6),
        features.missing_key(column): tf.cast(missing, tf.float32),
    }
    if column.transform is Transform.ZSCORE_AND_BUCKETS:
        buckets = tf.raw_ops.Bucketize(input=tf.where(missing, 0.0, x), boundaries=list(column.bucket_boundaries))
        outputs[features.transformed_name(features.bucket_name(column))] = tf.where(
            missing, tf.constant(len(column.bucket_boundaries) + 1, tf.int64), tf.cast(buckets, tf.int64)
        )
    return outputs


def _category_ids(column: Column, value: tf.Tensor) -> tf.Tensor:
    """Position of an integer code in column.categories; unknown or missing codes share the last id."""
    x = dense_raw(value)
    matches = tf.equal(tf.expand_dims(x, 1), tf.constant(column.categories, tf.float32))
    # ArgMax of float32, not of int64: TensorFlow Lite's builtin ArgMax takes no int64 input.
    return tf.where(
        tf.reduce_any(matches, axis=1),
        tf.argmax(tf.cast(matches, tf.float32), axis=1),
        tf.constant(len(column.categories), tf.int64),
    )


def _vocabulary_ids(value: tf.Tensor) -> tf.Tensor:
    """Position of a text value among the training data's VOCABULARY_SIZE most frequent values; a missing value
    ("" included, as `is_missing` says) and one never seen share the id VOCABULARY_SIZE.

    The values are compared with the vocabulary as a constant of the graph, not looked up in a table read from
    a file, and only the values present are compared: TensorFlow Lite's builtin ops have no text made dense
    (SparseToDense of strings) nor hashed out-of-vocabulary buckets, its tables need an initialisation the
    converter doesn't carry over from a SavedModel, and the TFLite model runs on builtin ops alone (models/lite.py).
    """
    if not isinstance(value, tf.sparse.SparseTensor):
        value = tf.sparse.from_dense(tf.reshape(value, [-1, 1]))
    value = tf.sparse.retain(value, tf.not_equal(value.values, ""))  # a tf.Example may hold "" as a value
    # One pass over the data, with the means and variances: the values and their counts, as tensors.
    # Ties go to the value first in byte order (TFT returns the keys sorted; the sort by count is stable).
    keys, counts = tft.count_per_key(value)
    vocabulary = tf.gather(keys, tf.argsort(-counts, stable=True))[: features.VOCABULARY_SIZE]
    matches = tf.cast(tf.equal(tf.expand_dims(value.values, 1), tf.expand_dims(vocabulary, 0)), tf.float32)
    # The position of the one match, as a sum: an ArgMax would fail on an empty vocabulary (no value in training).
    positions = tf.cast(tf.range(tf.size(vocabulary)), tf.float32)
    ids = tf.where(
        tf.reduce_any(matches > 0, axis=1),
        tf.cast(tf.reduce_sum(matches * positions, axis=1), tf.int64),
        tf.constant(features.VOCABULARY_SIZE, tf.int64),
    )
    return _one_per_row(
        tf.sparse.SparseTensor(value.indices, ids, value.dense_shape), tf.constant(features.VOCABULARY_SIZE, tf.int64)
    )


def crosses(outputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """The crossed ids (features.CROSSES) of transformed features: the transform's, and training's masking's."""
    sizes = features.id_sizes()
    return {
        features.transformed_name(features.cross_name(first, second)): outputs[features.transformed_name(first)]
        * sizes[second]
        + outputs[features.transformed_name(second)]
        for first, second in features.CROSSES
    }


def preprocessing_fn(inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Maps raw natality features to the model's inputs, and the label to a label plus a weight."""
    outputs: Dict[str, tf.Tensor] = {}
    ranges = training_ranges(inputs)
    for column in features.FEATURES:
        value = inputs[column.name]
        if column.transform is Transform.VOCABULARY:
            outputs[features.transformed_name(column.name)] = _vocabulary_ids(value)
        elif column.transform is Transform.CATEGORY:
            outputs[features.transformed_name(column.name)] = _category_ids(column, value)
        else:
            outputs.update(_numeric(column, value, ranges[column.name]))
    outputs.update(crosses(outputs))
    if features.LABEL.name in inputs:  # absent at serving time
        label = dense_raw(inputs[features.LABEL.name])
        present = ~tf.math.is_nan(label)
        outputs[features.label_key()] = tf.where(present, label, 0.0)
        outputs[features.label_weight_key()] = tf.cast(present, tf.float32)
    return outputs
