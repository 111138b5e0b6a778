"""The exported model's signatures, and what the Trainer writes beside the model for the server.

The exported SavedModel carries the TF Transform graph, so every signature takes raw features:
- `serving_default`: serialized tf.Example (no label) -> {"predictions": pounds};
- `serving_raw`: one tensor per raw feature (NaN or "" = missing) -> {"predictions": pounds}, its inputs straight
  into the transform's mappings (`preprocessing.transform_dense`), not through the TF Transform graph the others
  apply; both refuse (InvalidArgumentError, naming the feature and rows) a call in which a row lacks a
  required feature (features.REQUIRED_FEATURES) and answer rows that lack optional ones;
- `score_examples`: serialized tf.Example -> {"predictions": pounds} for every row (evaluation, monitoring);
- `transform_features`: serialized tf.Example -> transformed features (TFMA slices and labels on it).
"""

import math
from typing import Any, Dict, List

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from models import features, lite, preprocessing
from models.preprocessing import dense_raw, is_missing

PREDICTIONS = lite.PREDICTIONS
# The signature that predicts every row of a split, required features or not (TFMA, monitoring).
SCORE_SIGNATURE = "score_examples"
# The signature that gives the transformed features of serialized examples (TFMA slices on it, so does monitoring).
TRANSFORM_SIGNATURE = "transform_features"
# How many of the training data's most frequent instances the Trainer writes beside the model
# (features.FREQUENT_INSTANCES_FILE); a server precomputes as many of them as its cache is configured for.
FREQUENT_INSTANCES_MAX = 50_000
TRANSFORM_BATCH = 1024
# Frequent instances are counted as one number each (their codes in mixed radix) while their codes fit below this.
ONE_NUMBER_MAX = 2**62


def sparse_raw(dense: Dict[str, tf.Tensor], raw_spec: Dict[str, Any]) -> Dict[str, tf.SparseTensor]:
    """Dense raw features ("" or NaN where a row has no value) as the sparse tensors the transform graph takes.

    The one way from a row's values to the TF Transform graph's input, used by training and its masking.
    """
    raw = {}
    for name, value in dense.items():
        present = tf.not_equal(value, "") if value.dtype == tf.string else ~tf.math.is_nan(value)
        indices = tf.where(present)
        raw[name] = tf.sparse.SparseTensor(
            tf.concat([indices, tf.zeros_like(indices)], axis=1),
            tf.cast(tf.boolean_mask(value, present), raw_spec[name].dtype),
            tf.stack([tf.shape(value, out_type=tf.int64)[0], tf.constant(1, tf.int64)]),
        )
    return raw


def raw_feature_spec(tf_transform_output: tft.TFTransformOutput, with_label: bool) -> Dict[str, Any]:
    spec = tf_transform_output.raw_feature_spec()
    if not with_label:
        spec.pop(features.LABEL.name)
    return spec


def require(missing: tf.Tensor) -> tf.Operation:
    """An Assert that fails a call whose rows lack a required feature (features.REQUIRED_FEATURES), naming the first
    such feature and its rows. `missing`: which rows lack each, [rows, REQUIRED_FEATURES].

    One Assert for them all, its message picked in the graph, its data text and int32 only: given other types,
    tf.debugging.Assert builds a conditional around itself (an AssertGuard).
    """
    lacking = tf.reduce_any(missing, axis=0)
    first = tf.argmax(tf.cast(lacking, tf.float32), output_type=tf.int32)
    messages = [
        f"missing required feature {column.name} (no value, or an unknown code) in instance(s)"
        for column in features.REQUIRED_FEATURES
    ]
    rows = tf.cast(tf.where(tf.gather(missing, first, axis=1))[:, 0], tf.int32)
    return tf.debugging.Assert(~tf.reduce_any(lacking), [tf.gather(messages, first), rows], summarize=20)


def _serve_raw(model: tf.keras.Model, analyzed: preprocessing.Analyzed, raw_inputs: List[tf.TensorSpec]) -> Any:
    """serving_raw: one dense tensor per raw feature into the transform's mappings (`preprocessing.transform_dense`,
    the analyzers' values constants), the required features checked, then the model, its weights constants too."""

    @tf.function(input_signature=raw_inputs, autograph=False)
    def lean(*values: tf.Tensor) -> tf.Tensor:
        transformed, missing = preprocessing.transform_dense(dict(zip(features.FEATURE_NAMES, values)), analyzed)
        with tf.control_dependencies([require(missing)]):
            return tf.identity(model(transformed))

    # The weights as constants (no variable reads; the embeddings' lookups plain gathers): a one-instance call took
    # 0.26 ms instead of 0.33 ms.
    frozen = convert_variables_to_constants_v2(lean.get_concrete_function())

    @tf.function(input_signature=raw_inputs, autograph=False)
    def serve_raw(*values: tf.Tensor) -> Dict[str, tf.Tensor]:
        (predictions,) = frozen(*values)  # a frozen function's outputs are a list
        return {PREDICTIONS: predictions}

    return serve_raw


def serving_signatures(model: tf.keras.Model, tf_transform_output: tft.TFTransformOutput) -> Dict[str, Any]:
    """The exported model's signatures, each applying the transform's mappings to raw features (the TF Transform
    graph; serving_raw the same mappings without it, `_serve_raw`).

    `serving_default` and `serving_raw` answer clients and refuse a call in which a row lacks a required
    feature; `score_examples` predicts every row, as evaluation and monitoring score whole splits.
    """
    model.tft_layer = tf_transform_output.transform_features_layer()
    label_keys = (features.label_key(), features.label_weight_key())

    def predict(raw_features: Dict[str, Any]) -> Dict[str, tf.Tensor]:
        transformed = model.tft_layer(raw_features)
        inputs = {key: value for key, value in transformed.items() if key not in label_keys}
        return {PREDICTIONS: model(inputs)}

    def predict_checked(raw_features: Dict[str, Any], missing: tf.Tensor) -> Dict[str, tf.Tensor]:
        with tf.control_dependencies([require(missing)]):
            return {key: tf.identity(value) for key, value in predict(raw_features).items()}

    raw_spec = raw_feature_spec(tf_transform_output, with_label=False)
    examples_spec = [tf.TensorSpec([None], tf.string, name="examples")]

    @tf.function(input_signature=examples_spec, autograph=False)
    def serve_examples(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, raw_spec)
        missing = [is_missing(c, dense_raw(parsed[c.name])) for c in features.REQUIRED_FEATURES]
        return predict_checked(parsed, tf.stack(missing, axis=1))

    @tf.function(input_signature=examples_spec, autograph=False)
    def score_examples(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
        return predict(tf.io.parse_example(serialized, raw_spec))

    raw_inputs = [
        tf.TensorSpec([None], tf.string if raw_spec[c.name].dtype == tf.string else tf.float32, name=c.name)
        for c in features.FEATURES
    ]

    @tf.function(input_signature=examples_spec, autograph=False)
    def transform_features(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
        return model.tft_layer(tf.io.parse_example(serialized, raw_feature_spec(tf_transform_output, True)))

    return {
        "serving_default": serve_examples,
        lite.SIGNATURE: _serve_raw(model, preprocessing.read_analyzed(tf_transform_output), raw_inputs),
        SCORE_SIGNATURE: score_examples,
        TRANSFORM_SIGNATURE: transform_features,
    }


def frequent_instances(
    file_patterns: List[str], tf_transform_output: tft.TFTransformOutput, limit: int = FREQUENT_INSTANCES_MAX
) -> Dict[str, Any]:
    """The most frequent instances of the raw training rows, with their counts: {"rows": N, "instances": [...]}.

    Each row counts twice: as it is, and as the smallest request the serving contract takes (its required
    features alone), the two shapes a client sends most. Rows lacking a required feature are not requests.
    Counted a column at a time (numpy), in the order `collections.Counter.most_common` gives: the most frequent
    first, ties in the order they first appear (each row's full instance before its smallest request).
    """
    raw_spec = raw_feature_spec(tf_transform_output, with_label=False)
    files = [name for pattern in file_patterns for name in sorted(tf.io.gfile.glob(pattern))]  # as `_records`
    dataset = (
        tf.data.TFRecordDataset(files, compression_type="GZIP")
        .batch(TRANSFORM_BATCH)
        .map(
            lambda records: {name: dense_raw(value) for name, value in tf.io.parse_example(records, raw_spec).items()},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
    batches = list(dataset.as_numpy_iterator())
    columns = {
        column.name: np.concatenate([batch[column.name] for batch in batches]) if batches else np.array([])
        for column in features.FEATURES
    }
    requests = np.ones(len(columns[features.FEATURES[0].name]), bool)
    for column in features.REQUIRED_FEATURES:  # features.missing_required, on each distinct value
        values, inverse = np.unique(columns[column.name], return_inverse=True)
        requests &= ~np.array([features.is_missing_value(column, value) for value in values.tolist()], bool)[inverse]
    # Each column's values as codes (numbers as float32, as features.instance_key reads them; "", NaN: None).
    codes, keys = [], []
    for column in features.FEATURES:
        values = columns[column.name][requests]
        if column.dtype == "string":
            distinct, inverse = np.unique(values, return_inverse=True)
            key_values = [value.decode() if value else None for value in distinct.tolist()]
        else:
            distinct, inverse = np.unique(values.astype(np.float32), return_inverse=True)  # NaNs: one, last
            key_values = [None if value != value else value for value in distinct.tolist()]
        none = len(key_values)  # one code for no value; the smallest request has none of the optional features
        full = np.array([none if value is None else code for code, value in enumerate(key_values)], np.int64)[inverse]
        smallest = full if column.required else np.full_like(full, none)
        codes.append(np.stack([full, smallest], axis=1).reshape(-1))  # row 1 full, row 1 smallest, row 2 ...
        keys.append(key_values + [None])
    rows = int(requests.sum())
    if not rows:
        return {"rows": 0, "instances": []}
    stacked = np.stack(codes, axis=1)
    # Each instance as one number (its codes' mixed-radix value) where they fit in an int64: sorting a million
    # numbers is about 40 times faster than sorting as many rows (np.unique's axis=0, 6 s at 800,000 rows).
    radices = [len(column_keys) for column_keys in keys]
    if math.prod(radices) < ONE_NUMBER_MAX:
        places = np.cumprod([1] + radices[:-1], dtype=np.int64)
        _, first, counts = np.unique(stacked @ places, return_index=True, return_counts=True)
        instances = stacked[first]
    else:
        instances, first, counts = np.unique(stacked, axis=0, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))[:limit]
    return {
        "rows": rows,
        "instances": [
            [
                int(counts[index]),
                {
                    column.name: keys[place][code]
                    for place, (column, code) in enumerate(zip(features.FEATURES, instances[index]))
                },
            ]
            for index in order
        ],
    }
