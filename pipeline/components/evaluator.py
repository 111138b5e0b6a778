"""The Evaluator: TFMA's EvalConfig, the one definition of its metrics, slices and thresholds, and the component.

The thresholds come from the run's config (`eval_rmse_threshold`, `eval_rmse_max_increase`, `eval_mae_threshold`),
the slices from models/features.py, and the error metrics are this project's
(pipeline/components/evaluation/tfma_metrics.py).
`Evaluator` is TFX's Evaluator (its inputs, outputs, ModelEvaluation and ModelBlessing), whose executor computes the
metrics with pipeline/components/evaluation/batched.py inside TFMA's own evaluation; `evaluator_engine: tfma` runs
TFX's Evaluator as shipped (pipeline/pipeline.py picks).
"""

import os
import threading
import time
from typing import Any, Dict, List, Optional

import tensorflow_model_analysis as tfma
from google.protobuf.wrappers_pb2 import BoolValue
from tfx.components.evaluator import component as tfx_evaluator
from tfx.components.evaluator import executor as tfx_executor
from tfx.dsl.components.base import executor_spec
from tfx.types import standard_artifacts
from tfx.utils import proto_utils

from models import features
from models.signatures import SCORE_SIGNATURE, TRANSFORM_SIGNATURE
from pipeline.cache import code_fingerprint
from pipeline.components.evaluation import batched as batched_evaluation
from pipeline.components.evaluation import tfma_metrics
from pipeline.config import PipelineConfig


def eval_config(config: PipelineConfig) -> tfma.EvalConfig:
    """TFMA: RMSE and MAE overall and per slice, with the thresholds that gate the blessing."""
    lower_is_better = tfma.MetricDirection.LOWER_IS_BETTER
    # The metrics' code and the batched evaluation's in the Evaluator's cache key: a change to either reruns it.
    module, metric_config = tfma_metrics.metric_config_args(
        code_fingerprint(tfma_metrics.__name__, batched_evaluation.__name__, __name__)
    )

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


class _BatchedTfma:
    """TFMA as TFX's Evaluator executor module sees it (installed once, below): TFMA itself, but for
    ExtractEvaluateAndWriteResults in a thread where BatchedExecutor runs, which gets the batched extractors and
    evaluators where they can compute the EvalConfig. A flag per thread, not a patch per run: TFX's own executor
    running in another thread at the same time (a runner running steps side by side) gets TFMA's evaluation."""

    def __init__(self) -> None:
        self.local = threading.local()  # .batched: BatchedExecutor runs in this thread; .engine: who computed

    def __getattr__(self, name: str) -> Any:
        return getattr(tfma, name)

    def ExtractEvaluateAndWriteResults(self, **arguments: Any) -> Any:  # noqa: N802 (TFMA's name)
        reason = (
            batched_evaluation.unsupported(
                arguments["eval_config"], arguments.get("extractors"), arguments.get("slice_spec")
            )
            if getattr(self.local, "batched", False)
            else "evaluator_engine: tfma"
        )
        self.local.engine = "tfma" if reason else "batched"
        if getattr(self.local, "batched", False):
            batched_evaluation.log_engine(reason)
        if reason is None:
            models = arguments["eval_shared_model"]
            models = models if isinstance(models, list) else [models]
            arguments["extractors"], arguments["evaluators"] = batched_evaluation.evaluators(
                arguments["eval_config"], models
            )
        return tfma.ExtractEvaluateAndWriteResults(**arguments)


_TFMA = _BatchedTfma()
if not isinstance(tfx_executor.tfma, _BatchedTfma):
    tfx_executor.tfma = _TFMA  # TFX's Evaluator executor reads TFMA through its module's global


class BatchedExecutor(tfx_executor.Executor):
    """TFX's Evaluator executor, unchanged but for the call that evaluates (see _BatchedTfma): the same checks of its
    inputs, the same TFMA outputs, the same blessing from TFMA's validation."""

    def Do(self, input_dict: Dict[str, List[Any]], output_dict: Dict[str, List[Any]], exec_properties: Dict) -> None:
        _TFMA.local.batched = True
        try:
            super().Do(input_dict, output_dict, exec_properties)
        finally:
            _TFMA.local.batched = False


class Evaluator(tfx_evaluator.Evaluator):
    """TFX's Evaluator with the batched metrics (its id stays "Evaluator")."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(BatchedExecutor)


ENGINES = {"batched": BatchedExecutor, "tfma": tfx_executor.Executor}


def evaluate(
    engine: str,
    examples_uri: str,
    model_uri: str,
    baseline_uri: Optional[str],
    config: tfma.EvalConfig,
    output_dir: str,
    beam_pipeline_args: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """One evaluation by TFX's Evaluator executor with `engine`'s metrics, outside a pipeline (the benchmark and the
    tests compare the engines so): its output folders, whether it blessed the model, and its seconds."""

    def artifact(kind, uri: str, **properties):
        made = kind()
        made.uri = uri
        for name, value in properties.items():
            setattr(made, name, value)
        return made

    inputs = {
        "examples": [artifact(standard_artifacts.Examples, examples_uri, split_names='["train", "eval"]')],
        "model": [artifact(standard_artifacts.Model, model_uri, id=1)],
    }
    if baseline_uri:
        inputs["baseline_model"] = [artifact(standard_artifacts.Model, baseline_uri, id=2)]
    outputs = {
        "evaluation": [artifact(standard_artifacts.ModelEvaluation, os.path.join(output_dir, "evaluation"))],
        "blessing": [artifact(standard_artifacts.ModelBlessing, os.path.join(output_dir, "blessing"))],
    }
    for made in outputs.values():
        os.makedirs(made[0].uri, exist_ok=True)
    executor = ENGINES[engine]
    context = executor.Context(beam_pipeline_args=beam_pipeline_args or [], tmp_dir=os.path.join(output_dir, "tmp"))
    started = time.monotonic()
    executor(context).Do(inputs, outputs, {"eval_config": proto_utils.proto_to_json(config), "example_splits": "null"})
    return {
        "evaluation": outputs["evaluation"][0].uri,
        "blessed": os.path.exists(os.path.join(outputs["blessing"][0].uri, "BLESSED")),
        "seconds": time.monotonic() - started,
        "computed_by": getattr(_TFMA.local, "engine", None),  # batched, or tfma (asked for, or as the fallback)
    }
