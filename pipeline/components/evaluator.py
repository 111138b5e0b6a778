"""The Evaluator's configuration: TFMA's EvalConfig, the one definition of its metrics, slices and thresholds.

TFX's own Evaluator runs it (pipeline/pipeline.py wires it); the thresholds come from the run's config
(`eval_rmse_threshold`, `eval_rmse_max_increase`, `eval_mae_threshold`), the slices from models/features.py, and
the error metrics are this project's (pipeline/components/tfma_metrics.py).
"""

import tensorflow_model_analysis as tfma
from google.protobuf.wrappers_pb2 import BoolValue

from models import features
from models.signatures import SCORE_SIGNATURE, TRANSFORM_SIGNATURE
from pipeline.cache import code_fingerprint
from pipeline.components import tfma_metrics
from pipeline.config import PipelineConfig


def eval_config(config: PipelineConfig) -> tfma.EvalConfig:
    """TFMA: RMSE and MAE overall and per slice, with the thresholds that gate the blessing."""
    lower_is_better = tfma.MetricDirection.LOWER_IS_BETTER
    module, metric_config = tfma_metrics.metric_config_args(code_fingerprint(tfma_metrics.__name__))

    def overall(**threshold) -> tfma.PerSliceMetricThreshold:
        # Thresholds gate on the whole eval split; slices (some of a few rows) are reported, not gated.
        return tfma.PerSliceMetricThreshold(
            slicing_specs=[tfma.SlicingSpec()], threshold=tfma.MetricThreshold(**threshold)
        )

    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                # Every row of the eval split is scored, also those a client's request would be refused for.
                signature_name=SCORE_SIGNATURE,
                preprocessing_function_names=[TRANSFORM_SIGNATURE],
                label_key=features.label_key(),
                example_weight_key=features.label_weight_key(),
            )
        ],
        slicing_specs=[tfma.SlicingSpec(feature_keys=keys) for keys in features.slice_keys()],
        # Only the metrics below: re-computing the Keras model's compiled loss and metrics would load
        # the model a second time, as Keras, for numbers the summary doesn't use.
        options=tfma.Options(include_default_metrics=BoolValue(value=False)),
        metrics_specs=[
            tfma.MetricsSpec(
                metrics=[
                    tfma.MetricConfig(class_name="ExampleCount"),
                    tfma.MetricConfig(class_name="WeightedExampleCount"),
                    tfma.MetricConfig(
                        class_name="WeightedRootMeanSquaredError",
                        module=module,
                        config=metric_config,
                        per_slice_thresholds=[
                            overall(
                                value_threshold=tfma.GenericValueThreshold(
                                    upper_bound={"value": config.eval_rmse_threshold}
                                ),
                                change_threshold=tfma.GenericChangeThreshold(
                                    direction=lower_is_better, absolute={"value": config.eval_rmse_max_increase}
                                ),
                            )
                        ],
                    ),
                    tfma.MetricConfig(
                        class_name="WeightedMeanAbsoluteError",
                        module=module,
                        config=metric_config,
                        per_slice_thresholds=[
                            overall(
                                value_threshold=tfma.GenericValueThreshold(
                                    upper_bound={"value": config.eval_mae_threshold}
                                )
                            )
                        ],
                    ),
                ]
            )
        ],
    )
