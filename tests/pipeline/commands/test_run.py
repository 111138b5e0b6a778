"""A blocked run is an expected outcome: its traceback goes to the log file, a crash's to the console too."""

import logging
import pathlib

import pytest

from pipeline import config as config_lib
from pipeline.commands import run as run_lib
from pipeline.components.validation import DataValidationError


class _FailingRunner:
    """The local runner as it fails: TFX's launcher wraps the component's exception in its own."""

    def __init__(self, error: BaseException):
        self.error = error

    def run(self, _pipeline):
        logging.getLogger("absl").error(run_lib.TFX_STEP_FAILED, 8)  # as TFX's launcher logs it
        try:
            raise self.error
        except BaseException as cause:
            raise RuntimeError("component DataGate failed") from cause


@pytest.fixture
def logged(tmp_path):
    """Where setup_logging writes, as runner_local calls it (conftest puts pytest's handlers back after)."""
    return tmp_path / "run.log"


def _run(monkeypatch, capsys, log_path: pathlib.Path, error: BaseException):
    config = config_lib.load_config(overrides={"output_dir": str(log_path.parent / "out")})
    monkeypatch.setattr(run_lib.runner, "ParallelDagRunner", lambda *args: _FailingRunner(error))
    run_lib.setup_logging(log_path)
    outcome = run_lib.run_local(config)
    logging.getLogger().handlers[0].flush()
    return outcome, capsys.readouterr().err, log_path.read_text()


def test_a_run_blocked_by_validation_keeps_its_traceback_in_the_log(monkeypatch, capsys, logged):
    error = DataValidationError("span 3 failed data validation (1 blocking anomaly):\n  [BLOCKING] presence: ...")
    outcome, console, log = _run(monkeypatch, capsys, logged, error)
    assert not outcome.ok and "span 3 failed data validation" in outcome.summary
    assert "Traceback" not in console and "blocked by data validation" not in console
    assert "Execution 8 failed" not in console and "Execution 8 failed" in log
    assert "pipeline run blocked by data validation" in log and "Traceback" in log


def test_a_crash_shows_its_traceback_on_the_console(monkeypatch, capsys, logged):
    outcome, console, log = _run(monkeypatch, capsys, logged, ValueError("something broke"))
    assert not outcome.ok and "ValueError: something broke" in outcome.summary
    assert "pipeline run failed" in console and "Traceback" in console
    assert "Traceback" in log


def test_a_failure_before_the_run_is_recorded_leaves_the_earlier_run_alone(monkeypatch, capsys, logged):
    from ml_metadata import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    config = config_lib.load_config(overrides={"output_dir": str(logged.parent / "out")})
    pathlib.Path(config.metadata_path).parent.mkdir(parents=True)
    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = config.metadata_path
    store = metadata_store.MetadataStore(connection)
    run_type = store.put_context_type(metadata_store_pb2.ContextType(name="pipeline_run"))
    store.put_contexts([metadata_store_pb2.Context(type_id=run_type, name="2026-11-01T10:00:00")])
    outcome, console, _ = _run(monkeypatch, capsys, logged, ValueError("no such executor"))
    assert outcome.summary == "Run FAILED before it was recorded in ML Metadata: ValueError: no such executor"
    assert outcome.crash == "ValueError: no such executor"
    assert not (pathlib.Path(config.output_dir) / "reports").exists()  # no report rewritten for the earlier run


@pytest.mark.parametrize(
    "rows, reason",
    [
        (["30,39", "31"], "births.csv, line 3: 1 fields, expected 2"),
        (
            ["30,39", "31,39.5"],
            "a model feature's value of the wrong type: {path}, line 3, column gestation_weeks: "
            "'39.5' is not an integer",
        ),
    ],
)
def test_unusable_unlabelled_rows_skip_the_bulk_inferrer_not_the_run(monkeypatch, tmp_path, rows, reason):
    """Rows ExampleGen can't read, or would type unlike the model's parsing, are named, and the run goes on
    without the BulkInferrer step (the model is still trained and pushed)."""
    (tmp_path / "unlabelled").mkdir()
    path = tmp_path / "unlabelled" / "births.csv"
    path.write_text("mother_age,gestation_weeks\n" + "\n".join(rows) + "\n")
    config = config_lib.load_config(
        overrides={"output_dir": str(tmp_path / "out"), "bulk_inference_dir": str(path.parent)}
    )
    assert reason.format(path=path) in run_lib.unusable_unlabelled_rows(config)
    built = []

    class Capturing:
        def run(self, pipeline):
            built.append({component.id for component in pipeline.components})
            raise RuntimeError("stopped here")

    monkeypatch.setattr(run_lib.runner, "ParallelDagRunner", lambda *args: Capturing())
    run_lib.run_local(config)
    path.write_text("mother_age,gestation_weeks\n30,39\n31,\n")  # fixed: the step is back
    assert run_lib.unusable_unlabelled_rows(config) == ""
    run_lib.run_local(config)
    assert "Trainer" in built[0] and "BulkInferrer" not in built[0] and "BulkInferrer" in built[1]


def test_a_text_feature_written_as_numbers_makes_the_unlabelled_rows_unusable(tmp_path):
    (tmp_path / "births.csv").write_text("mother_age,gestation_weeks,is_male\n30,39,1\n31,40,0\n32,38,\n")
    config = config_lib.load_config(
        overrides={"output_dir": str(tmp_path / "out"), "bulk_inference_dir": str(tmp_path)}
    )
    assert run_lib.unusable_unlabelled_rows(config).startswith("text feature(s) is_male hold only numbers in")
    (tmp_path / "births.csv").write_text("mother_age,gestation_weeks,is_male\n30,39,1\n31,40,true\n")
    assert run_lib.unusable_unlabelled_rows(config) == ""


def test_a_page_that_cannot_be_written_is_named_in_the_summary_not_a_crash(caplog):
    def broken():
        raise ValueError("Axis limits cannot be NaN")

    line = run_lib._written("history", broken)
    assert line == "  history: NOT written (ValueError: Axis limits cannot be NaN; the traceback is in the log)"
    assert "the history page was not written" in caplog.text and "Traceback" in caplog.text
    assert run_lib._written("report", lambda: pathlib.Path("/x/run-1.html")) == "  report: /x/run-1.html"
