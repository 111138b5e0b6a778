"""`babyweight predict --grpc HOST:PORT`: a batch of instances sent with TensorFlow Serving's gRPC API.

PredictionService/Predict on one channel per run, as TF Serving's own clients call it: model_spec names the model,
the version (or label) and the `serving_raw` signature; the inputs are one tensor per model feature (models/features.py,
FEATURES' names), shape [n]: float32 with NaN where an instance has no value, text with "" where it has none (the
arrays `serving_raw` and the TFLite model take: features.raw_columns). The answer is outputs["predictions"], [n, 1],
and the version that answered in its model_spec. A call the server refuses for now (UNAVAILABLE; RESOURCE_EXHAUSTED
for too many calls at once, not for a request too large) is made again with the same x-request-id metadata, a
bounded number of times with growing waits, as the REST client retries a 503 (serving/clients/client.py reads both
alike).
"""

import time
from typing import Any, Dict, List, Optional, Tuple

import grpc
import numpy
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from models import features, lite

RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# RESOURCE_EXHAUSTED also says a request is too large (too many instances, the server's words; too many bytes,
# gRPC's): the same request would be refused again, so those are not retried.
TOO_LARGE = ("instances in one request", "larger than max")
# The REST status TF Serving answers for a gRPC code (its HTTP front maps them so), for a caller that reads both
# protocols' refusals alike; other codes are 500.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RpcFailed(RuntimeError):
    """The call failed, or answered no prediction per instance: `status` as TF Serving's REST API gives it (0 where
    nothing came back), `reason` the server's own words."""

    def __init__(self, message: str, status: int = 0, reason: str = ""):
        super().__init__(message)
        self.status, self.reason = status, reason


def backoff(retry: int, backoff_seconds: float) -> float:
    """The wait before retry number `retry` (1, 2, ...): none, then backoff_seconds doubling (urllib3's Retry)."""
    return 0.0 if retry <= 1 else backoff_seconds * 2 ** (retry - 1)


def predict_request(model_spec: Any, instances: List[Dict[str, Any]]) -> predict_pb2.PredictRequest:
    """A PredictRequest with one [n] tensor per feature of `instances` (checked by the serving contract)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.CopyFrom(model_spec)
    for name, values in features.raw_columns([features.instance_key(instance) for instance in instances]).items():
        dtype = tf.string if values.dtype == object else tf.float32
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, dtype=dtype, shape=[len(instances)]))
    return request


class Predictor:
    """TF Serving's PredictionService on one channel: a batch of instances in, a prediction each and the version
    that answered out."""

    def __init__(
        self,
        target: str,
        model: str,
        version: Optional[int] = None,
        label: Optional[str] = None,
        timeout_seconds: float = 60.0,
        retries: int = 5,
        backoff_seconds: float = 0.5,
    ):
        self.target = target
        self.timeout_seconds, self.retries, self.backoff_seconds = timeout_seconds, retries, backoff_seconds
        self.model_spec = predict_pb2.PredictRequest().model_spec
        self.model_spec.name, self.model_spec.signature_name = model, lite.SIGNATURE
        if version:
            self.model_spec.version.value = version
        elif label:
            self.model_spec.version_label = label
        self.channel = grpc.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def predict(self, instances: List[Dict[str, Any]], request_id: str) -> Tuple[List[float], str]:
        """The predictions for `instances` and the version that answered; the same request id on every try."""
        request = predict_request(self.model_spec, instances)
        retry = 0
        while True:
            try:
                response = self.stub.Predict(
                    request, timeout=self.timeout_seconds, metadata=(("x-request-id", request_id),)
                )
                break
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                too_large = code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(words in details for words in TOO_LARGE)
                if code not in RETRIED or too_large or retry == self.retries:
                    after = f" after {retry + 1} tries" if retry else ""
                    raise RpcFailed(
                        f"{self.target} answered {code.name}{after}: {details}", HTTP_STATUS.get(code, 500), details
                    ) from None
                retry += 1
                time.sleep(backoff(retry, self.backoff_seconds))
        if "predictions" not in response.outputs:
            raise RpcFailed(f"{self.target} answered no predictions: {sorted(response.outputs)}")
        predictions = tf.make_ndarray(response.outputs["predictions"])
        if predictions.size != len(instances):
            raise RpcFailed(f"{self.target} answered {predictions.shape} predictions for {len(instances)} instances")
        version = response.model_spec.version.value
        return numpy.asarray(predictions, float).reshape(-1).tolist(), str(version) if version else ""

    def close(self) -> None:
        self.channel.close()
