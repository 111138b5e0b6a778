"""Local run of the pipeline: check the input, run it with LocalDagRunner, summarise from ML Metadata."""
import dataclasses
import logging
import pathlib

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import v1 as tfx

from pipeline import csv_check, summary
from pipeline.config import PipelineConfig
from pipeline.pipeline import SCHEMA_FILE, create_pipeline
from pipeline.validation import DataValidationError


@dataclasses.dataclass(frozen=True)
class Outcome:
    ok: bool
    summary: str


def load_schema(config: PipelineConfig) -> schema_pb2.Schema:
    """The curated schema that ImportSchemaGen brings into the pipeline."""
    return text_format.Parse((pathlib.Path(config.schema_dir) / SCHEMA_FILE).read_text(), schema_pb2.Schema())


def _failure_reason(error: BaseException) -> str:
    """Our own validation error if it is in the exception chain, else the root cause."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    validation = next((item for item in chain if isinstance(item, DataValidationError)), None)
    if validation is not None:
        return str(validation)
    return f"{type(chain[-1]).__name__}: {chain[-1]}"


def run_local(config: PipelineConfig) -> Outcome:
    """Runs the pipeline once; on bad input or a failed step, says why, and pushes nothing."""
    try:
        checked = csv_check.check_csv_files(pathlib.Path(config.data_dir), config.input_pattern, load_schema(config))
    except csv_check.InputDataError as error:
        return Outcome(False, f"Run stopped before the pipeline started: {error}")
    logging.info("input: %d rows in %d file(s) under %s", checked.rows, len(checked.files), config.data_dir)
    for note in checked.notes:
        logging.warning("input: %s", note)

    failure = None
    try:
        tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    except Exception as error:  # a failed component: report it, then summarise what did run
        logging.exception("pipeline run failed")
        failure = _failure_reason(error)
    text = summary.summarize_latest_run(config, checked)
    if failure:
        return Outcome(False, f"{text}\nRun FAILED: {failure}\nNo model was pushed by this run.")
    return Outcome(True, text)
