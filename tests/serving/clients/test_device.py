"""`babyweight predict --tflite`: a TFLite export run by the TensorFlow Lite interpreter alone (toy models)."""

import csv
import io
import json
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

from models import features, lite
from serving.core import contract
from tests.serving import toy_model
from tests.serving.conftest import PROJECT_ROOT

# Runs the command with TensorFlow, TFX and Beam unimportable, as on a device that has only tflite-runtime.
WITHOUT_TENSORFLOW = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tfx", "apache_beam", "tensorflow_transform", "keras", "tf_keras"):
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, Absent())
import babyweight_cli
sys.exit(babyweight_cli.main(sys.argv[1:]))
"""


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, "predict", *args], cwd=PROJECT_ROOT, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> pathlib.Path:
    """A toy version's folder with its SavedModel and its TFLite models, as the pipeline pushes them."""
    version = toy_model.save(tmp_path_factory.mktemp("serving_model") / "12", offset=1.0)
    for variant, name in lite.FILES.items():
        (version / name).write_bytes(lite.convert(str(version), variant))
    return version


ROWS = [
    {"mother_age": "30", "gestation_weeks": "39", "is_male": "true"},
    {"mother_age": "25", "gestation_weeks": "", "is_male": "false"},  # lacks a required feature
    {"mother_age": "41", "gestation_weeks": "36.5"},  # optional features missing
    {"mother_age": "33", "gestation_weeks": "99"},  # the 'unknown' code
    {"mother_age": "thirty", "gestation_weeks": "39"},  # not a number
]


def test_rows_are_predicted_without_tensorflow_as_the_savedmodel_predicts_and_refused_as_the_server_refuses(
    exported, tmp_path
):
    path = tmp_path / "births.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["mother_age", "gestation_weeks", "is_male"])
        writer.writeheader()
        writer.writerows(ROWS)
    done = predict("--tflite", str(exported / lite.FILES["float32"]), str(path))
    assert done.returncode == 1, done.stderr  # some rows refused
    results = list(csv.DictReader(io.StringIO(done.stdout)))
    signature = tf.saved_model.load(str(exported)).signatures["serving_raw"]
    for number, (row, result) in enumerate(zip(ROWS, results), start=1):
        try:
            instance = contract.to_instance(row)
        except ValueError as error:  # the server's contract, in its words
            assert result["error"] == f"row {number}: {error}" and result["prediction"] == ""
            continue
        expected = signature(
            **{
                name: tf.constant(array)
                for name, array in features.raw_columns([features.instance_key(instance)]).items()
            }
        )["predictions"].numpy()[0, 0]
        assert float(result["prediction"]) == pytest.approx(expected, abs=1e-5)
        assert result["model_version"] == "12" and result["error"] == ""
    assert [bool(r["error"]) for r in results] == [False, True, False, True, True]
    assert "missing required feature 'gestation_weeks'" in results[1]["error"]
    assert "2 of 5 row(s) of" in done.stderr and "3 refused" in done.stderr


def test_json_lines_and_the_float16_model_give_the_same_answers_within_its_precision(exported, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text(
        "".join(json.dumps({"mother_age": age, "gestation_weeks": 38, "plurality": 2}) + "\n" for age in range(18, 45))
    )
    answers = []
    for name in lite.FILES.values():
        done = predict("--tflite", str(exported / name), str(path), "--output", str(tmp_path / f"{name}.csv"))
        assert done.returncode == 0, done.stderr
        answers.append([float(r["prediction"]) for r in csv.DictReader((tmp_path / f"{name}.csv").open())])
    assert len(answers[0]) == 27
    assert answers[1] == pytest.approx(answers[0], abs=0.01)


def test_a_file_that_is_no_babyweight_tflite_model_is_named_with_what_is_wrong(exported, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("mother_age,gestation_weeks\n30,39\n")
    missing = predict("--tflite", str(tmp_path / "nothing.tflite"), str(rows))
    assert missing.returncode == 2 and f"{tmp_path / 'nothing.tflite'}: no such file" in missing.stderr
    not_tflite = predict("--tflite", str(exported / "saved_model.pb"), str(rows))
    assert not_tflite.returncode == 2 and "saved_model.pb is not a TensorFlow Lite model" in not_tflite.stderr
    # A TFLite model of another signature (from_concrete_functions names it serving_default).
    model = tf.saved_model.load(str(exported))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.signatures["serving_raw"]], model)
    (tmp_path / "other.tflite").write_bytes(converter.convert())
    other = predict("--tflite", str(tmp_path / "other.tflite"), str(rows))
    assert other.returncode == 2 and "has no serving_raw signature (it has serving_default)" in other.stderr


def test_a_version_or_label_makes_no_sense_for_a_file(exported, tmp_path):
    done = predict("--tflite", str(exported / lite.FILES["float32"]), "--label", "stable", "x.csv")
    assert done.returncode == 2 and "a TFLite file is one version" in done.stderr


def test_the_benchmark_measures_the_models_on_the_same_rows(tmp_path, capsys):
    from serving.bench import device_bench as bench_device

    version = toy_model.save(tmp_path / "serving_model" / "3", offset=1.0)
    for variant, name in lite.FILES.items():
        (version / name).write_bytes(lite.convert(str(version), variant))
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "mother_age,gestation_weeks,weight_pounds\n"
        + "".join(f"{age},{weeks},{age / 5:.1f}\n" for age in range(18, 48) for weeks in (30, 35, 39, 99))
    )
    assert bench_device.main(["--output-dir", str(tmp_path), "--input", str(rows), "--single-rows", "50"]) == 0
    results = json.loads((tmp_path / "bench" / "tflite.json").read_text())
    assert results["rows"] == 90  # the 30 rows at the 'unknown' code 99 are not requests
    assert list(results["models"]) == ["SavedModel", "TFLite float32", "TFLite float16", "TFLite dynamic range"]
    for title, figures in results["models"].items():
        assert figures["latency_p50_us"] > 0 and figures["batched_per_s"] > 0 and figures["rmse"] > 0
        assert figures["max_difference"] <= (1e-4 if title == "TFLite float32" else 0.01)
    assert results["models"]["TFLite float32"]["bytes"] == (version / lite.FILES["float32"]).stat().st_size
    assert "TFLite dynamic range" in capsys.readouterr().out
    (version / lite.FILES["float16"]).unlink()
    assert bench_device.main(["--output-dir", str(tmp_path), "--input", str(rows)]) == 1
    assert "version 3 has no babyweight_float16.tflite" in capsys.readouterr().err


def test_a_number_written_as_nan_is_no_value_on_every_path():
    """Some tools write a missing number as 'nan': no value for the device, predict --url (JSON has no NaN to
    send: the server would refuse the whole body) and predict-batch alike."""
    assert contract.to_instance({"mother_age": "30", "gestation_weeks": "39", "father_age": "nan"}) == {
        "mother_age": 30,
        "gestation_weeks": 39,
    }
    with pytest.raises(ValueError, match="missing required feature 'gestation_weeks'"):
        contract.to_instance({"mother_age": "30", "gestation_weeks": "NaN"})
