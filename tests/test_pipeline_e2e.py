"""The real pipeline, end to end, on small generated data and on the team's real export.

`pipeline_runs` (conftest.py) is one sequence of runs in one output folder: a clean run, a run on data
that fails validation, and a rerun after the data is fixed; the tests assert on what ML Metadata recorded.
"""

import dataclasses
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Dict, List

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from data import generator
from models import features, lite
from pipeline import config as config_lib
from pipeline.commands import quality, serving_check
from pipeline.components import baseline
from pipeline.metadata import mlmd
from pipeline.reports import summary
from tests.conftest import PROJECT_ROOT, QUICK_TRAINING

pytestmark = pytest.mark.slow

NODES = {
    "CsvExampleGen",
    "StatisticsGen",
    "ImportSchemaGen",
    "previous_validated_span",
    "DataValidator",
    "DataGate",
    "training_window",
    "Transform",
    "Trainer",
    "TreeBaseline",
    "latest_blessed_model_resolver",
    "Evaluator",
    "previous_predictions",
    "PredictionMonitor",
    "InfraValidator",
    "Pusher",
    "TFLiteExporter",
}
CACHEABLE = {
    "CsvExampleGen",
    "StatisticsGen",
    "ImportSchemaGen",
    "DataValidator",
    "DataGate",
    "Transform",
    "Trainer",
    "TreeBaseline",
}


def test_first_run_executes_each_component_once_and_pushes(pipeline_runs):
    first = pipeline_runs["first"]
    assert first.outcome.ok, first.outcome.summary
    assert set(first.steps) == NODES
    assert {s.state for s in first.steps.values()} == {"complete"}
    assert len(first.pushed_versions) == 1
    assert "blessed: yes" in first.outcome.summary and "anomalies: none" in first.outcome.summary
    assert "not checked: no earlier validated span" in first.outcome.summary
    # Served by babyweight serve before the push: every check passed, with its figure.
    assert "infra validation (the candidate served by babyweight serve): blessed" in first.outcome.summary
    for check in ("load", "answers", "memory", "latency"):
        assert re.search(rf"^    {check} +ok ", first.outcome.summary, re.M), first.outcome.summary
    infra = first.steps["InfraValidator"].outputs["blessing"][0]
    assert infra.custom_properties["blessed"].int_value == 1
    assert 100 < infra.custom_properties["peak_memory_mb"].double_value < 1536
    # The device's models, beside the pushed SavedModel, checked against it.
    version = pathlib.Path(pipeline_runs["config"].serving_dir) / first.pushed_versions[0]
    assert all((version / name).stat().st_size > 50_000 for name in lite.FILES.values())
    for check in ("float32", "float16"):
        assert re.search(rf"^      {check} +ok ", first.outcome.summary, re.M), first.outcome.summary
    # docs/on-device.md's command on the bundled data (test_device.py runs it without TensorFlow).
    device = subprocess.run(
        [
            sys.executable,
            "-m",
            "babyweight_cli",
            "predict",
            "--tflite",
            str(version / "babyweight.tflite"),
            "data/natality/natality.csv",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert device.returncode == 1 and device.stdout.startswith("row,prediction,model_version,error\n1,")
    assert (
        f"19823 of 20000 row(s) of data/natality/natality.csv predicted by version(s) "
        f"{first.pushed_versions[0]}; 177 refused"
    ) in device.stderr, device.stderr


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


@pytest.fixture(scope="module")
def schema_runs(tmp_path_factory):
    """In one output folder, on the same data: a run, a rerun with the schema edited (mother_age at most
    20, which the data breaks), a rerun with the schema reverted."""
    from tests.conftest import run_pipeline

    root = tmp_path_factory.mktemp("schema")
    data = generator.write(2_000, 8, root / "data")[0].parent
    schema = root / "schema" / "schema.pbtxt"
    schema.parent.mkdir()
    original = (PROJECT_ROOT / "schema" / "schema.pbtxt").read_text()
    config = config_lib.load_config(
        overrides=dict(QUICK_TRAINING, data_dir=str(data), output_dir=str(root / "out"), schema_dir=str(schema.parent))
    )
    mother_age = original.index('name: "mother_age"')
    runs = {}
    for name, text in (
        ("first", original),
        ("schema_edited", original[:mother_age] + original[mother_age:].replace("max: 64", "max: 20", 1)),
        ("schema_reverted", original),
    ):
        schema.write_text(text)
        runs[name] = run_pipeline(config)
    return runs


def test_an_edited_schema_takes_effect_on_the_rerun_and_reverting_it_reuses_the_earlier_steps(schema_runs):
    assert schema_runs["first"].outcome.ok, schema_runs["first"].outcome.summary
    edited = schema_runs["schema_edited"]
    assert not edited.outcome.ok, edited.outcome.summary
    assert edited.steps["ImportSchemaGen"].state == "complete"  # a new schema artifact...
    assert edited.steps["DataValidator"].state == "complete"  # ...validated against, with the same data
    assert "[BLOCKING] domain: feature 'mother_age'" in edited.outcome.summary.split("Run FAILED: ")[-1]
    reverted = schema_runs["schema_reverted"]
    assert reverted.outcome.ok, reverted.outcome.summary
    assert {name for name, step in reverted.steps.items() if step.state == "cached"} >= CACHEABLE
    schema = {name: run.steps["ImportSchemaGen"].outputs["schema"][0].id for name, run in schema_runs.items()}
    assert schema["schema_reverted"] == schema["first"] != schema["schema_edited"]


def test_editing_the_code_a_step_runs_reruns_that_step_only(tmp_path):
    """runner_local.py from a copy of the project, twice on the same data and store: between the runs
    pipeline/components/checks.py (which the validator imports) gets one more line."""
    copy = tmp_path / "project"
    for package in ("data", "models", "pipeline", "schema"):
        shutil.copytree(PROJECT_ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("runner_local.py", "setup.py"):
        shutil.copy(PROJECT_ROOT / name, copy)
    generator.write(2_000, 5, tmp_path / "data")
    command = [
        sys.executable,
        "runner_local.py",
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "out"),
        *(f"--set={key}={value}" for key, value in QUICK_TRAINING.items()),
    ]

    def run() -> Dict[str, str]:
        done = subprocess.run(
            command, cwd=copy, env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        store = mlmd.open_sqlite(str(tmp_path / "out" / "metadata.sqlite"))
        return {step.node_id: step.state for step in store.steps(store.runs()[-1])}

    assert set(run().values()) == {"complete"}
    checks = copy / "pipeline" / "components" / "checks.py"
    checks.write_text(checks.read_text() + "\n# edited\n")
    states = run()
    assert states["DataValidator"] == states["DataGate"] == "complete", states
    assert {
        states[name]
        for name in ("CsvExampleGen", "ImportSchemaGen", "StatisticsGen", "Transform", "Trainer", "TreeBaseline")
    } == {"cached"}


def test_training_is_seeded_the_same_inputs_and_seed_give_the_same_model(pipeline_runs, tmp_path):
    config = pipeline_runs["config"]
    artifacts = quality.run_artifacts(config)
    rows = quality.accepted(quality.read_rows(artifacts.eval_files)).head(300)

    def predictions(seed: int, folder: str) -> np.ndarray:
        seeded = dataclasses.replace(config, seed=seed)
        return quality.predictor(quality.train_with_presence(seeded, artifacts, {}, tmp_path / folder))(rows)

    first = predictions(config.seed, "first")
    np.testing.assert_allclose(predictions(config.seed, "again"), first, atol=1e-4)
    assert np.abs(predictions(config.seed + 1, "other") - first).max() > 1e-3


WORKER = """
import json, os, sys, types
paths = json.loads(sys.argv[1])
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": paths["workers"]},
                                      "task": {"type": "worker", "index": int(sys.argv[2])}})
from models import model
from pipeline import config as config_lib
from pipeline.pipeline import model_config
chosen = model.write_dir
def write_dir(path, strategy):
    folder = chosen(path, strategy)
    print("WRITES", path, "TO", folder, flush=True)
    return folder
model.write_dir = write_dir
custom = dict(model_config(config_lib.load_config()), strategy="multi_worker_mirrored", train_epochs=1,
              min_train_steps=10)
model.run_fn(types.SimpleNamespace(custom_config=custom, transform_output=paths["transform"],
                                   train_files=paths["train"], eval_files=paths["eval"],
                                   serving_model_dir=paths["serving"], model_run_dir=paths["logs"]))
"""


def _free_ports(count: int) -> List[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_two_workers_train_together_and_only_the_chief_writes_the_model(pipeline_runs, tmp_path):
    """MultiWorkerMirroredStrategy on two local processes (TF_CONFIG on localhost ports), as on Vertex AI."""
    artifacts = quality.run_artifacts(pipeline_runs["config"])
    paths = {
        "workers": [f"localhost:{port}" for port in _free_ports(2)],
        "transform": artifacts.transform_graph,
        "train": artifacts.train_files,
        "eval": artifacts.eval_files,
        "serving": str(tmp_path / "serving"),
        "logs": str(tmp_path / "logs"),
    }
    temp = tmp_path / "temp"
    temp.mkdir()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(paths), str(index)],
            env=dict(os.environ, TMPDIR=str(temp)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert (tmp_path / "serving" / "saved_model.pb").is_file()
    assert list((tmp_path / "logs").iterdir())
    writes = [
        dict(tuple(line.split()[1::2]) for line in output.splitlines() if line.startswith("WRITES "))
        for output in outputs
    ]
    assert writes[0] == {paths["serving"]: paths["serving"], paths["logs"]: paths["logs"]}  # the chief
    assert set(writes[1]) == {paths["serving"], paths["logs"]}
    assert all(folder.startswith(str(temp / "babyweight-worker-1-")) for folder in writes[1].values())
    assert not list(temp.glob("babyweight-worker-*"))  # worker 1's copies are gone
    rows = quality.accepted(quality.read_rows(artifacts.eval_files)).head(20)
    assert np.isfinite(quality.predictor(str(tmp_path / "serving"))(rows)).all()


def test_summary_reports_rows_rmse_against_the_mean_predictor_and_seconds(pipeline_runs):
    text = pipeline_runs["first"].outcome.summary
    rows = {
        split: int(n) for split, n in (part.split() for part in text.split("rows: ")[1].splitlines()[0].split(", "))
    }
    assert sum(rows.values()) == 6_000 and rows["train"] > 3 * rows["eval"]
    assert "predicting the training mean: RMSE" in text
    for node in NODES:
        assert node in text.split("seconds per component:")[1]
    # The local runner started the monitor and the Evaluator together, once the Trainer was done (pipeline/runner.py).
    side_by_side = text.split("side by side: ")[1].splitlines()[0]
    assert "Evaluator and PredictionMonitor" in side_by_side or "PredictionMonitor and Evaluator" in side_by_side


def _eval_examples(config: config_lib.PipelineConfig, count: int) -> List[bytes]:
    """The first `count` eval examples that a client could send (every required feature known)."""
    files = sorted(glob.glob(f"{config.pipeline_root}/CsvExampleGen/examples/*/Split-eval/*.gz"))
    examples = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.train.Example.FromString(record.numpy())
        values = {
            name: list(getattr(feature, feature.WhichOneof("kind")).value) if feature.WhichOneof("kind") else []
            for name, feature in example.features.feature.items()
        }
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
        cwd=config_lib.PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
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
    assert f"required: gestation_weeks: {len(lacking)} request(s) lack this required feature" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(dict(row, session_id="x")) + "\n" for row in rows))
    assert serving_check.main([str(bad), "--output-dir", config.output_dir]) == 1
    assert "unexpected: session_id" in capsys.readouterr().out
    assert serving_check.main([str(tmp_path / "none.jsonl"), "--output-dir", config.output_dir]) == 2
