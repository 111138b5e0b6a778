"""TF Serving's gRPC requests (TensorProtos, tf.Examples) read into the serving contract's requests, and answers
written back as TensorProtos: the same checks as REST's JSON (contract.py), after the tensors' own.

`serving_raw` takes one tensor per model feature, shape [n] or [n, 1], numbers as DT_FLOAT, DT_DOUBLE, DT_INT32
or DT_INT64 (NaN: no value) and texts as DT_STRING ("" no value; DT_BOOL for true/false); a feature left out has no
value in any instance. `serving_default` takes "examples": DT_STRING, serialized tf.Examples. The instance count
(the first dimension) is checked against the server's limit before any value is read.
"""

from typing import Any, Dict, List, Mapping

import numpy
from tensorflow.core.framework import tensor_pb2, types_pb2

from models import features, lite
from serving.core import contract

EXAMPLES_INPUT = "examples"  # serving_default's input, as the exported signature names it
# Each dtype's little-endian form in tensor_content, and the repeated field that holds its values otherwise.
_CONTENT = {
    types_pb2.DT_FLOAT: ("<f4", "float_val"),
    types_pb2.DT_DOUBLE: ("<f8", "double_val"),
    types_pb2.DT_INT32: ("<i4", "int_val"),
    types_pb2.DT_INT64: ("<i8", "int64_val"),
    types_pb2.DT_BOOL: ("?", "bool_val"),
}
_NUMBERS = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_INT64)
_TEXTS = (types_pb2.DT_STRING, types_pb2.DT_BOOL)
_TEXT_FEATURES = frozenset(c.name for c in features.FEATURES if c.dtype == "string")


def _dtype_name(dtype: int) -> str:
    """A dtype's name, or its number where it names none (a client may send any number)."""
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else f"dtype {dtype}"


def _count(name: str, tensor: tensor_pb2.TensorProto) -> int:
    """The instances in a tensor of shape [n] or [n, 1]."""
    dims = tensor.tensor_shape.dim
    if len(dims) not in (1, 2) or (len(dims) == 2 and dims[1].size != 1) or dims[0].size < 1:
        shape = contract.shown([dim.size for dim in dims[:3]]) if len(dims) <= 3 else f"of rank {len(dims)}"
        raise contract.RequestError(
            f"input {contract.shown(name)}: shape {shape}; expected [n] or [n, 1], one value per instance"
        )
    return dims[0].size


def _values(name: str, tensor: tensor_pb2.TensorProto, count: int) -> List[Any]:
    """A tensor's `count` values as Python values (bytes for texts)."""
    if tensor.dtype == types_pb2.DT_STRING:
        values = list(tensor.string_val)
    else:
        layout, field = _CONTENT[tensor.dtype]
        if tensor.tensor_content:
            width = numpy.dtype(layout).itemsize
            if len(tensor.tensor_content) != count * width:
                raise contract.RequestError(
                    f"input {contract.shown(name)}: {len(tensor.tensor_content)} bytes of content for {count} "
                    f"values of {width} bytes"
                )
            values = numpy.frombuffer(tensor.tensor_content, layout).tolist()
        else:
            values = list(getattr(tensor, field))
    if len(values) != count:
        raise contract.RequestError(f"input {contract.shown(name)}: {len(values)} values for {count} instances")
    return values


def predict_request(inputs: Mapping[str, tensor_pb2.TensorProto], signature: str, max_instances: int) -> Any:
    """A PredictRequest's inputs as the contract's checked request (RequestError names what is wrong)."""
    if signature == contract.EXAMPLES_SIGNATURE:
        if set(inputs) != {EXAMPLES_INPUT} or inputs[EXAMPLES_INPUT].dtype != types_pb2.DT_STRING:
            raise contract.RequestError(
                f"{contract.EXAMPLES_SIGNATURE} takes one input, {EXAMPLES_INPUT!r}: DT_STRING serialized "
                f"tf.Examples; send named features with signature_name {lite.SIGNATURE!r}"
            )
        count = _count(EXAMPLES_INPUT, inputs[EXAMPLES_INPUT])
        contract.check_count(count, max_instances)
        return examples_request(_values(EXAMPLES_INPUT, inputs[EXAMPLES_INPUT], count), max_instances)
    if signature != contract.RAW_SIGNATURE:
        raise contract.RequestError(
            f"unknown signature_name {contract.shown(signature)}; the model serves {', '.join(contract.SIGNATURES)}"
        )
    if not inputs:
        raise contract.RequestError(f"no inputs: {lite.SIGNATURE} takes one tensor per feature")
    given = list(inputs.items())  # a protobuf map's items, once: its iteration costs more than the checks
    counts = {}
    for name, tensor in given:
        kinds = _TEXTS if name in _TEXT_FEATURES else _NUMBERS
        if name not in contract.FEATURE_KINDS:
            raise contract.RequestError(
                f"unknown input {contract.shown(name)} (the model takes: {', '.join(features.FEATURE_NAMES)})"
            )
        if tensor.dtype not in kinds:
            expected = " or ".join(_dtype_name(kind) for kind in kinds)
            raise contract.RequestError(f"input {name!r}: {_dtype_name(tensor.dtype)}; expected {expected}")
        counts[name] = _count(name, tensor)
    if len(set(counts.values())) != 1:
        raise contract.RequestError(f"every input needs one value per instance, got {contract.shown(counts)}")
    count = counts[given[0][0]]
    contract.check_count(count, max_instances)
    rows: List[Dict[str, Any]] = [{} for _ in range(count)]
    for name, tensor in given:
        for index, value in enumerate(_values(name, tensor, count)):
            if value.__class__ is bytes:
                if not value:
                    continue
                try:
                    value = value.decode()
                except UnicodeDecodeError:
                    raise contract.RequestError(f"instance {index}: feature {name!r} is not UTF-8 text") from None
            elif value != value:  # NaN: no value
                continue
            rows[index][name] = value
    return contract.checked(rows, contract.RAW_SIGNATURE, True, max_instances)


def examples_request(examples: List[Any], max_instances: int, context: Any = None) -> contract.Request:
    """tf.Examples (messages or serialized), each with the context's features where it has none of its own."""
    contract.check_count(len(examples), max_instances)
    shared = contract.example_values(0, context, "the context") if context is not None else {}
    rows = [{**shared, **contract.example_values(index, example)} for index, example in enumerate(examples)]
    keys = [contract.check_instance(index, row) for index, row in enumerate(rows)]
    return contract.Request(contract.EXAMPLES_SIGNATURE, True, rows, keys)


def predictions_tensor(predictions: List[float]) -> tensor_pb2.TensorProto:
    """The answers as serving_raw's output: DT_FLOAT, shape [n, 1]."""
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=predictions)
    tensor.tensor_shape.dim.add(size=len(predictions))
    tensor.tensor_shape.dim.add(size=1)
    return tensor
