"""The model on a device: the TFLite export of a pushed version, run by the TensorFlow Lite interpreter alone.

    babyweight predict --tflite outputs/serving_model/VERSION/babyweight.tflite FILE

The pipeline's TFLiteExporter (pipeline/tflite_export.py) writes `babyweight.tflite` (float32) and
`babyweight_float16.tflite` (float16 weights) beside each pushed SavedModel: the `serving_raw` signature, the
transform graph included, in TensorFlow Lite's builtin ops only, so the `tflite-runtime` package (2.4 MB, NumPy its
only dependency; no TensorFlow, no TFX) runs it as a phone or a clinic's tablet would. The serving contract is the
server's (client.to_instance: types, required features, 'unknown' codes), applied before the model is called:
TensorFlow Lite drops the SavedModel's own check of required features, so a row the server refuses is refused here,
in the same words, and never predicted.
"""
import pathlib
from typing import Any, Dict, List, Sequence

import numpy

from models import features, lite
from serving import client


class DeviceModelError(RuntimeError):
    """The TFLite file can't be run: missing, not a TFLite model, or without the serving_raw signature."""


class DeviceModel:
    """A TFLite export, loaded once, predicting batches of instances through its serving_raw signature."""

    def __init__(self, path: str, threads: int = 1):
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise DeviceModelError("the TensorFlow Lite interpreter is not installed: pip install tflite-runtime") \
                from None
        if not pathlib.Path(path).is_file():
            raise DeviceModelError(f"{path}: no such file")
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        except ValueError as error:
            raise DeviceModelError(f"{path} is not a TensorFlow Lite model: {error}") from None
        signatures = self.interpreter.get_signature_list()
        if lite.SIGNATURE not in signatures:
            raise DeviceModelError(f"{path} has no {lite.SIGNATURE} signature (it has "
                                   f"{', '.join(signatures) or 'none'}): it is not a babyweight TFLite export")
        self.runner = self.interpreter.get_signature_runner(lite.SIGNATURE)
        self.path = str(path)

    def predict_columns(self, columns: Dict[str, numpy.ndarray]) -> numpy.ndarray:
        """Predictions for serving_raw's inputs (features.raw_columns), one per row."""
        try:
            return self.runner(**columns)[lite.PREDICTIONS].reshape(-1)
        except (ValueError, RuntimeError, KeyError) as error:  # inputs of other names or types than the model's
            raise DeviceModelError(f"{self.path} can't predict the model's features ({', '.join(columns)}): "
                                   f"{error!r}") from None

    def predict_keys(self, keys: Sequence[features.InstanceKey]) -> numpy.ndarray:
        """Predictions for instances already checked against the serving contract (features.instance_key)."""
        return self.predict_columns(features.raw_columns(keys))


def version_of(path: str) -> str:
    """The version a TFLite file was pushed with: its folder's name (serving_model/VERSION/babyweight.tflite)."""
    folder = pathlib.Path(path).resolve().parent.name
    return folder if folder.isdigit() else pathlib.Path(path).name


def predict_rows(model: DeviceModel, rows: List[Dict[str, Any]], batch_size: int) -> List[Dict[str, Any]]:
    """One result per row: {"row", "prediction", "model_version", "error"}, as `babyweight predict --url` gives."""
    version = version_of(model.path)
    results = [{"row": number, "prediction": "", "model_version": "", "error": ""}
               for number in range(1, len(rows) + 1)]
    ready = []
    for index, row in enumerate(rows):
        try:
            ready.append((index, features.instance_key(client.to_instance(row))))
        except ValueError as error:
            results[index]["error"] = f"row {index + 1}: {error}"
    for start in range(0, len(ready), batch_size):
        batch = ready[start:start + batch_size]
        predictions = model.predict_keys([key for _, key in batch])
        for (index, _), prediction in zip(batch, predictions):
            if numpy.isfinite(prediction):
                results[index].update(prediction=float(prediction), model_version=version)
            else:  # no prediction (predict-batch rejects such an answer too)
                results[index]["error"] = f"row {index + 1}: the model answered {prediction}"
    return results
