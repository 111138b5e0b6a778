"""TFLite export: each pushed model as a TensorFlow Lite model for devices, the transform graph inside.

After the Pusher, the pushed model's `serving_raw` signature (raw features in, the transform graph and the Keras
model inside) is converted twice with TensorFlow Lite's builtin ops only, so that the `tflite-runtime` interpreter
(no TensorFlow, no Flex delegate) runs it on a device (serving/device.py):

    babyweight.tflite           float32
    babyweight_float16.tflite   float16 weights, about 60% of the size (dynamic-range int8 was tried: up to 0.2 lb
                                from the float32 model on one row, against 0.007 lb for float16; README, TFLite)

Both are checked against the SavedModel on the new span's eval rows the serving contract accepts (the rows a
server would answer), run by the TFLite interpreter, before they are pushed:

    float32   every prediction within MAX_FLOAT32_DIFFERENCE lb of the SavedModel's
    float16   RMSE within MAX_FLOAT16_RMSE_INCREASE lb of the SavedModel's RMSE on the same rows

If both pass, the files are written beside the pushed SavedModel (locally: in its version folder, next to
saved_model.pb; on Vertex: tflite_dir/VERSION/), each under a temporary name and then renamed, so a device never
fetches half a file. The artifact (TFLiteModel) holds the files and the record (tflite_export.json) whatever the
verdict; ML Metadata links it to the model and the push it came from.
"""
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from tfx import types
from tfx import v1 as tfx
from tfx.utils import io_utils, path_utils

from models import features
from pipeline.artifacts import EVAL_SPLIT, TFLITE_MODEL_TYPE

RECORD_FILE = "tflite_export.json"
SIGNATURE = "serving_raw"
PREDICTIONS = "predictions"
MAX_FLOAT32_DIFFERENCE = 0.01  # lb, any one row
MAX_FLOAT16_RMSE_INCREASE = 0.005  # lb, over the eval rows
PARITY_ROWS = 20_000  # eval rows predicted by all three models (the bundled run has about 4,000)
BATCH = 4096


class TFLiteModel(types.Artifact):
    """A pushed model as TensorFlow Lite models (float32 and float16) and the record of their check."""

    TYPE_NAME = TFLITE_MODEL_TYPE


def convert(saved_model_dir: str, float16: bool) -> bytes:
    """The SavedModel's serving_raw signature as a TFLite model of builtin ops; float16 weights if asked."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex: tflite-runtime runs it
    if float16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def saved_model_predictions(saved_model_dir: str, columns: Dict[str, np.ndarray]) -> np.ndarray:
    """serving_raw of the SavedModel on serving_raw's inputs, in batches."""
    import tensorflow as tf

    signature = tf.saved_model.load(saved_model_dir).signatures[SIGNATURE]
    rows = len(next(iter(columns.values())))
    return np.concatenate([signature(**{name: tf.constant(array[start:start + BATCH])
                                        for name, array in columns.items()})[PREDICTIONS].numpy().reshape(-1)
                           for start in range(0, rows, BATCH)])


def tflite_predictions(model: bytes, columns: Dict[str, np.ndarray]) -> np.ndarray:
    """serving_raw of a TFLite model, run by the tflite-runtime interpreter as on a device, in batches."""
    from tflite_runtime.interpreter import Interpreter

    runner = Interpreter(model_content=model).get_signature_runner(SIGNATURE)
    rows = len(next(iter(columns.values())))
    return np.concatenate([runner(**{name: array[start:start + BATCH] for name, array in columns.items()})
                           [PREDICTIONS].reshape(-1) for start in range(0, rows, BATCH)])


def accepted_rows(rows: Sequence[Dict[str, Any]]) -> Tuple[List[features.InstanceKey], np.ndarray]:
    """The rows (baseline.read_examples' records) that the serving contract accepts, as instance keys, and
    their labels (NaN where a row has none)."""
    from pipeline.infra_validator import instance_of

    keys, labels = [], []
    for row in rows:
        instance = instance_of(row)
        if not features.missing_required(instance):
            keys.append(features.instance_key(instance))
            labels.append(row[features.LABEL.name])
    return keys, np.array(labels, np.float64)


def rmse(predictions: np.ndarray, labels: np.ndarray) -> float:
    known = ~np.isnan(labels)
    return float(np.sqrt(np.mean((predictions[known] - labels[known]) ** 2))) if known.any() else float("nan")


def check(reference: np.ndarray, float32: np.ndarray, float16: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
    """The parity figures and the two checks' verdicts (the module's docstring)."""
    difference = np.abs(float32 - reference)
    worst = int(np.argmax(difference)) if len(difference) else 0
    figures = {
        "rows": len(reference),
        "labelled_rows": int((~np.isnan(labels)).sum()),
        "float32_max_difference": float(difference.max()) if len(difference) else 0.0,
        "float16_max_difference": float(np.abs(float16 - reference).max()) if len(reference) else 0.0,
        "rmse_saved_model": rmse(reference, labels),
        "rmse_float32": rmse(float32, labels),
        "rmse_float16": rmse(float16, labels),
    }
    finite = bool(np.isfinite(float32).all() and np.isfinite(float16).all())
    increase = figures["rmse_float16"] - figures["rmse_saved_model"]
    checks = [
        {"name": "float32", "passed": finite and figures["float32_max_difference"] <= MAX_FLOAT32_DIFFERENCE,
         "figure": f"largest difference from the SavedModel {figures['float32_max_difference']:.6f} lb "
                   f"(row {worst + 1} of {len(reference)}; limit {MAX_FLOAT32_DIFFERENCE} lb)"},
        {"name": "float16", "passed": finite and not np.isnan(increase) and abs(increase) <= MAX_FLOAT16_RMSE_INCREASE,
         "figure": f"RMSE {figures['rmse_float16']:.4f} lb against the SavedModel's {figures['rmse_saved_model']:.4f} lb "
                   f"on {figures['labelled_rows']} labelled rows (limit ±{MAX_FLOAT16_RMSE_INCREASE} lb)"
                   if figures["labelled_rows"] else "not judged: no eval row has a label to compare RMSEs on"},
    ]
    if not finite:
        checks[0]["figure"] += "; a TFLite model answered NaN or infinity"
    return {"figures": figures, "checks": checks}


def write_beside(folder: str, files: Dict[str, bytes]) -> None:
    """Writes each file into `folder` under a temporary name, then renames it: never half a file under its name."""
    import tensorflow as tf

    tf.io.gfile.makedirs(folder)
    for name, content in files.items():
        temporary = os.path.join(folder, f".{name}.incomplete")
        with tf.io.gfile.GFile(temporary, "wb") as handle:
            handle.write(content)
        tf.io.gfile.rename(temporary, os.path.join(folder, name), overwrite=True)


def read(uri: str) -> Dict[str, Any]:
    """The record a TFLiteExporter wrote: pushed or not and why, the files, the parity figures and checks."""
    return json.loads(io_utils.read_string_file(os.path.join(uri, RECORD_FILE)))


@tfx.dsl.components.component
def TFLiteExporter(
    model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Model],
    pushed_model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.PushedModel],
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    tflite_model: tfx.dsl.components.OutputArtifact[TFLiteModel],
    code_fingerprint: tfx.dsl.components.Parameter[str],  # pipeline/cache.py: reruns the step when its code changes
    destination: tfx.dsl.components.Parameter[str],  # config.tflite_dir: the files go to destination/VERSION/
) -> None:
    """Converts the pushed `model` to TFLite (float32, float16), checks both against it, pushes them beside it."""
    from pipeline.baseline import read_examples, split_files

    record: Dict[str, Any] = {"pushed": False, "checks": [], "figures": {}, "files": {}}
    if pushed_model.get_int_custom_property("pushed") != 1:
        record["skipped"] = "the model was not pushed, so it was not exported"
    else:
        model_dir = path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))
        started = time.time()
        models = {variant: convert(model_dir, float16=variant == "float16") for variant in features.TFLITE_FILES}
        record["seconds_to_convert"] = round(time.time() - started, 2)
        files = {features.TFLITE_FILES[variant]: content for variant, content in models.items()}
        for variant, content in models.items():
            io_utils.write_bytes_file(os.path.join(tflite_model.uri, features.TFLITE_FILES[variant]), content)
            record["files"][variant] = {"name": features.TFLITE_FILES[variant], "bytes": len(content)}
        keys, labels = accepted_rows(read_examples(split_files(examples, EVAL_SPLIT), limit=PARITY_ROWS)
                                     .to_dict("records"))
        columns = features.raw_columns(keys)
        verdict = check(saved_model_predictions(model_dir, columns),
                        tflite_predictions(models["float32"], columns), tflite_predictions(models["float16"], columns),
                        labels)
        record.update(verdict)
        version = pushed_model.get_string_custom_property("pushed_version") or str(int(time.time()))
        record["version"] = version
        if keys and all(c["passed"] for c in verdict["checks"]):
            folder = os.path.join(destination, version)
            write_beside(folder, files)
            record.update(pushed=True, destination=folder)
        else:
            record["skipped"] = ("no eval row the serving contract accepts to check them on" if not keys else
                                 "the TFLite models predict unlike the SavedModel, so they were not pushed")
    io_utils.write_string_file(os.path.join(tflite_model.uri, RECORD_FILE), json.dumps(record, indent=1))
    tflite_model.set_int_custom_property("pushed", int(record["pushed"]))
    tflite_model.set_string_custom_property("destination", record.get("destination", ""))
    tflite_model.set_string_custom_property("failed_checks", ",".join(c["name"] for c in record["checks"]
                                                                      if not c["passed"]))
    for name, value in record["figures"].items():
        if not math.isnan(value):  # ML Metadata stores no NaN (an RMSE without labelled rows)
            tflite_model.set_float_custom_property(name, value)
    for variant, described in record["files"].items():
        tflite_model.set_int_custom_property(f"{variant}_bytes", described["bytes"])
    for item in record["checks"]:
        logging.log(logging.INFO if item["passed"] else logging.WARNING, "TFLite %s check: %s: %s",
                    item["name"], "passed" if item["passed"] else "FAILED", item["figure"])
