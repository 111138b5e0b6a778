"""TFLite export: each pushed model as TensorFlow Lite models for devices, the transform graph inside.

After the Pusher, the pushed model's `serving_raw` signature (raw features in, the transform graph and the Keras
model inside) is converted twice with TensorFlow Lite's builtin ops only (models/lite.py), so that the
`tflite-runtime` interpreter runs it on a device (serving/clients/device.py):

    babyweight.tflite           float32
    babyweight_float16.tflite   float16 weights, about 60% of the size (dynamic-range int8 weights moved one real
                                row by 0.2 lb, float16 by under 0.01 lb: docs/on-device.md)

Both are checked against the SavedModel on the new span's eval rows the serving contract accepts (the rows a
server would answer), run by the TFLite interpreter, before they are pushed:

    float32   every prediction within MAX_FLOAT32_DIFFERENCE lb of the SavedModel's
    float16   RMSE within MAX_FLOAT16_RMSE_INCREASE lb of the SavedModel's RMSE on the same (labelled) rows, and
              every prediction within MAX_FLOAT16_DIFFERENCE lb of the SavedModel's

If both pass, the files are written beside the SavedModel that is served: locally in the pushed version's folder
(TFX's Pusher's `pushed_destination`), next to saved_model.pb; on Vertex in the folder Vertex AI's model was
uploaded from (the PushedModel artifact's own folder, the model's artifactUri). Each is written under a temporary
name and then renamed, so a device never fetches half a file. The artifact (TFLiteModel) holds the files and the
record (tflite_export.json) whatever the verdict; ML Metadata links it to the model and the push it came from.
A conversion or check that fails is recorded, not raised: the SavedModel is pushed and served, and the steps after
this one (BulkInferrer) still run; the summary says why there are no device models.
"""

import json
import logging
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tfx import types
from tfx import v1 as tfx
from tfx.utils import io_utils, path_utils

from models import features, lite
from pipeline.artifacts import EVAL_SPLIT, TFLITE_MODEL_TYPE

RECORD_FILE = "tflite_export.json"
MAX_FLOAT32_DIFFERENCE = 0.01  # lb, any one row
MAX_FLOAT16_RMSE_INCREASE = 0.005  # lb, over the eval rows
MAX_FLOAT16_DIFFERENCE = 0.05  # lb, any one row (float16 weights move rows by under 0.01 lb, int8 ones by 0.2)
PARITY_ROWS = 20_000  # eval rows predicted by all three models (the bundled run has about 4,000)
BATCH = 4096


class TFLiteModel(types.Artifact):
    """A pushed model as TensorFlow Lite models (float32 and float16) and the record of their check."""

    TYPE_NAME = TFLITE_MODEL_TYPE


def saved_model_predictions(saved_model_dir: str, columns: Dict[str, np.ndarray]) -> np.ndarray:
    """serving_raw of the SavedModel on serving_raw's inputs, in batches."""
    import tensorflow as tf

    signature = tf.saved_model.load(saved_model_dir).signatures[lite.SIGNATURE]
    return _in_batches(
        lambda batch: (
            signature(**{name: tf.constant(array) for name, array in batch.items()})[lite.PREDICTIONS]
            .numpy()
            .reshape(-1)
        ),
        columns,
    )


def tflite_predictions(model: bytes, columns: Dict[str, np.ndarray]) -> np.ndarray:
    """serving_raw of a TFLite model, run by the tflite-runtime interpreter as on a device, in batches."""
    return _in_batches(lite.LiteModel(content=model, tensorflow_fallback=True).predict_columns, columns)


def _in_batches(predict: Any, columns: Dict[str, np.ndarray]) -> np.ndarray:
    rows = len(next(iter(columns.values())))
    return np.concatenate(
        [
            predict({name: array[start : start + BATCH] for name, array in columns.items()})
            for start in range(0, rows, BATCH)
        ]
    )


def accepted_rows(rows: Sequence[Dict[str, Any]]) -> Tuple[List[features.InstanceKey], np.ndarray]:
    """The rows (baseline.read_examples' records) that the serving contract accepts, as instance keys, and
    their labels (NaN where a row has none)."""
    from pipeline.components.infra_validator import instance_of

    keys, labels = [], []
    for row in rows:
        instance = instance_of(row)
        if not features.missing_required(instance):
            keys.append(features.instance_key(instance))
            labels.append(row[features.LABEL.name])
    return keys, np.array(labels, np.float64)


def rmse(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Root mean squared error over the rows that have a label (NaN if none has)."""
    known = ~np.isnan(labels)
    return float(np.sqrt(np.mean((predictions[known] - labels[known]) ** 2))) if known.any() else float("nan")


def check(reference: np.ndarray, float32: np.ndarray, float16: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
    """The parity figures and the two checks' verdicts (the module's docstring), on one row or more."""
    difference = np.abs(float32 - reference)
    worst = int(np.argmax(difference))
    figures = {
        "rows": len(reference),
        "labelled_rows": int((~np.isnan(labels)).sum()),
        "float32_max_difference": float(difference.max()),
        "float16_max_difference": float(np.abs(float16 - reference).max()),
        "rmse_saved_model": rmse(reference, labels),
        "rmse_float32": rmse(float32, labels),
        "rmse_float16": rmse(float16, labels),
    }
    finite = bool(np.isfinite(float32).all() and np.isfinite(float16).all())
    increase = figures["rmse_float16"] - figures["rmse_saved_model"]
    float16_close = figures["float16_max_difference"] <= MAX_FLOAT16_DIFFERENCE
    checks = [
        {
            "name": "float32",
            "passed": finite and figures["float32_max_difference"] <= MAX_FLOAT32_DIFFERENCE,
            "figure": f"largest difference from the SavedModel {figures['float32_max_difference']:.6f} lb "
            f"(row {worst + 1} of {len(reference)}; limit {MAX_FLOAT32_DIFFERENCE} lb)",
        },
        {
            "name": "float16",
            "passed": finite
            and float16_close
            and not np.isnan(increase)
            and abs(increase) <= MAX_FLOAT16_RMSE_INCREASE,
            "figure": (
                f"RMSE {figures['rmse_float16']:.4f} lb against the SavedModel's "
                f"{figures['rmse_saved_model']:.4f} lb on {figures['labelled_rows']} labelled rows "
                f"(limit ±{MAX_FLOAT16_RMSE_INCREASE} lb)"
                if figures["labelled_rows"]
                else "RMSE not judged: no eval row has a label to compare RMSEs on"
            )
            + f"; largest difference {figures['float16_max_difference']:.4f} lb "
            f"(limit {MAX_FLOAT16_DIFFERENCE} lb)",
        },
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


VERTEX_RESOURCE = re.compile(r"^projects/[^/]+/locations/")


def served_folder(pushed_model: types.Artifact, model_dir: str) -> Tuple[Optional[str], str]:
    """The folder of the SavedModel that is served, or None and why not. TFX's filesystem Pusher records its version
    folder, which must hold this model (it skips the copy if the folder exists: a push in the same second); Vertex
    AI's, a resource name: its model was uploaded from the PushedModel's own folder."""
    destination = pushed_model.get_string_custom_property("pushed_destination")
    if VERTEX_RESOURCE.match(destination):
        return pushed_model.uri, ""
    if not _same_savedmodel(destination, model_dir):
        return None, f"{destination} does not hold this model's SavedModel"
    return destination, ""


def _same_savedmodel(folder: str, model_dir: str) -> bool:
    """Whether `folder` holds the SavedModel of `model_dir`: the same graph and the same variables, byte for byte."""
    import tensorflow as tf

    def content(path: str) -> bytes:
        with tf.io.gfile.GFile(path, "rb") as handle:
            return handle.read()

    variables = (
        [f"variables/{name}" for name in tf.io.gfile.listdir(os.path.join(model_dir, "variables"))]
        if tf.io.gfile.isdir(os.path.join(model_dir, "variables"))
        else []
    )
    for name in ["saved_model.pb"] + variables:
        theirs = os.path.join(folder, name)
        if not tf.io.gfile.exists(theirs) or content(os.path.join(model_dir, name)) != content(theirs):
            return False
    return True


def read(uri: str) -> Dict[str, Any]:
    """The record a TFLiteExporter wrote: pushed or not and why, the files, the parity figures and checks."""
    return json.loads(io_utils.read_string_file(os.path.join(uri, RECORD_FILE)))


def _export(
    model_dir: str, pushed_model: types.Artifact, examples: types.Artifact, uri: str, record: Dict[str, Any]
) -> None:
    """Converts, checks and (if both checks pass) pushes; fills `record` as it goes."""
    from pipeline.components.baseline import read_examples, split_files

    started = time.time()
    models = {variant: lite.convert(model_dir, variant) for variant in lite.FILES}
    record["seconds_to_convert"] = round(time.time() - started, 2)
    for variant, content in models.items():
        io_utils.write_bytes_file(os.path.join(uri, lite.FILES[variant]), content)
        record["files"][variant] = {"name": lite.FILES[variant], "bytes": len(content)}
    keys, labels = accepted_rows(read_examples(split_files(examples, EVAL_SPLIT), limit=PARITY_ROWS).to_dict("records"))
    if not keys:
        record["skipped"] = "no eval row the serving contract accepts to check them on"
        return
    columns = features.raw_columns(keys)
    record.update(
        check(
            saved_model_predictions(model_dir, columns),
            tflite_predictions(models["float32"], columns),
            tflite_predictions(models["float16"], columns),
            labels,
        )
    )
    failed = [item["name"] for item in record["checks"] if not item["passed"]]
    if failed:
        record["skipped"] = f"the {' and '.join(failed)} check{'s' if len(failed) > 1 else ''} failed (below)"
        return
    folder, why_not = served_folder(pushed_model, model_dir)
    if folder is None:
        record["skipped"] = why_not
        return
    write_beside(folder, {lite.FILES[variant]: content for variant, content in models.items()})
    record.update(pushed=True, destination=folder)


@tfx.dsl.components.component
def TFLiteExporter(
    model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Model],
    pushed_model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.PushedModel],
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    tflite_model: tfx.dsl.components.OutputArtifact[TFLiteModel],
    code_fingerprint: tfx.dsl.components.Parameter[str],  # pipeline/cache.py: reruns the step when its code changes
) -> None:
    """Converts the pushed `model` to TFLite (float32, float16), checks both against it, pushes them beside it."""
    record: Dict[str, Any] = {"pushed": False, "checks": [], "figures": {}, "files": {}}
    if pushed_model.get_int_custom_property("pushed") != 1:
        record["skipped"] = "the model was not pushed, so it was not exported"
    else:
        model_dir = path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))
        try:
            _export(model_dir, pushed_model, examples, tflite_model.uri, record)
        except Exception as error:  # the SavedModel is pushed and served: record why its device models are not
            logging.exception("TFLite export of %s failed", model_dir)
            record["skipped"] = f"the export failed: {error!r}"[:2000]
    io_utils.write_string_file(os.path.join(tflite_model.uri, RECORD_FILE), json.dumps(record, indent=1))
    tflite_model.set_int_custom_property("pushed", int(record["pushed"]))
    tflite_model.set_string_custom_property("destination", record.get("destination", ""))
    tflite_model.set_string_custom_property(
        "failed_checks", ",".join(c["name"] for c in record["checks"] if not c["passed"])
    )
    for name, value in record["figures"].items():
        if not math.isnan(value):  # ML Metadata stores no NaN (an RMSE without labelled rows)
            tflite_model.set_float_custom_property(name, value)
    for variant, described in record["files"].items():
        tflite_model.set_int_custom_property(f"{variant}_bytes", described["bytes"])
    for item in record["checks"]:
        logging.log(
            logging.INFO if item["passed"] else logging.WARNING,
            "TFLite %s check: %s: %s",
            item["name"],
            "passed" if item["passed"] else "FAILED",
            item["figure"],
        )
