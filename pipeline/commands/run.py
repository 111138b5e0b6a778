"""Local run of the pipeline: check the input, run it (independent steps side by side: pipeline/runner.py), summarise
from ML Metadata."""

import contextlib
import dataclasses
import logging
import os
import pathlib
import sys
from typing import Callable, Dict, Iterator, List, Tuple

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import v1 as tfx

from models import features
from pipeline import runner
from pipeline.components import csv_check
from pipeline.components.validation import DataValidationError
from pipeline.config import PipelineConfig
from pipeline.metadata import mlmd
from pipeline.pipeline import AFTER_ALL, RUN_ALONE, create_pipeline
from pipeline.reports import history, report, summary


@dataclasses.dataclass(frozen=True)
class Outcome:
    ok: bool
    summary: str
    crash: str = ""  # why the run failed, when not because of its data (a block, or input the CSV check refused)
    recorded: bool = True  # whether ML Metadata has this run (not when the input was refused or it failed early)


# A record logged with extra={CONSOLE: False} goes to the log file only.
CONSOLE = "console"
# TFX's own line for any failed step; the run's summary says which step failed and why.
TFX_STEP_FAILED = "Execution %d failed."


def _console_worthy(record: logging.LogRecord) -> bool:
    """Errors, our own warnings and component progress; the libraries' chatter stays in the file."""
    if not getattr(record, CONSOLE, True) or record.msg == TFX_STEP_FAILED:
        return False
    own = record.name == "root" or record.name.split(".")[0] in ("pipeline", "models", "data")
    return (
        record.levelno >= logging.ERROR
        or (own and record.levelno >= logging.WARNING)
        or str(record.msg).startswith("Component ")
    )


def setup_logging(log_path: pathlib.Path, console: bool = True) -> None:
    """Everything at INFO to the log file; errors, our warnings and progress also to the console if asked."""
    import absl.logging

    log_path.parent.mkdir(parents=True, exist_ok=True)
    absl.logging.use_python_logging()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):  # libraries imported earlier may have installed their own
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    handlers: list = [logging.FileHandler(log_path)]
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].addFilter(_console_worthy)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # TensorFlow's own logger writes to stderr by itself; send it through the handlers above.
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.handlers.clear()
    tf_logger.propagate = True


def load_schema(config: PipelineConfig) -> schema_pb2.Schema:
    """The curated schema that ImportSchemaGen brings into the pipeline."""
    return text_format.Parse(pathlib.Path(config.schema_path).read_text(), schema_pb2.Schema())


def _failure_reason(error: BaseException) -> Tuple[str, bool]:
    """Why the run failed, and whether that is an expected outcome (our own validation error is in the
    exception chain: the data was blocked) rather than a crash (the root cause is named)."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    validation = next((item for item in chain if isinstance(item, DataValidationError)), None)
    if validation is not None:
        return str(validation), True
    return f"{type(chain[-1]).__name__}: {chain[-1]}", False


def unusable_unlabelled_rows(config: PipelineConfig) -> str:
    """Why bulk_inference_dir's files can't be predicted (the CSV check's findings, or a model feature's value of
    the wrong type, which would make ExampleGen type the column differently from the model's parsing), or ''."""
    if not config.bulk_inference_dir or "://" in config.bulk_inference_dir:
        return ""
    schema = load_schema(config)
    features_only = schema_pb2.Schema(feature=[f for f in schema.feature if f.name in features.FEATURE_NAMES])
    try:
        checked = csv_check.check_csv_files(pathlib.Path(config.bulk_inference_dir), "*.csv", features_only)
    except csv_check.InputDataError as error:
        return str(error)
    if checked.notes:
        return "a model feature's value of the wrong type: " + "; ".join(checked.notes)
    return _numbers_in_text_features(checked.files)


def _numbers_in_text_features(files: List[pathlib.Path]) -> str:
    """A text feature whose every value is a number (is_male written 1/0): ExampleGen would type it as integers,
    unlike the model's parsing."""
    import csv

    seen: Dict[str, bool] = {}  # feature -> whether a value that is not a number was seen
    for path in files:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                for column in features.FEATURES:
                    value = (row.get(column.name) or "").strip()
                    if column.dtype == "string" and value and not seen.get(column.name):
                        seen[column.name] = not _is_number(value)
    numeric = sorted(name for name, text in seen.items() if not text)
    return (
        (
            f"text feature(s) {', '.join(numeric)} hold only numbers in {files[0].parent} (the model reads text "
            "such as true/false)"
        )
        if numeric
        else ""
    )


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def _quiet_worker_processes() -> Iterator[None]:
    """Beam's worker processes (config.parallel_steps on large inputs) import TensorFlow without the quiet import
    of this process (babyweight_cli), and its C++ start-up errors about GPU plugins would reach the console.
    The workers inherit this environment; this process read the variable when it imported TensorFlow."""
    previous = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL")
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = previous


def _written(page: str, write: Callable[[], pathlib.Path]) -> str:
    """The summary's line for a page the run writes: its path, or why it wasn't written (the traceback goes to the
    log). A page that can't be drawn is no reason to fail a run whose model may already be pushed."""
    try:
        return f"  {page}: {write()}"
    except Exception as error:
        logging.error("the %s page was not written", page, exc_info=True, extra={CONSOLE: False})
        return f"  {page}: NOT written ({type(error).__name__}: {error}; the traceback is in the log)"


def run_local(config: PipelineConfig) -> Outcome:
    """Runs the pipeline once; on bad input or a failed step, says why, and pushes nothing."""
    try:
        checked = csv_check.check_csv_files(
            pathlib.Path(config.data_dir), config.input_pattern, load_schema(config), config.input_span
        )
    except csv_check.InputDataError as error:
        return Outcome(False, f"Run stopped before the pipeline started: {error}", recorded=False)
    logging.info("input: %d rows in %d file(s) under %s", checked.rows, len(checked.files), config.data_dir)
    for note in checked.notes:
        logging.warning("input: %s", note)

    skipped = unusable_unlabelled_rows(config)
    if skipped:  # the model is trained and pushed all the same; the summary says why nothing was predicted
        logging.warning("bulk inference skipped: %s", skipped)
        config = dataclasses.replace(config, bulk_inference_dir="")

    failure, blocked = None, False
    earlier = summary.latest_run(config)
    try:
        # `babyweight metadata` tells a killed run from a live one by the marker
        with mlmd.runner_marker(config.metadata_path), _quiet_worker_processes():
            local_runner = (
                runner.ParallelDagRunner(config.steps_at_once, RUN_ALONE, AFTER_ALL)
                if config.steps_at_once > 1
                else tfx.orchestration.LocalDagRunner()
            )
            local_runner.run(create_pipeline(config, checked.rows))
    except Exception as error:  # a failed component: report it, then summarise what did run
        failure, blocked = _failure_reason(error)
        # A span blocked by validation is an expected outcome: its traceback goes to the log file only.
        logging.error(
            "pipeline run %s",
            "blocked by data validation" if blocked else "failed",
            exc_info=True,
            extra={CONSOLE: not blocked},
        )
    skipped_line = [f"  bulk inference: skipped: {skipped}"] if skipped else []
    run = summary.latest_run(config)
    if run is None or (earlier is not None and run[0] == earlier[0]):
        # Nothing of this run is in ML Metadata: the latest run there is an earlier one, left as it was.
        return Outcome(
            False,
            "\n".join([f"Run FAILED before it was recorded in ML Metadata: {failure}"] + skipped_line),
            crash="" if blocked else failure,
            recorded=False,
        )
    ending = ""
    if failure:
        pushed = summary.output_of(run[1], "Pusher", "pushed_model")
        ending = (
            f"Run FAILED after the push: {failure}\nThe model was pushed; a step after the Pusher failed."
            if pushed is not None and pushed.custom_properties["pushed"].int_value == 1
            else f"Run FAILED: {failure}\nNo model was pushed by this run."
        )
    pages = [
        _written(
            "report",
            lambda: report.write_report(config, run[0], run[1], "\n".join([ending or "Run complete."] + skipped_line)),
        ),
        _written("history", lambda: history.write_index(config)),
    ]
    lines = [summary.summarize_run(config, *run, checked)] + skipped_line + pages + ([ending] if failure else [])
    return Outcome(not failure, "\n".join(lines), crash="" if blocked else failure or "")
