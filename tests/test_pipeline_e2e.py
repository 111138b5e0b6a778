"""The real pipeline, end to end, on small generated data and on the team's real export.

`pipeline_runs` (conftest.py) is one sequence of runs in one output folder: a clean run, a run on data
that fails validation, and a rerun after the data is fixed; the tests assert on what ML Metadata recorded.
"""
import glob
import json
import pathlib
import subprocess
import sys
from typing import List

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from data import generator
from models import features
from pipeline import config as config_lib
from pipeline import baseline, serving_check, summary

pytestmark = pytest.mark.slow

NODES = {"CsvExampleGen", "StatisticsGen", "ImportSchemaGen", "previous_validated_span", "DataValidator", "DataGate",
         "training_window", "Transform", "Trainer", "TreeBaseline", "latest_blessed_model_resolver", "Evaluator",
         "previous_predictions", "PredictionMonitor", "Pusher"}
CACHEABLE = {"CsvExampleGen", "StatisticsGen", "ImportSchemaGen", "DataValidator", "DataGate", "Transform", "Trainer",
             "TreeBaseline"}


def test_first_run_executes_each_component_once_and_pushes(pipeline_runs):
    first = pipeline_runs["first"]
    assert first.outcome.ok, first.outcome.summary
    assert set(first.steps) == NODES
    assert {s.state for s in first.steps.values()} == {"complete"}
    assert len(first.pushed_versions) == 1
    assert "blessed: yes" in first.outcome.summary and "anomalies: none" in first.outcome.summary
    assert "not checked: no earlier validated span" in first.outcome.summary


def test_data_failing_validation_stops_before_transform_and_pushes_nothing(pipeline_runs):
    corrupt = pipeline_runs["corrupt"]
    assert not corrupt.outcome.ok
    failure = corrupt.outcome.summary.split("Run FAILED: ")[-1]
    assert failure.startswith("span 0 failed data validation"), corrupt.outcome.summary
    assert "[BLOCKING] domain: feature 'is_male' (train, eval): Unexpected string values" in failure, failure
    assert "M (~50%)" in failure
    # The same file replaced in place is compared with the version validated before it: a drift too.
    assert "[BLOCKING] drift: feature 'is_male' (train)" in failure
    assert corrupt.steps["DataGate"].state == "failed"
    assert not {"Transform", "Trainer", "Evaluator", "Pusher"} & set(corrupt.steps)
    assert corrupt.pushed_versions == pipeline_runs["first"].pushed_versions


def test_rerun_after_the_fix_is_served_from_cache(pipeline_runs):
    fixed = pipeline_runs["fixed"]
    assert fixed.outcome.ok, fixed.outcome.summary
    assert {name for name, step in fixed.steps.items() if step.state == "cached"} >= CACHEABLE
    # The first model is now the blessed baseline: the Evaluator compares against it and blesses again.
    assert fixed.steps["Evaluator"].state == "complete"
    assert "blessed: yes" in fixed.outcome.summary


def test_summary_reports_rows_rmse_against_the_mean_predictor_and_seconds(pipeline_runs):
    text = pipeline_runs["first"].outcome.summary
    rows = {split: int(n) for split, n in (part.split() for part in
                                           text.split("rows: ")[1].splitlines()[0].split(", "))}
    assert sum(rows.values()) == 6_000 and rows["train"] > 3 * rows["eval"]
    assert "predicting the training mean: RMSE" in text
    for node in NODES:
        assert node in text.split("seconds per component:")[1]


def _eval_examples(config: config_lib.PipelineConfig, count: int) -> List[bytes]:
    """The first `count` eval examples that a client could send (every required feature known)."""
    files = sorted(glob.glob(f"{config.pipeline_root}/CsvExampleGen/examples/*/Split-eval/*.gz"))
    examples = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.train.Example.FromString(record.numpy())
        values = {name: list(getattr(feature, feature.WhichOneof("kind")).value) if feature.WhichOneof("kind") else []
                  for name, feature in example.features.feature.items()}
        if not features.missing_required(values):
            examples.append(record.numpy())
        if len(examples) == count:
            return examples
    raise AssertionError(f"fewer than {count} eval examples with the required features")


def test_pushed_model_predicts_what_the_training_transform_and_model_predict(pipeline_runs):
    config = pipeline_runs["config"]
    pushed = pathlib.Path(config.serving_dir) / pipeline_runs["first"].pushed_versions[-1]
    serialized = _eval_examples(config, 50)

    transform_dir = sorted(glob.glob(f"{config.pipeline_root}/Transform/transform_graph/*"))[-1]
    trained_dir = sorted(glob.glob(f"{config.pipeline_root}/Trainer/model/*/Format-Serving"))[-1]
    tft_output = tft.TFTransformOutput(transform_dir)
    raw_spec = tft_output.raw_feature_spec()
    raw_spec.pop(features.LABEL.name)
    transformed = tft_output.transform_features_layer()(tf.io.parse_example(serialized, raw_spec))
    trained = tf.keras.models.load_model(trained_dir)
    expected = trained({name: transformed[name] for name in trained.input_names}).numpy().ravel()

    served = tf.saved_model.load(str(pushed))
    from_examples = served.signatures["serving_default"](examples=tf.constant(serialized))["predictions"]
    np.testing.assert_allclose(from_examples.numpy().ravel(), expected, rtol=1e-5)

    parsed = tf.io.parse_example(serialized, raw_spec)
    raw_inputs = {}
    for column in features.FEATURES:  # one tensor per feature, "" or NaN where the example has no value
        sparse = parsed[column.name]
        is_string = sparse.dtype == tf.string
        values = np.full(len(serialized), b"" if is_string else np.nan, dtype=object if is_string else np.float32)
        values[sparse.indices[:, 0].numpy()] = sparse.values.numpy()
        raw_inputs[column.name] = tf.constant(values)
    assert np.isnan(raw_inputs["father_age"].numpy()).sum() == 0  # 99 codes are values here...
    assert (raw_inputs["father_age"].numpy() == 99).any()  # ...that the transform treats as missing
    from_raw = served.signatures["serving_raw"](**raw_inputs)["predictions"]
    np.testing.assert_allclose(from_raw.numpy().ravel(), expected, rtol=1e-5)
    assert 3 < expected.mean() < 10


def test_bad_values_are_named_by_file_and_line_and_stop_the_run_before_training(tmp_path):
    bad = tmp_path / "data" / "natality.csv"
    bad.parent.mkdir()
    generator.write(50, 2, bad.parent)
    lines = bad.read_text().splitlines()
    lines[7] = lines[7].replace(",true,", ",yes,", 1).replace(",false,", ",maybe,", 1)
    cells = lines[9].split(",")
    cells[features.COLUMN_NAMES.index("mother_age")] = "2O"
    lines[9] = ",".join(cells)
    bad.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "runner_local.py", "--data-dir", str(bad.parent), "--output-dir", str(tmp_path / "out")],
        cwd=config_lib.PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert f"{bad}, line 10, column mother_age: '2O' is not an integer" in result.stdout
    assert "[BLOCKING] type: feature 'mother_age'" in result.stdout
    assert "[BLOCKING] domain: feature 'is_male'" in result.stdout
    assert not (tmp_path / "out" / "serving_model").exists()


def test_real_bigquery_export_trains_a_model_well_below_the_mean_predictor(real_export_run):
    config, result = real_export_run
    assert result.outcome.ok, result.outcome.summary
    assert result.pushed_versions
    evaluation = result.steps["Evaluator"].outputs["evaluation"][0]
    rmse = summary.slice_metrics(evaluation.uri)["overall"]["root_mean_squared_error"]
    mean_rmse = baseline.read(result.steps["TreeBaseline"].outputs["baseline"][0].uri)["mean_rmse"]
    assert rmse < 0.85 * mean_rmse, (rmse, mean_rmse)


def test_validate_serving_checks_requests_against_the_stores_training_statistics(pipeline_runs, tmp_path, capsys):
    config = pipeline_runs["config"]
    names = [c.name for c in features.FEATURES]
    frame = pd.read_csv(pathlib.Path(config.data_dir) / "natality.csv", dtype=str, keep_default_na=False)
    rows = [{k: v for k, v in row.items() if k in names and v != ""} for row in frame.head(500).to_dict("records")]
    lacking = [number for number, row in enumerate(rows, start=1) if features.missing_required(row)]
    assert lacking  # births without a known gestation: a client can't ask about them
    sendable = [row for row in rows if not features.missing_required(row)]
    good = tmp_path / "requests.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in sendable))
    assert serving_check.main([str(good), "--output-dir", config.output_dir]) == 0
    assert f"{len(sendable)} request(s)" in capsys.readouterr().out
    unsendable = tmp_path / "unsendable.jsonl"
    unsendable.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert serving_check.main([str(unsendable), "--output-dir", config.output_dir]) == 1
    assert (f"required: gestation_weeks: {len(lacking)} request(s) lack this required feature"
            in capsys.readouterr().out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(dict(row, session_id="x")) + "\n" for row in rows))
    assert serving_check.main([str(bad), "--output-dir", config.output_dir]) == 1
    assert "unexpected: session_id" in capsys.readouterr().out
    assert serving_check.main([str(tmp_path / "none.jsonl"), "--output-dir", config.output_dir]) == 2
