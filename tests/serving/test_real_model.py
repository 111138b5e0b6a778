"""The pipeline's own model, pushed from a run on the real export, served and checked end to end."""

import base64
import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models import features, lite
from serving.core import contract, loader
from tests.serving.conftest import PROJECT_ROOT, call, running_server
from tests.serving.model_server.test_server import call_text

pytestmark = pytest.mark.slow


def test_served_predictions_equal_the_signatures_on_real_rows(real_export_run, real_export_csv, tmp_path):
    config, _ = real_export_run
    version_dir = max(pathlib.Path(config.serving_dir).iterdir(), key=lambda p: int(p.name))
    head = json.loads((version_dir / features.FREQUENT_INSTANCES_FILE).read_text())
    assert head["rows"] > 10_000 and head["instances"][0][0] > 1  # the Trainer wrote the training data's head
    rows = list(csv.DictReader(real_export_csv.open()))[:1500]
    instances = []
    for row in rows:
        try:
            instances.append(contract.to_instance(row))
        except ValueError:
            continue
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_raw"]
    expected = signature(**loader.columns_of([features.instance_key(i) for i in instances]))["predictions"].numpy()
    logs = tmp_path / "logs"
    with running_server(version_dir.parent, logs) as url:
        served = []
        for start in range(0, len(instances), 100):
            status, headers, body = call(
                f"{url}/v1/models/babyweight:predict", {"instances": instances[start : start + 100]}
            )
            assert status == 200, body
            served += [p[0] for p in body["predictions"]]
        # The same rows as serialized tf.Examples (serving_default's form), as the training data holds them.
        examples = [_example(instance) for instance in instances[:300]]
        status, _, body = call(
            f"{url}/v1/models/babyweight:predict",
            {
                "signature_name": "serving_default",
                "instances": [{"b64": base64.b64encode(e).decode()} for e in examples],
            },
        )
        assert status == 200, body
        by_examples = [p[0] for p in body["predictions"]]
        # Asked again, the frequent ones come from the version's table: the same numbers.
        again = [
            call(f"{url}/v1/models/babyweight:predict", {"instances": [i]})[2]["predictions"][0][0]
            for i in instances[:200]
        ]
        metrics = call_text(f"{url}/metrics")
        runtime = call(f"{url}/v1/models/babyweight/metadata")[2]["runtime"]
    # The version's TFLite model answers (--prefer-tflite-model, on by default), as close to the signature as the
    # server's load check allows; asked again, the table gives the same numbers.
    assert runtime == loader.TFLITE
    np.testing.assert_allclose(served, expected.reshape(-1), rtol=0, atol=loader.LITE_MAX_DIFFERENCE)
    np.testing.assert_allclose(again, served[:200], rtol=1e-6, atol=1e-6)
    default = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    np.testing.assert_allclose(
        by_examples,
        default(examples=tf.constant(examples))["predictions"].numpy().reshape(-1),
        rtol=0,
        atol=loader.LITE_MAX_DIFFERENCE,
    )
    assert 'babyweight_cache_lookups_total{result="hit"' in metrics
    # The request log is what validate-serving checks against the run's training data.
    checked = subprocess.run(
        [sys.executable, "-m", "babyweight_cli", "validate-serving", str(logs), "--output-dir", config.output_dir],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert checked.returncode in (0, 1), checked.stderr
    assert f"{len(instances) + 300 + 200} request(s) in {logs}" in checked.stdout


def test_the_savedmodel_answers_where_asked_or_where_the_tflite_model_disagrees(real_export_run, tmp_path, caplog):
    """--prefer-tflite-model false: the SavedModel's own answers. A TFLite file that answers otherwise than its
    version (another model's) is not used: the load says so and the SavedModel answers."""
    import logging
    import shutil

    from tests.serving import toy_model

    config, _ = real_export_run
    version_dir = max(pathlib.Path(config.serving_dir).iterdir(), key=lambda p: int(p.name))
    row = {"mother_age": 31, "gestation_weeks": 39, "is_male": "true"}
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_raw"]
    expected = signature(**loader.columns_of([features.instance_key(row)]))["predictions"].numpy()[0, 0]
    with running_server(version_dir.parent, tmp_path / "logs", "--prefer-tflite-model", "false") as url:
        assert call(f"{url}/v1/models/babyweight/metadata")[2]["runtime"] == loader.TENSORFLOW
        assert call(f"{url}/v1/models/babyweight:predict", {"instances": [row]})[2]["predictions"][0][0] == expected
    toy = toy_model.save(tmp_path / "models" / "1", 1.0)
    shutil.copy(version_dir / lite.FILES["float32"], toy / lite.FILES["float32"])
    with caplog.at_level(logging.WARNING):
        loaded = loader.load(str(toy), 1, 10, 100, 2, 1 << 20, prefer_tflite=True)
    assert loaded.runtime == loader.TENSORFLOW
    assert "babyweight.tflite is not used: it differs from the SavedModel by" in caplog.text
    assert loaded.predict_keys([features.instance_key(row)])[0] == pytest.approx(toy_model.expected(row, 1.0))


def test_a_tflite_file_written_after_the_version_loaded_takes_over_its_model_calls(real_export_run, tmp_path):
    """The pipeline writes the TFLite model after the push, so a running server loads the version first: it serves
    it with the SavedModel, then with the TFLite model once the file is there and agrees."""
    import shutil

    from tests.serving.conftest import wait_for

    config, _ = real_export_run
    version_dir = max(pathlib.Path(config.serving_dir).iterdir(), key=lambda p: int(p.name))
    models = tmp_path / "models"
    shutil.copytree(version_dir, models / version_dir.name, ignore=shutil.ignore_patterns("*.tflite"))
    row = {"mother_age": 31, "gestation_weeks": 39, "is_male": "true"}
    with running_server(models, tmp_path / "logs") as url:
        assert call(f"{url}/v1/models/babyweight/metadata")[2]["runtime"] == loader.TENSORFLOW
        before = call(f"{url}/v1/models/babyweight:predict", {"instances": [row]})[2]["predictions"][0][0]
        staging = tmp_path / "staging.tflite"
        shutil.copy(version_dir / lite.FILES["float32"], staging)
        staging.rename(models / version_dir.name / lite.FILES["float32"])
        wait_for(lambda: call(f"{url}/v1/models/babyweight/metadata")[2]["runtime"] == loader.TFLITE, 30)
        row = {**row, "father_age": 41}  # not in the table yet: the model answers
        after = call(f"{url}/v1/models/babyweight:predict", {"instances": [row]})[2]["predictions"][0][0]
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_raw"]
    expected = signature(**loader.columns_of([features.instance_key(row)]))["predictions"].numpy()[0, 0]
    assert abs(after - expected) <= loader.LITE_MAX_DIFFERENCE and before > 0


def _example(instance: dict) -> bytes:
    """A row's features as a tf.Example with the table's types (integers as int64, flags as bytes)."""
    feature = {}
    for column in features.FEATURES:
        value = instance.get(column.name)
        if value is None:
            continue
        if column.dtype == "string":
            feature[column.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(value).encode()]))
        elif column.dtype == "int":
            feature[column.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        else:
            feature[column.name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_the_pipelines_bulk_inferrer_predicts_unlabelled_rows_as_predict_batch_does(real_export_run, tmp_path):
    """TFX's BulkInferrer in the run (serving_default on the run's tf.Examples) and `babyweight predict-batch` (Beam's
    RunInference on serving_raw) give each unlabelled row the same number; rows lacking a required feature are
    left out of the one and rejected, with the reason, by the other."""
    from serving.batch import cli as batch_cli

    config, result = real_export_run
    unlabelled = pathlib.Path(config.bulk_inference_dir) / "births.csv"
    rows = list(csv.DictReader(unlabelled.open()))
    refused = []
    for line, row in enumerate(rows, start=2):
        try:
            contract.to_instance({k: v for k, v in row.items() if v})
        except ValueError:
            refused.append(f"births.csv:{line}")
    assert len(refused) >= 5  # the fixture's rows without gestation weeks, and any others the contract refuses
    assert result.outcome.ok, result.outcome.summary
    assert (
        f"bulk inference: {len(rows) - len(refused)} unlabelled rows predicted, {len(refused)} of {len(rows)} "
        "left out: they lack a required feature"
    ) in result.outcome.summary
    # Its steps run after the Pusher, so that their failure can't hold back a model that passed every check.
    order = list(result.steps)
    assert order.index("Pusher") < order.index("UnlabelledExampleGen") < order.index("BulkInferrer")
    output = result.steps["BulkInferrer"].outputs["output_examples"][0]
    records = tf.data.TFRecordDataset(tf.io.gfile.glob(f"{output.uri}/Split-unlabelled/*"), compression_type="GZIP")
    inferred = {}
    for record in records:
        example = tf.train.Example.FromString(record.numpy())
        values = {
            name: list(getattr(feature, feature.WhichOneof("kind")).value)
            for name, feature in example.features.feature.items()
            if feature.WhichOneof("kind")
        }
        inferred[features.instance_key(values)] = values["predicted_weight_pounds"][0]
    version = max(pathlib.Path(config.serving_dir).iterdir(), key=lambda p: int(p.name))
    assert (
        batch_cli.main(
            ["--input", str(unlabelled), "--output", str(tmp_path / "run"), "--model-dir", str(version.parent)]
        )
        == 0
    )
    predicted = [json.loads(line) for path in tmp_path.glob("run-predictions-*") for line in path.open()]
    rejected = [json.loads(line) for path in tmp_path.glob("run-rejected-*") for line in path.open()]
    assert len(predicted) == len(rows) - len(refused)  # (inferred holds each distinct instance once)
    assert sorted(row["id"] for row in rejected) == sorted(refused)
    assert all("missing required feature" in row["reason"] for row in rejected)
    for row in predicted:
        line = int(row["id"].split(":")[1])
        key = features.instance_key(contract.to_instance({k: v for k, v in rows[line - 2].items() if v}))
        assert inferred[key] == pytest.approx(row["prediction"], abs=1e-4), row


def test_a_predict_batch_job_ends_without_tensorflows_noise_at_exit(real_export_run, real_export_csv, tmp_path):
    """The real model's functions, freed while Python shuts down, reported a TypeError after every job."""
    config, _ = real_export_run
    (tmp_path / "rows.csv").write_text("\n".join(real_export_csv.read_text().splitlines()[:21]) + "\n")
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "babyweight_cli",
            "predict-batch",
            "--input",
            str(tmp_path / "rows.csv"),
            "--output",
            str(tmp_path / "run"),
            "--model-dir",
            config.serving_dir,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0 and "20 row(s) read" in job.stdout, job.stderr[-2000:]
    assert "Exception ignored" not in job.stderr, job.stderr[-2000:]


def _edge_instances(complete: dict) -> list:
    """A complete real instance with each optional feature left out, at each 'unknown' code, beyond the training
    range, and with a text value the training data never had; with only the required features; and beyond the
    schema's domains (refused by the contract on every path)."""
    edges = [{name: value for name, value in complete.items() if features.BY_NAME[name].required}]
    for column in features.OPTIONAL_FEATURES:
        edges.append({name: value for name, value in complete.items() if name != column.name})
        edges += [dict(complete, **{column.name: code}) for code in column.missing_codes]
        edges.append(dict(complete, **{column.name: "unheard-of" if column.dtype == "string" else 97}))
    edges += [dict(complete, mother_age=64), dict(complete, gestation_weeks=60), dict(complete, gestation_weeks=17)]
    edges += [dict(complete, mother_age=75), dict(complete, gestation_weeks=5), dict(complete, gestation_weeks=1e30)]
    return edges


def test_the_pushed_tflite_models_predict_every_real_row_as_the_savedmodel_does(real_export_run, real_export_csv):
    """The issue's goal on all 16,000 rows of the real export: float32 within 0.01 lb of the SavedModel on every row
    the contract accepts, float16's RMSE within 0.005 lb of the SavedModel's, missing values and refusals alike."""
    from pipeline.components import tflite_export
    from serving.clients import device

    config, result = real_export_run
    version = max(pathlib.Path(config.serving_dir).iterdir(), key=lambda p: int(p.name))
    record = result.steps["TFLiteExporter"].outputs["tflite_model"][0]
    assert record.custom_properties["pushed"].int_value == 1 and record.custom_properties[
        "destination"
    ].string_value == str(version)
    assert "TFLite: babyweight.tflite" in result.outcome.summary and f"pushed to {version}" in result.outcome.summary
    rows = list(csv.DictReader(real_export_csv.open()))
    complete = next(
        contract.to_instance(row) for row in rows if all(row[c.name] not in ("", "99") for c in features.FEATURES)
    )
    rows += _edge_instances(complete)
    by_variant = {
        variant: device.predict_rows(device.DeviceModel(str(version / name)), rows, batch_size=512)
        for variant, name in lite.FILES.items()
    }
    signature = tf.saved_model.load(str(version)).signatures["serving_raw"]
    accepted, keys, lacking, domain_refusals = [], [], 0, 0
    for index, row in enumerate(rows):
        try:
            instance = contract.to_instance(row)
        except ValueError as error:  # refused by the device as the server refuses it, in the same words
            assert by_variant["float32"][index]["error"] == f"row {index + 1}: {error}"
            assert by_variant["float16"][index]["error"] == f"row {index + 1}: {error}"
            if "outside its domain" in str(error):  # the schema's domain: the contract refuses, the model would not
                domain_refusals += 1
                continue
            refused = [features.instance_key({k: v for k, v in row.items() if v})]
            with pytest.raises(tf.errors.InvalidArgumentError, match="missing required feature"):
                signature(**loader.columns_of(refused))
            # The TFLite model alone would answer it (the converter drops the assertion): the device's check is needed.
            assert np.isfinite(device.DeviceModel(str(version / "babyweight.tflite")).predict_keys(refused)).all()
            continue
        accepted.append(index)
        keys.append(features.instance_key(instance))
        lacking += any(features.is_missing_value(column, instance.get(column.name)) for column in features.FEATURES)
    assert domain_refusals == 4  # plurality 97, a mother aged 75, 5 and 1e30 weeks: beyond the schema's domains
    assert len(rows) - len(accepted) - domain_refusals == 144  # the real rows without gestation weeks (none, or 99)
    assert lacking > 5000  # real NULL patterns and 'unknown' codes (5,801 rows), and the edge instances
    expected = np.concatenate(
        [
            signature(**loader.columns_of(keys[start : start + 4096]))["predictions"].numpy().reshape(-1)
            for start in range(0, len(keys), 4096)
        ]
    )
    float32 = np.array([by_variant["float32"][index]["prediction"] for index in accepted])
    float16 = np.array([by_variant["float16"][index]["prediction"] for index in accepted])
    assert np.abs(float32 - expected).max() <= tflite_export.MAX_FLOAT32_DIFFERENCE  # the 0.01 lb
    labels = np.array([float(rows[index].get(features.LABEL.name) or "nan") for index in accepted])
    known = ~np.isnan(labels)
    rmse = {
        name: np.sqrt(np.mean((values[known] - labels[known]) ** 2))
        for name, values in (("saved", expected), ("float16", float16))
    }
    assert abs(rmse["float16"] - rmse["saved"]) <= tflite_export.MAX_FLOAT16_RMSE_INCREASE, rmse  # its 0.005 lb
