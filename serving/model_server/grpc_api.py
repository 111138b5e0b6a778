"""TF Serving's gRPC API on --grpc-port (8500), in each worker process beside the REST routes, over the same Service.

    tensorflow.serving.PredictionService/Predict           serving_raw (a tensor per feature) or serving_default
    tensorflow.serving.PredictionService/Regress           tf.Examples (with a context), answered as serving_raw
    tensorflow.serving.PredictionService/Classify          refused: the model is a regression, as TF Serving says
    tensorflow.serving.PredictionService/GetModelMetadata  the signatures (metadata_field "signature_def")
    tensorflow.serving.ModelService/GetModelStatus         each version's state
A model spec names the model and optionally a version or a version label, and a signature. A request takes the
contract, table, batcher, experiment, request log and metrics a REST request takes (route label grpc_predict,
grpc_regress, ...; the code label the HTTP status REST would answer). Refusals carry TF Serving's codes:
INVALID_ARGUMENT naming the instance and feature, NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED for too many
instances or bytes (--max-instances, --max-body-bytes), INTERNAL for the server's fault. The request id is read
from the x-request-id metadata (else made) and sent back, with the version that answered, as trailing metadata; the
client id (a label the client chooses, checked as the request id is) from x-client-id, into the request log.
MultiInference and HandleReloadConfigRequest are not served (UNIMPLEMENTED): the model config file is re-read by
itself.
"""

import time
from typing import Any, Callable, Optional, Tuple

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from models import lite
from serving.core import contract, manager
from serving.experiments import experiment
from serving.model_server import protocol, tensors
from serving.model_server import service as service_lib

STOP_GRACE_SECONDS = 5.0  # calls in flight when the server stops get this long to finish
IDLE_CONNECTION_MS = 5 * 60 * 1000  # a connection with no call for this long is closed
# Every connection is closed after this long (with gRPC's jitter; clients reconnect by themselves), its calls given
# CONNECTION_GRACE_MS to finish: a call whose message never comes holds its place at most that long (REST gives a
# body 30 s). A connection carries at most STREAMS_PER_CONNECTION calls at once.
CONNECTION_AGE_MS = 60 * 1000
CONNECTION_GRACE_MS = 30 * 1000
STREAMS_PER_CONNECTION = 100
# The gRPC code TF Serving gives for each refusal (by the HTTP status the REST routes answer it with).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
CLASSIFY_REFUSAL = (
    "Expected classification signature method_name to be tensorflow/serving/classify. "
    "Was: tensorflow/serving/predict"
)  # TF Serving's words for a model whose signatures are not classifications


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, service: service_lib.Service):
        self.service = service
        self.settings = service.settings

    async def Predict(self, request: predict_pb2.PredictRequest, context: Any) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        signature = spec.signature_name or contract.EXAMPLES_SIGNATURE
        unknown = [name for name in request.output_filter if name != lite.PREDICTIONS]
        limit = self.settings.max_instances

        def parse() -> contract.Request:
            if unknown:
                raise contract.RequestError(f"output tensor alias not found in signature: {contract.shown(unknown[0])}")
            return tensors.predict_request(request.inputs, signature, limit)

        outcome = await self._answer(spec, parse, "grpc_predict", context)
        response = predict_pb2.PredictResponse()
        _answered_spec(response.model_spec, self.service, outcome.version, signature)
        response.outputs[lite.PREDICTIONS].CopyFrom(tensors.predictions_tensor(outcome.predictions))
        return response

    async def Regress(
        self, request: regression_pb2.RegressionRequest, context: Any
    ) -> regression_pb2.RegressionResponse:
        spec = request.model_spec
        limit = self.settings.max_instances

        def parse() -> contract.Request:
            if spec.signature_name not in ("", *contract.SIGNATURES):
                raise contract.RequestError(
                    f"unknown signature_name {contract.shown(spec.signature_name)}; the model serves "
                    f"{', '.join(contract.SIGNATURES)}"
                )
            kind = request.input.WhichOneof("kind")
            if kind == "example_list":
                return tensors.examples_request(request.input.example_list.examples, limit)
            if kind == "example_list_with_context":
                listed = request.input.example_list_with_context
                return tensors.examples_request(listed.examples, limit, listed.context)
            raise contract.RequestError("the input has no examples (example_list or example_list_with_context)")

        outcome = await self._answer(spec, parse, "grpc_regress", context)
        response = regression_pb2.RegressionResponse()
        _answered_spec(response.model_spec, self.service, outcome.version, spec.signature_name)
        response.result.regressions.extend(regression_pb2.Regression(value=value) for value in outcome.predictions)
        return response

    async def Classify(self, request: classification_pb2.ClassificationRequest, context: Any) -> Any:
        """Refused as TF Serving refuses it for a model of regression (predict) signatures, once the version is
        known (an unknown model or version is NOT_FOUND first)."""
        request_id = self._metadata(context)[0]
        try:
            handle = self._resolve(request.model_spec)
        except _Refused as error:
            outcome = self.service.refused(error.status, str(error), request_id or "none", "none", "grpc_classify")
            await _refuse(context, outcome)
        outcome = self.service.refused(
            400, CLASSIFY_REFUSAL, request_id or "none", str(handle.version), "grpc_classify"
        )
        await _refuse(context, outcome)

    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: Any
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if not fields:
            await _abort(context, 400, "GetModelMetadataRequest must specify at least one metadata_field")
        if any(field != "signature_def" for field in fields):
            unsupported = next(field for field in fields if field != "signature_def")
            await _abort(context, 400, f"Metadata field {contract.shown(unsupported)} is not supported")
        try:
            handle = self._resolve(request.model_spec)
        except _Refused as error:
            await _abort(context, error.status, str(error))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _answered_spec(response.model_spec, self.service, str(handle.version), "")
        signatures = json_format.ParseDict(handle.signature_defs, get_model_metadata_pb2.SignatureDefMap())
        response.metadata["signature_def"].Pack(signatures)
        return response

    # One path for the prediction calls

    async def _answer(
        self, spec: Any, parse: Callable[[], contract.Request], route: str, context: Any
    ) -> service_lib.Outcome:
        started = time.perf_counter()
        request_id, routing_key, client = self._metadata(context)
        try:
            version, label = _version_of(spec, self.service)
        except _Refused as error:
            await _refuse(context, self.service.refused(error.status, str(error), request_id, "none", route))
        if request_id is None:
            outcome = self.service.refused(400, service_lib.BAD_REQUEST_ID, self.service.new_id(), "none", route)
            await _refuse(context, outcome)
        if client is None:
            await _refuse(context, self.service.refused(400, service_lib.BAD_CLIENT_ID, request_id, "none", route))
        outcome = await self.service.answer(parse, version, label, route, request_id, routing_key, started, client)
        if outcome.status != 200:
            await _refuse(context, outcome)
        context.set_trailing_metadata(_trailing(outcome))
        return outcome

    def _metadata(self, context: Any) -> Tuple[Optional[str], Optional[str], Optional[str]]:
        """(the request's id: the client's x-request-id, else a new one; the routing key; the client id: the
        client's x-client-id, else ""), the request id and the client id None where the client's was refused."""
        given = routing_key = given_client = None
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id":
                given = value
            elif key == experiment.ROUTING_HEADER:
                routing_key = value
            elif key == "x-client-id":
                given_client = value
        request_id, bad = self.service.request_id(given if isinstance(given, str) else None)
        client, bad_client = self.service.client_id(given_client if isinstance(given_client, str) else None)
        return (None if bad else request_id), routing_key, (None if bad_client else client)

    def _resolve(self, spec: Any) -> Any:
        version, label = _version_of(spec, self.service)
        try:
            return self.service.manager.resolve(version, label)
        except manager.NotFound as error:
            raise _Refused(404, str(error)) from None
        except manager.Unavailable as error:
            raise _Refused(503, str(error)) from None


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: service_lib.Service):
        self.service = service

    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: Any
    ) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            version, label = _version_of(request.model_spec, self.service)
            statuses = self.service.manager.status(version, label)
        except _Refused as error:
            await _abort(context, error.status, str(error))
        except manager.NotFound as error:
            await _abort(context, 404, str(error))
        return json_format.ParseDict({"model_version_status": statuses}, get_model_status_pb2.GetModelStatusResponse())


def _version_of(spec: Any, service: service_lib.Service) -> Tuple[Optional[int], Optional[str]]:
    """The version or label a model spec asks for; _Refused (404) for another model's name."""
    name = service.manager.config.name
    if spec.name != name:
        raise _Refused(404, f"no model named {contract.shown(spec.name)} (this server serves {name!r})")
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _answered_spec(spec: Any, service: service_lib.Service, version: str, signature: str) -> None:
    spec.name = service.manager.config.name
    spec.version.value = int(version)
    spec.signature_name = signature


def _trailing(outcome: service_lib.Outcome) -> Tuple[Tuple[str, str], ...]:
    pairs = (("x-request-id", outcome.request_id), ("x-model-version", outcome.version))
    return pairs + ((("x-experiment-arm", outcome.arm),) if outcome.arm is not None else ())


async def _abort(context: Any, status: int, message: str, trailing: Tuple[Tuple[str, str], ...] = ()) -> None:
    """Ends the call with TF Serving's code for `status` (raises grpc's abort exception)."""
    await context.abort(CODES.get(status, grpc.StatusCode.UNKNOWN), message, trailing)


async def _refuse(context: Any, outcome: service_lib.Outcome) -> None:
    await _abort(context, outcome.status, outcome.message, _trailing(outcome))


async def start(service: service_lib.Service) -> grpc.aio.Server:
    """The gRPC server of this worker process, started on --host:--grpc-port. The workers share the port
    (SO_REUSEPORT: the kernel spreads connections over them); `babyweight serve` checked first that no other
    process holds it. Limits: a message of at most --max-body-bytes (RESOURCE_EXHAUSTED beyond), at most
    --max-connections calls at once per worker (RESOURCE_EXHAUSTED beyond), metadata of at most
    protocol.MAX_HEAD_BYTES, STREAMS_PER_CONNECTION calls at once per connection, idle connections closed after
    IDLE_CONNECTION_MS and every one after CONNECTION_AGE_MS (a client that starts calls and never sends their
    messages holds their places that long, and CONNECTION_GRACE_MS, at most)."""
    settings = service.settings
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_metadata_size", protocol.MAX_HEAD_BYTES),
            ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
            ("grpc.max_connection_age_ms", CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", CONNECTION_GRACE_MS),
            ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
        ],
        maximum_concurrent_rpcs=settings.max_connections,
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(service), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(service), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address in brackets
    server.add_insecure_port(f"{host}:{settings.grpc_port}")
    await server.start()
    return server
