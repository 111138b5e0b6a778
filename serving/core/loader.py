"""Loads one version of the model, checks it, warms it up and builds its prediction table.

A version is ready only when all of that has worked: a manager (serving/core/manager.py) never hands out a version
that is still loading or that failed to load.
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2

from models import features, lite
from serving.core import cache, contract

PREDICTIONS = lite.PREDICTIONS
WARMUP_BATCHES = (1, 64)  # batch shapes run once before a version takes traffic
# The version's TFLite model answers in place of its SavedModel only as close to it as this, on every warm-up
# instance (the pipeline's float32 export differs by about 0.000002 lb; its own check allows 0.01 lb a row).
LITE_MAX_DIFFERENCE = 1e-4  # lb
TENSORFLOW, TFLITE = "tensorflow", "tflite"  # a version's runtime
PROBE_HEAD = 48  # frequent instances among a second runtime's probes (`probes`)


class LoadError(RuntimeError):
    """A version can't be served; the message says why (missing files, a broken graph, a wrong signature).
    `transient`: the storage failed (unreachable, timed out, refused), not the version's files."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


# Storage errors a retry may not meet again (a bucket's 503, a timeout): not the version's fault.
TRANSIENT_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.PermissionDeniedError,
    tf.errors.ResourceExhaustedError,
)


@dataclasses.dataclass
class LoadedVersion:
    """One version in memory, ready to answer: its signatures, metadata and prediction table."""

    version: int
    path: str
    predict_keys: Callable[[Sequence[features.InstanceKey]], numpy.ndarray]
    signature_defs: Dict[str, Any]  # TF Serving's metadata JSON of the signatures
    table: cache.PredictionTable
    seconds_to_load: float
    model: Any = dataclasses.field(repr=False, default=None)  # keeps the SavedModel's objects alive
    runtime: str = TENSORFLOW  # what answers the model calls: the SavedModel, or its TFLite model (TFLITE)
    probes: List[features.InstanceKey] = dataclasses.field(repr=False, default_factory=list)  # `probes(head)`


def first_reason(message: str) -> str:
    """The line of a TensorFlow error that says what is wrong (an assertion's text), not where."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if "assertion failed" in line), lines[-1] if lines else message)


def columns_of(keys: Sequence[features.InstanceKey]) -> Dict[str, tf.Tensor]:
    """serving_raw's inputs as tensors (features.raw_columns)."""
    return {name: tf.constant(array) for name, array in features.raw_columns(keys).items()}


def _signature_defs(path: str) -> Dict[str, Any]:
    """The SavedModel's signatures as TF Serving's GetModelMetadata answers them."""
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as handle:
        saved_model.ParseFromString(handle.read())
    signatures = saved_model.meta_graphs[0].signature_def
    return {
        "signature_def": {
            name: json_format.MessageToDict(signatures[name], preserving_proto_field_name=True)
            for name in contract.SIGNATURES
            if name in signatures
        }
    }


_NUMBERS = [index for index, column in enumerate(features.FEATURES) if column.dtype != "string"]
_TEXTS = [index for index, column in enumerate(features.FEATURES) if column.dtype == "string"]


def _fast_call(function: Any) -> Callable[[Sequence[features.InstanceKey]], numpy.ndarray]:
    """The signature called with two tensors (the numbers, the texts) rather than one per feature.

    A loaded signature's public call converts, sorts and checks each keyword argument on every call, which
    costs about a third of the model itself for one instance. This wraps the signature in a function of two
    inputs and calls it with `_call_flat`, TensorFlow's private API: so a version uses it only after it gave
    the public call's answers at warm-up (`load`).
    """
    names = [column.name for column in features.FEATURES]

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, len(_NUMBERS)], tf.float32),
            tf.TensorSpec([None, len(_TEXTS)], tf.string),
        ]
    )
    def packed(numbers: tf.Tensor, texts: tf.Tensor) -> tf.Tensor:
        columns = {names[index]: numbers[:, place] for place, index in enumerate(_NUMBERS)}
        columns.update({names[index]: texts[:, place] for place, index in enumerate(_TEXTS)})
        return function(**columns)[PREDICTIONS]

    concrete = packed.get_concrete_function()
    flat, captured = concrete._call_flat, concrete.captured_inputs  # noqa: SLF001 (checked at warm-up)

    def call(keys: Sequence[features.InstanceKey]) -> numpy.ndarray:
        numbers = numpy.array(
            [[numpy.nan if key[i] is None else key[i] for i in _NUMBERS] for key in keys], numpy.float32
        )
        texts = numpy.array([["" if key[i] is None else key[i] for i in _TEXTS] for key in keys], object)
        return flat([tf.constant(numbers), tf.constant(texts)], captured).numpy().reshape(-1)

    return call


def lite_file(path: str) -> str:
    """Where the pipeline writes a pushed version's float32 TFLite model (lite.FILES)."""
    return os.path.join(path, lite.FILES["float32"])


def _lite_call(
    path: str, version: int, probes: Sequence[features.InstanceKey], reference: Callable
) -> Optional[Callable[[Sequence[features.InstanceKey]], numpy.ndarray]]:
    """The version's float32 TFLite model as its model call, once it answered the probes (one at a time, then all
    together) within LITE_MAX_DIFFERENCE of the SavedModel (`reference`); None (logged) where there is no such file,
    it can't be read or it answers otherwise. Should the interpreter fail on a call later, the SavedModel answers it.

    One instance takes about a sixth of the SavedModel's call (TensorFlow's per-call overhead is most of a small
    call) and 64 about half: TF Serving's --prefer_tflite_model. The interpreter is not thread-safe: the call is
    made by one thread at a time (the loading thread, then the server's event loop alone once handed out).
    """
    file = lite_file(path)
    try:
        if not tf.io.gfile.exists(file):
            return None
        with tf.io.gfile.GFile(file, "rb") as handle:
            content = handle.read()
        threads = max(1, tf.config.threading.get_intra_op_parallelism_threads())
        model = lite.LiteModel(content=content, threads=threads, tensorflow_fallback=True)
    except (lite.LiteModelError, tf.errors.OpError, OSError) as error:  # the SavedModel still serves
        logging.warning("version %d: %s can't be used (%s); the SavedModel answers", version, file, error)
        return None

    def call(keys: Sequence[features.InstanceKey]) -> numpy.ndarray:
        try:
            return model.predict_columns(features.raw_columns(keys))
        except lite.LiteModelError as error:
            logging.error("version %d: %s; the SavedModel answers this call", version, error)
            return reference(keys)

    for keys in [[key] for key in probes] + [list(probes)]:
        try:
            difference = float(
                numpy.max(numpy.abs(model.predict_columns(features.raw_columns(keys)) - reference(keys)))
            )
        except lite.LiteModelError as error:
            difference, reason = float("nan"), str(error)
        else:
            reason = f"it differs from the SavedModel by {difference:.6f} lb (at most {LITE_MAX_DIFFERENCE} lb)"
        if not difference <= LITE_MAX_DIFFERENCE:
            logging.warning("version %d: %s is not used: %s; the SavedModel answers", version, file, reason)
            return None
    return call


def lite_version(loaded: LoadedVersion) -> Optional[LoadedVersion]:
    """A version served by its SavedModel, answered by its TFLite model from now on where that agrees (`_lite_call`):
    the pipeline writes the file after the push, so it may appear after the version loaded. None otherwise."""
    call = _lite_call(loaded.path, loaded.version, loaded.probes, loaded.predict_keys)
    return None if call is None else dataclasses.replace(loaded, predict_keys=call, runtime=TFLITE)


def probes(head: Sequence[features.InstanceKey]) -> List[features.InstanceKey]:
    """Instances a second runtime must answer as the SavedModel does: frequent ones (PROBE_HEAD of the head), the
    required features alone, and each numeric feature at its domain's ends and each text feature true, false and
    a value never seen (beside the required ones): what the frequent instances leave out."""
    typical = {column.name: 30 for column in features.REQUIRED_FEATURES}
    edges = [typical]
    for column in features.FEATURES:
        if column.dtype == "string":
            edges += [{**typical, column.name: value} for value in ("true", "false", "unseen")]
        else:
            edges += [{**typical, column.name: end} for end in contract.numeric_domains()[column.name]]
    found = [features.instance_key(edge) for edge in edges if not features.missing_required(edge)]
    return list(dict.fromkeys(list(head[:PROBE_HEAD]) + found))


def read_frequent_instances(path: str) -> List[Dict[str, Any]]:
    """The instances the Trainer found most frequent in the training data (most frequent first), if any."""
    file = os.path.join(path, features.FREQUENT_INSTANCES_FILE)
    if not tf.io.gfile.exists(file):
        return []
    with tf.io.gfile.GFile(file) as handle:
        return [instance for _, instance in json.load(handle)["instances"]]


def load(
    path: str,
    version: int,
    head_size: int,
    capacity: int,
    admit_after: int,
    max_bytes: int,
    traffic_head: Sequence[features.InstanceKey] = (),
    prefer_tflite: bool = False,
) -> LoadedVersion:
    """Loads, checks and warms up a version; predicts its head (training data first, then traffic). With
    `prefer_tflite`, its TFLite model answers where it agrees with the SavedModel (`_lite_call`)."""
    started = time.monotonic()
    try:
        return _load(path, version, head_size, capacity, admit_after, max_bytes, traffic_head, prefer_tflite, started)
    except LoadError:
        raise
    except tf.errors.OpError as error:
        raise LoadError(
            f"version {version} at {path} can't be loaded: {type(error).__name__}: {error.message.splitlines()[0]}",
            transient=isinstance(error, TRANSIENT_ERRORS),
        ) from None
    except Exception as error:  # a damaged folder can break any step: it is a version that can't be served
        raise LoadError(f"version {version} at {path} can't be loaded: {type(error).__name__}: {error}") from None


def _load(
    path: str,
    version: int,
    head_size: int,
    capacity: int,
    admit_after: int,
    max_bytes: int,
    traffic_head: Sequence[features.InstanceKey],
    prefer_tflite: bool,
    started: float,
) -> LoadedVersion:
    model = tf.saved_model.load(path)
    raw = model.signatures[contract.RAW_SIGNATURE]
    if contract.EXAMPLES_SIGNATURE not in model.signatures:  # its metadata is served; examples are read in Python
        raise LoadError(f"version {version} at {path} has no {contract.EXAMPLES_SIGNATURE} signature")
    defs = _signature_defs(path)

    def public_call(keys: Sequence[features.InstanceKey]) -> numpy.ndarray:
        return raw(**columns_of(keys))[PREDICTIONS].numpy().reshape(-1)

    predict_keys = _fast_call(raw)
    head = [
        features.instance_key(instance)
        for instance in read_frequent_instances(path)
        if not features.missing_required(instance)
    ]  # the signature refuses those
    head = list(dict.fromkeys(head + list(traffic_head)))[:head_size]
    warmup = head[: max(WARMUP_BATCHES)] or [_typical_key()]
    for size in WARMUP_BATCHES:
        keys = (warmup * size)[:size]
        public = public_call(keys)
        if not numpy.allclose(public, predict_keys(keys), rtol=1e-6, atol=1e-6):
            logging.warning(
                "version %d: the fast signature call disagrees with the public one; using the public call", version
            )
            predict_keys = public_call
        if not numpy.all(numpy.isfinite(public)):
            raise LoadError(f"version {version} at {path} predicts {public[:3]} at warm-up, not numbers")
    runtime, checks = TENSORFLOW, probes(head)
    lite_call = _lite_call(path, version, checks, predict_keys) if prefer_tflite else None
    if lite_call is not None:
        predict_keys, runtime = lite_call, TFLITE
    table = cache.PredictionTable(capacity, admit_after, max_bytes)
    table.fill(head, predict_keys)
    seconds = time.monotonic() - started
    return LoadedVersion(version, path, predict_keys, defs, table, seconds, model, runtime, checks)


def _typical_key() -> features.InstanceKey:
    """An instance with only the required features, for warming up a version without a head file."""
    return features.instance_key({column.name: 30 for column in features.REQUIRED_FEATURES})
