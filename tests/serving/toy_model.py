"""Small SavedModels with the pushed model's serving signatures, for testing the server without training.

Each predicts offset + 0.1 * mother_age + 0.05 * gestation_weeks (+ 0.5 for a boy), and refuses an instance
lacking a required feature as the real model does (InvalidArgumentError); the offset tells versions apart.
"""

import json
import pathlib
from typing import Optional, Tuple

import tensorflow as tf

from models import features

# The toy training data's most frequent instances (written beside each version as the Trainer does).
FREQUENT = [
    {"mother_age": 30, "gestation_weeks": 39, "is_male": "true"},
    {"mother_age": 28, "gestation_weeks": 40},
    {"mother_age": 33},
]  # the last lacks a required feature: a server must skip it, not fail


def _predict(columns, offset, nonsense_when=None):
    age, weeks = columns["mother_age"], columns["gestation_weeks"]
    missing = tf.math.is_nan(age) | tf.math.is_nan(weeks) | tf.equal(weeks, 99.0)
    check = tf.debugging.Assert(
        ~tf.reduce_any(missing), ["missing required feature in instance(s)", tf.where(missing)[:, 0]]
    )
    with tf.control_dependencies([check]):
        boy = tf.cast(tf.equal(columns["is_male"], "true"), tf.float32)
        predictions = offset + 0.1 * age + 0.05 * weeks + 0.5 * boy
        if nonsense_when:  # a broken model: NaN for a rare value (not in the head it is warmed up with)
            name, value = nonsense_when
            predictions = tf.where(tf.equal(columns[name], value), float("nan"), predictions)
        return {"predictions": tf.reshape(predictions, [-1, 1])}


def save(path: pathlib.Path, offset: float, nonsense_when: Optional[Tuple[str, float]] = None) -> pathlib.Path:
    """Writes a toy version to `path` (e.g. serving_model/3) and returns it; with `nonsense_when` (a numeric
    feature and a value) it answers NaN for instances with that value."""
    module = tf.Module()
    module.offset = tf.Variable(offset, dtype=tf.float32)
    specs = [
        tf.TensorSpec([None], tf.string if c.dtype == "string" else tf.float32, name=c.name) for c in features.FEATURES
    ]

    @tf.function(input_signature=specs)
    def serve_raw(*values):
        return _predict(dict(zip(features.FEATURE_NAMES, values)), module.offset, nonsense_when)

    parse_spec = {
        c.name: tf.io.FixedLenFeature(
            [],
            tf.string if c.dtype == "string" else tf.float32,
            default_value="" if c.dtype == "string" else float("nan"),
        )
        for c in features.FEATURES
    }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        return _predict(tf.io.parse_example(examples, parse_spec), module.offset, nonsense_when)

    tf.saved_model.save(module, str(path), signatures={"serving_raw": serve_raw, "serving_default": serve_examples})
    head = path / features.FREQUENT_INSTANCES_FILE
    head.parent.mkdir(parents=True, exist_ok=True)
    head.write_text(
        json.dumps(
            {
                "rows": len(FREQUENT),
                "instances": [
                    [len(FREQUENT) - rank, dict(zip(features.FEATURE_NAMES, features.instance_key(instance)))]
                    for rank, instance in enumerate(FREQUENT)
                ],
            }
        )
    )
    return path


def expected(instance: dict, offset: float) -> float:
    """What a toy version answers for one instance."""
    boy = 0.5 if instance.get("is_male") in (True, "true") else 0.0
    return offset + 0.1 * instance["mother_age"] + 0.05 * instance["gestation_weeks"] + boy
