"""The local Trainer's executor: TFX's own, plus the span of each file it trains and evaluates on."""
from typing import Any, Dict, List

from tfx import types
from tfx.components.trainer import executor as trainer_executor
from tfx.types import artifact_utils
from tfx.utils import io_utils

from models.model import FILE_SPANS_KEY
from pipeline.artifacts import span_of


class SpanAwareTrainerExecutor(trainer_executor.GenericExecutor):
    """TFX's Trainer executor, plus the span of each training and eval file pattern in custom_config."""

    def _GetFnArgs(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
                   exec_properties: Dict[str, Any]):
        fn_args = super()._GetFnArgs(input_dict, output_dict, exec_properties)
        file_spans = {}
        for artifact in input_dict["examples"]:
            for split in artifact_utils.decode_split_names(artifact.split_names):
                pattern = io_utils.all_files_pattern(artifact_utils.get_split_uri([artifact], split))
                file_spans[pattern] = span_of(artifact.mlmd_artifact)
        fn_args.custom_config = dict(fn_args.custom_config or {}, **{FILE_SPANS_KEY: file_spans})
        return fn_args
