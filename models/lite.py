"""The exported model for devices: its serving_raw signature as TensorFlow Lite models of builtin ops only.

The pipeline converts each pushed model and checks it (pipeline/components/tflite_export.py),
`babyweight predict --tflite` runs the files (serving/clients/device.py), `make bench-tflite` measures them
(serving/bench/device_bench.py). Builtin ops only:
the `tflite-runtime` interpreter has no Flex delegate for TensorFlow's own ops (docs/on-device.md). Importing this
module imports no TensorFlow: a device has none.
"""

import logging
import os
import pathlib
import sys
import tempfile
from typing import Dict, Optional

import numpy

SIGNATURE = "serving_raw"  # the exported model's signature of raw features, the transform graph inside
PREDICTIONS = "predictions"  # the output of its signatures
# The files beside a pushed SavedModel: float32 weights, and float16 weights (about 60% of the size).
FILES: Dict[str, str] = {"float32": "babyweight.tflite", "float16": "babyweight_float16.tflite"}
# Every conversion `convert` makes: the two shipped, and int8 weights (dynamic range), measured but not shipped.
QUANTIZATIONS = ("float32", "float16", "dynamic_range")


class LiteModelError(RuntimeError):
    """A TFLite model can't be run: missing, not a TFLite model, without the serving_raw signature, or refusing
    its inputs; the message names the file."""


def convert(saved_model_dir: str, quantization: str) -> bytes:
    """The SavedModel's serving_raw signature as a TFLite model of builtin ops, its weights as `quantization` says."""
    import tensorflow as tf

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: int8 weights, computed in float
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    # The converter's C++ writes its notes ("Ignored output_format", ...) to stderr: into the log instead, as a
    # warning if the conversion fails.
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError):  # no stderr to redirect
        return converter.convert()
    failed = True
    with tempfile.TemporaryFile() as notes:
        os.dup2(notes.fileno(), 2)
        try:
            model = converter.convert()
            failed = False
            return model
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            notes.seek(0)
            text = notes.read().decode(errors="replace").strip()
            if text:
                logging.log(
                    logging.WARNING if failed else logging.INFO, "TFLite converter (%s): %s", quantization, text
                )


class LiteModel:
    """A TFLite model (a file, or its bytes), loaded once by the `tflite-runtime` interpreter on `threads` threads,
    predicting serving_raw's inputs (features.raw_columns). With `tensorflow_fallback`, TensorFlow's own interpreter
    (the same builtin kernels) stands in where tflite-runtime has no wheel (macOS): the pipeline's check may use it,
    a device may not."""

    def __init__(
        self,
        path: Optional[str] = None,
        content: Optional[bytes] = None,
        threads: int = 1,
        tensorflow_fallback: bool = False,
    ):
        self.name = str(path) if path is not None else "the converted model"
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            if not tensorflow_fallback:
                raise LiteModelError(
                    "the TensorFlow Lite interpreter is not installed: pip install tflite-runtime"
                ) from None
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter
        if path is not None and not pathlib.Path(path).is_file():
            raise LiteModelError(f"{path}: no such file")
        try:
            interpreter = Interpreter(
                model_path=str(path) if path is not None else None, model_content=content, num_threads=threads
            )
        except ValueError as error:
            raise LiteModelError(f"{self.name} is not a TensorFlow Lite model: {error}") from None
        signatures = interpreter.get_signature_list()
        if SIGNATURE not in signatures:
            raise LiteModelError(
                f"{self.name} has no {SIGNATURE} signature (it has "
                f"{', '.join(signatures) or 'none'}): it is not a babyweight TFLite export"
            )
        self.runner = interpreter.get_signature_runner(SIGNATURE)

    def predict_columns(self, columns: Dict[str, numpy.ndarray]) -> numpy.ndarray:
        """Predictions for serving_raw's inputs, one per row."""
        try:
            return self.runner(**columns)[PREDICTIONS].reshape(-1)
        except (ValueError, RuntimeError, KeyError) as error:  # inputs of other names or types than the model's
            raise LiteModelError(
                f"{self.name} can't predict the model's features ({', '.join(columns)}): {error!r}"
            ) from None
