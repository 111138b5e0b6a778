"""The Evaluator's RMSE, TFMA's own kind of metric, gives what Keras' metric gave."""
import math

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_model_analysis.metrics import metric_types

from pipeline import tfma_metrics


def _rmse(labels, predictions, weights) -> float:
    """The metric's value as TFMA computes it: its combiner over the rows, then the derived square root."""
    mse, root = tfma_metrics.RootMeanSquaredError().computations(example_weighted=True)
    accumulator = mse.combiner.create_accumulator()
    for label, prediction, weight in zip(labels, predictions, weights):
        accumulator = mse.combiner.add_input(accumulator, metric_types.StandardMetricInputs(
            labels=np.array([label]), predictions=np.array([prediction]), example_weights=np.array([weight])))
    (key, value), = root.result(mse.combiner.extract_output(accumulator)).items()
    assert key.name == "root_mean_squared_error" and key.example_weighted
    return value


def test_weighted_rmse_matches_keras_and_the_formula():
    rng = np.random.default_rng(0)
    labels, predictions = rng.normal(7.3, 1.2, 500), rng.normal(7.3, 1.0, 500)
    weights = rng.choice([0.0, 0.5, 1.0], 500)
    expected = math.sqrt(np.sum(weights * (labels - predictions) ** 2) / np.sum(weights))
    keras = tf.keras.metrics.RootMeanSquaredError()
    keras.update_state(labels, predictions, sample_weight=weights)
    assert _rmse(labels, predictions, weights) == pytest.approx(expected, rel=1e-12)
    assert _rmse(labels, predictions, weights) == pytest.approx(float(keras.result()), rel=1e-6)


def test_a_row_of_weight_zero_does_not_count():
    assert _rmse([7.0, 9.0], [6.0, 1.0], [1.0, 0.0]) == pytest.approx(1.0)
