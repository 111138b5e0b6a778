"""The exported model for devices: its serving_raw signature as TensorFlow Lite models of builtin ops only.

The pipeline converts each pushed model (pipeline/tflite_export.py), `babyweight predict --tflite` runs the files
(serving/device.py), `make bench-tflite` measures them (serving/bench_device.py). Builtin ops only: the
`tflite-runtime` interpreter has no Flex delegate for TensorFlow's own ops (README, TFLite). Importing this module
imports no TensorFlow: a device has none.
"""
from typing import Dict

SIGNATURE = "serving_raw"  # models/model.py's signature of raw features, the transform graph inside
PREDICTIONS = "predictions"  # its output
# The files beside a pushed SavedModel: float32 weights, and float16 weights (about 60% of the size).
FILES: Dict[str, str] = {"float32": "babyweight.tflite", "float16": "babyweight_float16.tflite"}
# Every conversion `convert` makes: the two shipped, and int8 weights (dynamic range), measured but not shipped.
QUANTIZATIONS = ("float32", "float16", "dynamic_range")


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
    return converter.convert()
