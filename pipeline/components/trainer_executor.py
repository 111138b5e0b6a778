"""The local Trainer's and Tuner's executors: TFX's own, plus the span of each file they train and evaluate on."""

from typing import Any, Dict, List

from absl import logging
from keras_tuner.src.engine import base_tuner
from keras_tuner.src.engine import trial as trial_module
from tfx import types
from tfx.components.trainer import executor as trainer_executor
from tfx.components.trainer import fn_args_utils
from tfx.components.tuner import component as tuner_component
from tfx.components.tuner import executor as tuner_executor
from tfx.components.util import udf_utils
from tfx.dsl.components.base import executor_spec
from tfx.types import artifact_utils
from tfx.utils import io_utils

from models.model import FILE_SPANS_KEY
from pipeline.artifacts import span_of


def with_file_spans(fn_args: fn_args_utils.FnArgs, input_dict: Dict[str, List[types.Artifact]]) -> fn_args_utils.FnArgs:
    """`fn_args` with the span of each training and eval file pattern added to its custom_config."""
    file_spans = {}
    for artifact in input_dict["examples"]:
        for split in artifact_utils.decode_split_names(artifact.split_names):
            pattern = io_utils.all_files_pattern(artifact_utils.get_split_uri([artifact], split))
            file_spans[pattern] = span_of(artifact.mlmd_artifact)
    fn_args.custom_config = dict(fn_args.custom_config or {}, **{FILE_SPANS_KEY: file_spans})
    return fn_args


def check_completed(tuner: base_tuner.BaseTuner) -> None:
    """Raises unless a trial completed: KerasTuner would otherwise offer a failed trial's values as the best."""
    trials = list(tuner.oracle.trials.values())
    if any(t.status == trial_module.TrialStatus.COMPLETED for t in trials):
        return
    reasons = sorted({lines[-1] for lines in ((t.message or "").strip().splitlines() for t in trials) if lines})
    raise RuntimeError(
        f"none of the Tuner's {len(trials)} trial(s) completed: " + ("; ".join(reasons) or "no trial ran")
    )


class SpanAwareTrainerExecutor(trainer_executor.GenericExecutor):
    """TFX's Trainer executor, plus the span of each training and eval file pattern in custom_config."""

    def _GetFnArgs(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ):
        return with_file_spans(super()._GetFnArgs(input_dict, output_dict, exec_properties), input_dict)


class SpanAwareTunerExecutor(tuner_executor.Executor):
    """TFX's Tuner executor (its search loop and its two outputs), plus the file spans in custom_config."""

    def Do(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ) -> None:
        fn_args = with_file_spans(
            fn_args_utils.get_common_fn_args(input_dict, exec_properties, self._get_tmp_dir()), input_dict
        )
        result = udf_utils.get_fn(exec_properties, "tuner_fn")(fn_args)
        tuner = result.tuner
        tuner.search(**result.fit_kwargs)
        check_completed(tuner)
        logging.info("best hyperparameters: %s", tuner.get_best_hyperparameters()[0].values)
        tuner_executor.write_best_hyperparameters(tuner, output_dict)


class SpanAwareTuner(tuner_component.Tuner):
    """TFX's Tuner component run by SpanAwareTunerExecutor (as TFX's Vertex Tuner swaps in its own executor)."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(SpanAwareTunerExecutor)
