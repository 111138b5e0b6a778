"""The model on a device: the TFLite export of a pushed version, run by the TensorFlow Lite interpreter alone.

    babyweight predict --tflite outputs/serving_model/VERSION/babyweight.tflite FILE

The pipeline's TFLiteExporter (pipeline/components/tflite_export.py) writes `babyweight.tflite` (float32) and
`babyweight_float16.tflite` (float16 weights) beside each pushed SavedModel: the `serving_raw` signature, the
transform graph included, in TensorFlow Lite's builtin ops only, so the `tflite-runtime` package (2.4 MB, NumPy its
only dependency; no TensorFlow, no TFX) runs it as a phone or a clinic's tablet would. The serving contract is the
server's (contract.to_instance: types, required features, 'unknown' codes), applied before the model is called:
TensorFlow Lite drops the SavedModel's own check of required features, so a row the server refuses is refused here,
in the same words, and never predicted.
"""

import pathlib
from typing import Any, Dict, List, Sequence

import numpy

from models import features, lite
from serving.core import contract


class DeviceModel(lite.LiteModel):
    """A pushed version's TFLite file, run by the tflite-runtime interpreter alone, as on a device."""

    def __init__(self, path: str, threads: int = 1):
        super().__init__(path=path, threads=threads)
        self.path = str(path)

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
    results = [
        {"row": number, "prediction": "", "model_version": "", "error": ""} for number in range(1, len(rows) + 1)
    ]
    ready = []
    for index, row in enumerate(rows):
        try:
            ready.append((index, features.instance_key(contract.to_instance(row))))
        except ValueError as error:
            results[index]["error"] = f"row {index + 1}: {error}"
    for start in range(0, len(ready), batch_size):
        batch = ready[start : start + batch_size]
        predictions = model.predict_keys([key for _, key in batch])
        for (index, _), prediction, good in zip(batch, predictions, features.predicted(predictions)):
            if good:
                results[index].update(prediction=float(prediction), model_version=version)
            else:  # no prediction (predict-batch and predict --url reject such an answer too)
                results[index]["error"] = f"row {index + 1}: {features.not_a_prediction(prediction)}"
    return results
