"""Root mean squared error as a TFMA metric of TFMA's own kind.

TFMA 0.47 has no RMSE of its own: `RootMeanSquaredError` in an EvalConfig resolves to Keras' metric, which TFMA
runs through TensorFlow for each batch of each slice. On 200,000 eval rows that was most of the Evaluator's
time. This metric is the square root of TFMA's own weighted mean squared error, under Keras' metric's name
(`root_mean_squared_error`), so its thresholds, the baseline's comparison and the reports read it as before.
"""
import math
from typing import Any, Dict, List, Optional

from tensorflow_model_analysis.metrics import mean_regression_error, metric_types, metric_util

NAME = "root_mean_squared_error"


class RootMeanSquaredError(metric_types.Metric):
    """sqrt(sum(weight * (label - prediction)^2) / sum(weight)), per slice."""

    def __init__(self, name: str = NAME):
        super().__init__(metric_util.merge_per_key_computations(_computations), name=name)


def _computations(name: str = NAME, eval_config: Any = None, model_name: str = "", output_name: str = "",
                  example_weighted: bool = False, sub_key: Optional[metric_types.SubKey] = None,
                  aggregation_type: Any = None, class_weights: Optional[Dict[int, float]] = None,
                  preprocessors: Optional[List[metric_types.Preprocessor]] = None) -> metric_types.MetricComputations:
    # A private name (leading underscore): TFMA computes it but doesn't report it.
    computations = mean_regression_error._mean_squared_error_computations(  # pylint: disable=protected-access
        name=f"_{name}_mse", eval_config=eval_config, model_name=model_name, output_name=output_name,
        example_weighted=example_weighted, sub_key=sub_key, aggregation_type=aggregation_type,
        class_weights=class_weights, preprocessors=preprocessors)
    mse_key = computations[0].keys[0]
    key = metric_types.MetricKey(name=name, model_name=model_name, output_name=output_name, sub_key=sub_key,
                                 example_weighted=example_weighted)

    def root(metrics: Dict[metric_types.MetricKey, Any]) -> Dict[metric_types.MetricKey, float]:
        return {key: math.sqrt(metrics[mse_key])}

    computations.append(metric_types.DerivedMetricComputation(keys=[key], result=root))
    return computations
