"""The Evaluator's MAE and RMSE (TFMA metrics of our own) give what TFMA's and Keras' metrics gave on one
partial result, and the right figure when partial results are merged, where TFMA 0.47's own do not."""

import math

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_model_analysis.metrics import mean_regression_error, metric_types

from pipeline.components.evaluation import tfma_metrics

RNG = np.random.default_rng(0)
LABELS, PREDICTIONS = RNG.normal(7.3, 1.2, 600), RNG.normal(7.3, 1.0, 600)
WEIGHTS = RNG.choice([0.0, 0.5, 1.0], 600)


def _inputs(rows):
    return [
        metric_types.StandardMetricInputs(
            labels=np.array([label]), predictions=np.array([prediction]), example_weights=np.array([weight])
        )
        for label, prediction, weight in rows
    ]


def _value(metric: metric_types.Metric, *parts) -> float:
    """The metric over the rows of `parts`, each part accumulated on its own and the parts merged, as Beam's
    worker processes (or Dataflow's workers) do."""
    (computation,) = metric.computations(example_weighted=True)
    combiner = computation.combiner
    accumulators = []
    for part in parts:
        accumulator = combiner.create_accumulator()
        for element in _inputs(part):
            accumulator = combiner.add_input(accumulator, element)
        accumulators.append(accumulator)
    ((key, value),) = combiner.extract_output(combiner.merge_accumulators(tuple(accumulators))).items()
    assert key.name == metric.name and key.example_weighted
    return value


ROWS = list(zip(LABELS, PREDICTIONS, WEIGHTS))
EXPECTED_MAE = np.sum(WEIGHTS * np.abs(LABELS - PREDICTIONS)) / np.sum(WEIGHTS)
EXPECTED_RMSE = math.sqrt(np.sum(WEIGHTS * (LABELS - PREDICTIONS) ** 2) / np.sum(WEIGHTS))


@pytest.mark.parametrize("parts", [[ROWS], [ROWS[:100], ROWS[100:]], [ROWS[:50], ROWS[50:400], ROWS[400:]]])
def test_the_formula_however_the_rows_are_split(parts):
    assert _value(tfma_metrics.WeightedMeanAbsoluteError(), *parts) == pytest.approx(EXPECTED_MAE, rel=1e-12)
    assert _value(tfma_metrics.WeightedRootMeanSquaredError(), *parts) == pytest.approx(EXPECTED_RMSE, rel=1e-12)


def test_tfma_own_and_keras_agree_on_one_partial_result_and_tfma_own_not_on_several():
    assert _value(tfma_metrics.WeightedMeanAbsoluteError(), ROWS) == pytest.approx(
        _value(mean_regression_error.MeanAbsoluteError(), ROWS), rel=1e-12
    )
    keras = tf.keras.metrics.RootMeanSquaredError()
    keras.update_state(LABELS, PREDICTIONS, sample_weight=WEIGHTS)
    assert _value(tfma_metrics.WeightedRootMeanSquaredError(), ROWS) == pytest.approx(float(keras.result()), rel=1e-6)
    # What this module fixes: TFMA 0.47 adds the first partial result to itself when it merges.
    split = _value(mean_regression_error.MeanAbsoluteError(), ROWS[:100], ROWS[100:])
    assert split != pytest.approx(EXPECTED_MAE, rel=1e-6)


def test_a_row_of_weight_zero_does_not_count():
    assert _value(tfma_metrics.WeightedRootMeanSquaredError(), [(7.0, 6.0, 1.0), (9.0, 1.0, 0.0)]) == pytest.approx(1.0)


def test_tfma_resolves_the_eval_config_to_these_metrics_with_their_code():
    """As the Evaluator does: TFMA turns the EvalConfig's metric configs into computations."""
    from tensorflow_model_analysis.metrics import metric_specs

    from pipeline import config as config_lib
    from pipeline.components import evaluator as evaluator_lib

    eval_config = evaluator_lib.eval_config(config_lib.load_config())
    combiners = {
        key.name: computation.combiner
        for computation in metric_specs.to_computations(eval_config.metrics_specs, eval_config)
        for key in computation.keys
    }
    for name in (tfma_metrics.MAE_NAME, tfma_metrics.RMSE_NAME):
        assert isinstance(combiners[name], tfma_metrics._WeightedErrorCombiner), name
    for metric in eval_config.metrics_specs[0].metrics:
        if metric.module == tfma_metrics.__name__:
            assert '"code_fingerprint"' in metric.config
