"""Requests in TF Serving's REST formats, checked against the serving contract (models/features.py).

A request is read whole before anything is predicted: an instance with an unknown feature, a value of the
wrong type, a number outside its domain in the schema (schema/schema.pbtxt, the one definition of the domains:
a number beyond them is no birth record, and the model would cast 1e30 weeks to int64's minimum), a text longer
than MAX_TEXT_CHARACTERS, or without a required feature fails the request with a 400 naming the instance and
the feature. Too many instances is a 413, counted before columns are turned into rows.
"""

import base64
import binascii
import dataclasses
import functools
import reprlib
from typing import Any, Dict, List, Optional, Sequence

import orjson

from models import features, lite
from serving.core import schema

RAW_SIGNATURE = lite.SIGNATURE  # named raw features
EXAMPLES_SIGNATURE = "serving_default"  # serialized tf.Examples, base64 in JSON ({"b64": ...})
SIGNATURES = (RAW_SIGNATURE, EXAMPLES_SIGNATURE)


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status, the message says what and where."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Request:
    """A checked request: its instances' raw features (as logged) and the model's input for each."""

    signature: str
    columnar: bool  # "inputs" (answered with "outputs") rather than "instances" (answered with "predictions")
    instances: List[Dict[str, Any]]  # the raw features as sent (a tf.Example's, read)
    keys: List[features.InstanceKey]  # the model's input per instance


# The JSON types each feature takes (its keys: the features the model takes): numbers for the numeric ones, text or
# true/false for the others.
_NUMBER, _TEXT = (int, float), (str, bool)
FEATURE_KINDS = {c.name: (_NUMBER if c.dtype != "string" else _TEXT) for c in features.FEATURES}
MAX_TEXT_CHARACTERS = 64  # a text value's longest: the codes and states the model takes are a few characters
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong, _SHOWN.maxlist, _SHOWN.maxdict = 2, 80, 80, 40, 4, 4


def shown(value: Any) -> str:
    """A client's value as an error message quotes it: its repr cut short, two levels deep at most (a value nested
    a thousand deep would exhaust the stack of repr, a megabyte key would be echoed whole)."""
    return _SHOWN.repr(value)


@functools.lru_cache(maxsize=None)
def numeric_domains() -> Dict[str, tuple]:
    """(min, max) of each numeric model feature, from the schema (their 'unknown' codes are inside)."""
    found = {}
    for feature in schema.load().feature:
        if FEATURE_KINDS.get(feature.name) is _NUMBER:
            found[feature.name] = schema.domain(feature)
    missing = [name for name, kind in FEATURE_KINDS.items() if kind is _NUMBER and name not in found]
    if missing:
        raise ValueError(f"{schema.SCHEMA_FILE}: no domain for the numeric feature(s) {', '.join(missing)}")
    return found


def _outside(index: int, name: str, value: Any, kind: tuple) -> Optional[str]:
    """Why a value of the right type is refused (a number beyond its domain, a text too long), or None."""
    if value.__class__ is list:
        value = value[0] if value else None
    if value is None:
        return None
    if kind is _NUMBER:
        low, high = numeric_domains()[name]
        if not low <= value <= high:  # NaN and infinities too
            return f"instance {index}: feature {name!r} is {shown(value)}, outside its domain [{low:g}, {high:g}]"
    elif value.__class__ is str and len(value) > MAX_TEXT_CHARACTERS:
        return f"instance {index}: feature {name!r} is a text of {len(value)} characters; at most {MAX_TEXT_CHARACTERS}"
    return None


def _wrong_value(index: int, name: str, value: Any, kind: tuple) -> Optional[str]:
    """Why a value that is not plainly of its feature's type is refused, or None if it is taken (a list of one)."""
    if isinstance(value, list):
        if len(value) > 1:
            return f"instance {index}: feature {name!r} has {len(value)} values; the model takes one"
        if not value or value[0] is None or value[0].__class__ in kind:
            return None
        value = value[0]
    if kind == (int, float):
        return f"instance {index}: feature {name!r} must be a number, got {shown(value)}"
    return f"instance {index}: feature {name!r} must be a string (or true/false), got {shown(value)}"


def check_instance(index: int, instance: Any) -> features.InstanceKey:
    """The model's input for one instance of named raw features, or a RequestError naming what is wrong."""
    if instance.__class__ is not dict:
        raise RequestError(f"instance {index}: expected an object of feature values, got {type(instance).__name__}")
    for name, value in instance.items():
        kind = FEATURE_KINDS.get(name)
        if kind is None:
            raise RequestError(
                f"instance {index}: unknown feature {shown(name)} "
                f"(the model takes: {', '.join(features.FEATURE_NAMES)})"
            )
        if value is not None and value.__class__ not in kind:  # bool is not int here: true is no number
            reason = _wrong_value(index, name, value, kind)
            if reason:
                raise RequestError(reason)
    lacking = features.missing_required(instance)
    if lacking:
        raise RequestError(
            f"instance {index}: missing required feature {lacking[0]!r} (no value, or an "
            f"'unknown' code); every request needs {', '.join(c.name for c in features.REQUIRED_FEATURES)}"
        )
    for name, value in instance.items():
        reason = _outside(index, name, value, FEATURE_KINDS[name])
        if reason:
            raise RequestError(reason)
    return features.instance_key(instance)


def _example(index: int, instance: Any) -> Dict[str, Any]:
    """The model's features of a serialized tf.Example in JSON ({"b64": ...} or {"examples": {"b64": ...}})."""
    if isinstance(instance, dict) and set(instance) == {"examples"}:
        instance = instance["examples"]
    if not (isinstance(instance, dict) and set(instance) == {"b64"} and isinstance(instance["b64"], str)):
        raise RequestError(
            f"instance {index}: {EXAMPLES_SIGNATURE} takes serialized tf.Examples as "
            '{"b64": "..."}; send named features with "signature_name": "serving_raw"'
        )
    try:
        serialized = base64.b64decode(instance["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"instance {index}: 'b64' is not base64") from None
    return example_values(index, serialized, "'b64'")


def example_values(index: int, example: Any, source: str = "the value") -> Dict[str, Any]:
    """The model's features of a tf.Example (the message, or it serialized), as lists of values.

    Read in Python, so the example is checked, cached, batched and logged as named features are; the model's
    serving_raw answers it, which applies the same transform as serving_default (tests check they agree).
    Features the model doesn't take are ignored, as serving_default's parsing ignores them.
    """
    if isinstance(example, bytes):
        from tensorflow.core.example import example_pb2  # only for examples: the client doesn't need TensorFlow

        try:
            example = example_pb2.Example.FromString(example)
        except Exception:  # protobuf's DecodeError
            raise RequestError(f"instance {index}: {source} is not a serialized tf.Example") from None
    values = {}
    for name, feature in example.features.feature.items():
        if name not in FEATURE_KINDS:
            continue
        kind = feature.WhichOneof("kind")
        listed = list(getattr(feature, kind).value) if kind else []
        if kind == "bytes_list":
            try:
                listed = [value.decode() for value in listed]
            except UnicodeDecodeError:
                raise RequestError(f"instance {index}: feature {name!r} is not UTF-8 text") from None
        values[name] = listed
    return values


def _columns_to_rows(inputs: Any, max_instances: int) -> List[Any]:
    """TF Serving's columnar format ({"inputs": {feature: [values]}}) as instances, at most max_instances of them
    (counted before they are made)."""
    if isinstance(inputs, list):  # a list of tf.Examples, or of instances
        return inputs
    if not isinstance(inputs, dict) or not inputs:
        raise RequestError("'inputs' must be an object of feature -> list of values")
    if set(inputs) == {"examples"}:
        return list(inputs["examples"]) if isinstance(inputs["examples"], list) else [inputs["examples"]]
    lengths = {name: len(values) if isinstance(values, list) else -1 for name, values in inputs.items()}
    if len(set(lengths.values())) != 1 or -1 in lengths.values():
        raise RequestError(
            f"'inputs': every feature needs a list of one value per instance, got lengths {shown(lengths)}"
        )
    count = next(iter(lengths.values()))
    check_count(count, max_instances)
    return [{name: values[index] for name, values in inputs.items()} for index in range(count)]


def check_count(count: int, max_instances: int) -> None:
    if count > max_instances:
        raise RequestError(f"{count} instances in one request; the server takes at most {max_instances}", 413)


def parse_predict(body: bytes, max_instances: int, signature: Optional[str] = None) -> Request:
    """Reads a :predict body ({"instances": [...]} or {"inputs": ...}, optional "signature_name")."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestError(f"the body is not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise RequestError('the body must be a JSON object with "instances" or "inputs"')
    if ("instances" in payload) == ("inputs" in payload):
        raise RequestError('the body needs exactly one of "instances" (rows) or "inputs" (columns)')
    columnar = "inputs" in payload
    rows = _columns_to_rows(payload["inputs"], max_instances) if columnar else payload["instances"]
    if not isinstance(rows, list) or not rows:
        raise RequestError("'instances' must be a non-empty list")
    return checked(rows, payload.get("signature_name", signature), columnar, max_instances)


def parse_regress(body: bytes, max_instances: int) -> Request:
    """Reads a :regress body in TF Serving's format: {"examples": [{feature: value}], "context": {...}}."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestError(f"the body is not JSON: {error}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("examples"), list) or not payload["examples"]:
        raise RequestError('a :regress body needs "examples": a non-empty list of objects of feature values')
    context = payload.get("context") or {}
    if not isinstance(context, dict):
        raise RequestError("'context' must be an object of feature values shared by every example")
    rows = [{**context, **example} if isinstance(example, dict) else example for example in payload["examples"]]
    return checked(rows, RAW_SIGNATURE, False, max_instances)


def checked(rows: Sequence[Any], signature: Optional[str], columnar: bool, max_instances: int) -> Request:
    """A request of rows (named features, or tf.Examples as {"b64": ...} for serving_default), each checked."""
    check_count(len(rows), max_instances)
    if signature is None:  # TF Serving's default is serving_default; named features mean serving_raw
        is_example = isinstance(rows[0], dict) and set(rows[0]) in ({"b64"}, {"examples"})
        signature = EXAMPLES_SIGNATURE if is_example else RAW_SIGNATURE
    if signature == EXAMPLES_SIGNATURE:
        rows = [_example(index, row) for index, row in enumerate(rows)]
    elif signature != RAW_SIGNATURE:
        raise RequestError(f"unknown signature_name {shown(signature)}; the model serves {', '.join(SIGNATURES)}")
    keys = [check_instance(index, row) for index, row in enumerate(rows)]
    return Request(signature, columnar, list(rows), keys)


def response(request: Request, predictions: Sequence[float]) -> bytes:
    """TF Serving's answer: {"predictions": [[p], ...]} for rows, {"outputs": [[p], ...]} for columns."""
    values = [[value] for value in predictions]
    return orjson.dumps({"outputs": values} if request.columnar else {"predictions": values})


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def to_instance(row: Dict[str, Any]) -> Dict[str, Any]:
    """The model's features of a row, as JSON types (CSV fields are text); raises ValueError naming the feature."""
    instance = {}
    for column in features.FEATURES:
        value = row.get(column.name)
        if value is None or value == "" or value != value:  # NaN: no value (JSON has no NaN to send it as)
            continue
        if column.dtype != "string" and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"feature {column.name!r}: {shown(value)} is not a number") from None
            if value != value:  # "nan", as some tools write a missing number: no value, as NaN is
                continue
            value = int(value) if value.is_integer() else value
        instance[column.name] = value
    try:
        check_instance(0, instance)  # the server's own check: types, value counts, required features
    except RequestError as error:
        raise ValueError(str(error).split(": ", 1)[1]) from None
    return instance
