"""The HTTP layer: TensorFlow Serving's REST API on Starlette, over the manager, the batcher and the cache.

    GET  /v1/models/NAME[/versions/N|/labels/L]            version status (AVAILABLE, LOADING, ...)
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   signatures with their inputs and outputs; request limits
    POST /v1/models/NAME[/versions/N|/labels/L]:predict    {"instances": [...]} or {"inputs": {...}}
    POST /v1/models/NAME[/versions/N|/labels/L]:regress    {"examples": [...], "context": {...}}
    POST /v1/models/NAME:feedback                          {"feedback": [{"request_id": ..., "weight_pounds": ...}]}
    GET  /metrics                                          Prometheus' text format
Errors answer {"error": "..."}: 400 a bad request (naming the instance and feature), 404 an unknown model,
version or label, 413 a request too large, 500 a version that answered no number (naming it), 503 no version
available yet. Each answer carries the request's id
and the version that answered in the X-Request-Id and X-Model-Version headers. A prediction's X-Client-Id (a label
the client chooses, checked as X-Request-Id is) goes into the request log.
"""

import asyncio
import contextlib
import hmac
import logging
import re
import sqlite3
import time
from typing import Any, Optional

import orjson

import babyweight_cli

# Each worker process imports TensorFlow itself: its start-up lines off the console, as the command keeps them.
babyweight_cli.install_quiet_tensorflow()
import tensorflow as tf  # noqa: E402
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.core import contract, manager
from serving.experiments import experiment
from serving.model_server import grpc_api, logs, metrics
from serving.model_server import service as service_lib
from serving.model_server import settings as settings_lib
from serving.model_server.settings import ServerSettings

MODELS_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>/metadata|:predict|:regress|:feedback)?$"
)
JSON = "application/json"
ROUTING_HEADER = experiment.ROUTING_HEADER.encode()
MAX_ECHOED = 200  # characters of a client's path echoed in an error
MAX_VERSION_DIGITS = 18  # a version number's: int64's, as TF Serving's
BODY_SECONDS = 30.0  # a request body's time to arrive, whole; beyond, 408
DRAIN_BYTES = 64 << 20  # of a body too large, read and dropped before the 413 (then the connection is closed)


class RestApi:
    """TF Serving's REST routes over one process's Service."""

    def __init__(self, service: service_lib.Service):
        self.service = service
        self.settings = service.settings
        self.manager = service.manager

    # Routes

    async def models(self, request: Request) -> Response:
        match = MODELS_ROUTE.match(request.scope["path"])
        if match is None:
            return self._answered(_error(404, f"no such route: {request.scope['path'][:MAX_ECHOED]!r}"), request)
        name, version, label, action = match.group("name", "version", "label", "action")
        # Versions are folder names of ASCII digits ('²' is a digit to str.isdigit, not to int()), within int64.
        numeric = version is None or (version.isascii() and version.isdigit() and len(version) <= MAX_VERSION_DIGITS)
        if name != self.manager.config.name or not numeric:
            message = (
                f"no model named {contract.shown(name)} (this server serves {self.manager.config.name!r})"
                if name != self.manager.config.name
                else f"no version {contract.shown(version)} of {name!r}: versions are numbers of at most "
                f"{MAX_VERSION_DIGITS} digits"
            )
            if request.method == "POST":
                outcome = self.service.refused(404, message, self._request_id(request), "none", (action or ":")[1:])
                return self._respond(outcome)
            return self._answered(_error(404, message), request)
        number = int(version) if version is not None else None
        if request.method == "GET":
            if action not in (None, "/metadata"):
                return self._answered(_error(405, f"{action} takes POST"), request)
            answer = self._metadata(number, label) if action else self._status(number, label)
            return self._answered(answer, request)
        if action == ":feedback":
            return self._answered(await self.feedback(request), request)
        if action not in (":predict", ":regress"):
            return self._answered(_error(405, "POST goes to :predict, :regress or :feedback"), request)
        return await self.predict(request, number, label, action[1:])

    async def feedback(self, request: Request) -> Response:
        """Outcomes joined with the experiment's recorded predictions: what was accepted, unknown or a duplicate.
        It changes what the experiment's policy does, so it takes the feedback token (Authorization: Bearer)."""
        expected = self.service.feedback_token
        if expected is None:
            return _error(
                403,
                f"feedback is off: this server has no feedback token ({settings_lib.FEEDBACK_TOKEN_ENV} or "
                "--feedback-token-file)",
            )
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            response = _error(401, "feedback takes the server's feedback token: Authorization: Bearer TOKEN")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if self.service.experiment is None:
            return _error(400, "this server runs no experiment (babyweight serve --experiment-file FILE)")
        try:
            items = experiment.parse_feedback(orjson.loads(await self._body(request, None)))
            return _json((await self.service.experiment.feedback(items)).as_json())
        except orjson.JSONDecodeError as error:
            return _error(400, f"the body is not JSON: {error}")
        except experiment.ExperimentError as error:
            return _error(400, str(error))
        except contract.RequestError as error:
            return _error(error.status, str(error))
        except sqlite3.OperationalError as error:  # the state file locked by another process too long: try again
            logging.warning("feedback: the experiment's state file: %s", error)
            response = _error(503, f"the experiment's state file is busy ({error}); send the feedback again")
            response.headers["Retry-After"] = "1"
            return response
        except Exception:  # a bug: an answer in the API's form, logged
            logging.exception("feedback failed")
            return _error(500, "internal error taking the feedback (see the server's log)")

    def _status(self, version: Optional[int], label: Optional[str]) -> Response:
        try:
            return _json({"model_version_status": self.manager.status(version, label)})
        except manager.NotFound as error:
            return _error(404, str(error))

    def _metadata(self, version: Optional[int], label: Optional[str]) -> Response:
        try:
            handle = self.manager.resolve(version, label)
        except manager.NotFound as error:
            return _error(404, str(error))
        except manager.Unavailable as error:
            return _error(503, str(error))
        answer = _json(
            {
                "model_spec": {"name": self.manager.config.name, "signature_name": "", "version": str(handle.version)},
                "metadata": {"signature_def": handle.signature_defs},
                # Beyond TF Serving's answer: what answers the model calls (tensorflow, or the version's TFLite model:
                # --prefer-tflite-model), and what one request may hold, for clients and infra validation.
                "runtime": handle.runtime,
                "limits": {
                    "max_instances": self.settings.max_instances,
                    "max_body_bytes": self.settings.max_body_bytes,
                },
            }
        )
        answer.headers["X-Model-Version"] = str(handle.version)
        return answer

    async def predict(self, request: Request, version: Optional[int], label: Optional[str], route: str) -> Response:
        started = time.perf_counter()
        declared, given_id, routing_key, given_client = None, None, None, None
        for key, value in request.scope["headers"]:  # one pass over the raw headers for those we read
            if key == b"content-length":
                declared = value
            elif key == b"x-request-id":
                given_id = value.decode("latin-1")
            elif key == ROUTING_HEADER:
                routing_key = value.decode("latin-1")
            elif key == b"x-client-id":
                given_client = value.decode("latin-1")
        request_id, bad_id = self.service.request_id(given_id)
        if bad_id:
            return self._respond(self.service.refused(400, service_lib.BAD_REQUEST_ID, request_id, "none", route))
        client, bad_client = self.service.client_id(given_client)
        if bad_client:
            return self._respond(self.service.refused(400, service_lib.BAD_CLIENT_ID, request_id, "none", route))
        try:
            body = await self._body(request, declared)
        except contract.RequestError as error:
            return self._respond(self.service.refused(error.status, str(error), request_id, "none", route))
        max_instances = self.settings.max_instances

        def parse() -> contract.Request:
            if route == "regress":
                return contract.parse_regress(body, max_instances)
            return contract.parse_predict(body, max_instances)

        outcome = await self.service.answer(parse, version, label, route, request_id, routing_key, started, client)
        return self._respond(outcome, route)

    def _respond(self, outcome: service_lib.Outcome, route: str = "") -> Response:
        if outcome.status != 200:
            return _Answer(contract.error_body(outcome.message), outcome.status, outcome.request_id, outcome.version)
        if route == "regress":
            content = orjson.dumps({"results": outcome.predictions})
        else:
            content = contract.response(outcome.parsed, outcome.predictions)
        return _Answer(content, 200, outcome.request_id, outcome.version, outcome.arm)

    async def _body(self, request: Request, declared: Optional[bytes]) -> bytes:
        """The request's body, refused (413) as soon as it is larger than the server takes, or (408) when it takes
        longer than BODY_SECONDS to arrive (a client trickling it): a timer cancels the reading, a few microseconds
        where a timeout on each read would cost a task."""
        task, expired = asyncio.current_task(), []
        timer = asyncio.get_running_loop().call_later(BODY_SECONDS, lambda: (expired.append(True), task.cancel()))
        try:
            return await self._read(request, declared)
        except asyncio.CancelledError:
            if not expired:
                raise
            raise contract.RequestError(f"the body took longer than {BODY_SECONDS:g} s to arrive", 408) from None
        finally:
            timer.cancel()

    async def _read(self, request: Request, declared: Optional[bytes]) -> bytes:
        limit = self.settings.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise await _dropped(request, f"the body has {int(declared)} bytes; the server takes at most {limit}", True)
        chunks, size = [], 0
        while True:  # ASGI's messages, read directly: Starlette's body() costs a stream of generators
            message = await request.receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:
                raise await _dropped(
                    request, f"the body has more than {limit} bytes; the server takes at most {limit}", more
                )
            chunks.append(chunk)
            if not more:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _answered(self, response: Response, request: Request, version: str = "none") -> Response:
        """A GET's answer or a route's refusal with the headers every answer carries."""
        response.headers["X-Request-Id"] = self._request_id(request)
        response.headers.setdefault("X-Model-Version", version)
        return response

    def _request_id(self, request: Request) -> str:
        """The client's X-Request-Id where it is one, else a new one."""
        return self.service.request_id(request.headers.get("x-request-id"))[0]

    async def vertex_predict(self, request: Request) -> Response:
        """Vertex AI's AIP_PREDICT_ROUTE: the default version, Vertex's body ({"instances": ...})."""
        return await self.predict(request, None, None, "predict")

    async def health(self, request: Request) -> Response:
        """Vertex AI's AIP_HEALTH_ROUTE: 200 once a version is available, else 503."""
        if self.manager.available:
            return self._answered(_json({"status": "AVAILABLE", "versions": sorted(self.manager.available)}), request)
        return self._answered(_error(503, "no version available yet"), request)

    async def prometheus(self, request: Request) -> Response:
        return self._answered(Response(self.service.metrics.exposition(), media_type=metrics.CONTENT_TYPE), request)


class _Answer(Response):
    """A JSON answer with the request's id and version: Starlette's Response with its headers written directly
    (its general header handling costs as much as the rest of a cached answer)."""

    def __init__(self, content: bytes, status: int, request_id: str, version: str, arm: Optional[str] = None):
        self.status_code = status
        self.body = content
        self.background = None
        self.raw_headers = [
            (b"content-length", str(len(content)).encode()),
            (b"content-type", b"application/json"),
            (b"x-request-id", request_id.encode()),
            (b"x-model-version", version.encode()),
        ]
        if arm is not None:
            self.raw_headers.append((b"x-experiment-arm", arm.encode()))
        if status in (408, 413):  # the body may be unread: the connection can't take another request
            self.raw_headers.append((b"connection", b"close"))


async def _dropped(request: Request, message: str, more: bool) -> contract.RequestError:
    """A 413 for a body too large, once the rest of it was read and dropped (up to DRAIN_BYTES, within the body's
    time): a client still sending it would otherwise find the connection closed instead of the answer."""
    drained = 0
    while more and drained < DRAIN_BYTES:
        received = await request.receive()
        drained += len(received.get("body", b""))
        more = received.get("more_body", False)
    return contract.RequestError(message, 413)


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON)


def _error(status: int, message: str) -> Response:
    return Response(contract.error_body(message), status_code=status, media_type=JSON)


def create_app(settings: ServerSettings) -> Starlette:
    """The ASGI app of one server process: the REST routes and, on --grpc-port, TF Serving's gRPC services, over
    one Service."""
    cpus = settings_lib.usable_cpus()
    threads = max(1, cpus // max(1, settings.workers or cpus))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    service = service_lib.Service(settings)
    rest = RestApi(service)
    routes = [
        Route("/v1/models/{rest:path}", rest.models, methods=["GET", "POST"]),
        Route("/metrics", rest.prometheus, methods=["GET"]),
    ]
    if settings.health_route:
        routes.append(Route(settings.health_route, rest.health, methods=["GET"]))
    if settings.predict_route:
        routes.append(Route(settings.predict_route, rest.vertex_predict, methods=["POST"]))

    async def flush_metrics() -> None:
        while True:
            await asyncio.sleep(metrics.FLUSH_SECONDS)
            service.metrics.flush()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.start()
        flusher = asyncio.get_running_loop().create_task(flush_metrics())
        grpc_server = await grpc_api.start(service) if settings.grpc_port else None
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grpc_api.STOP_GRACE_SECONDS)
            flusher.cancel()
            service.metrics.flush()
            service.stop()

    async def not_routed(request: Request, error: Exception) -> Response:
        """Starlette's own 404 and 405 (a path or method no route takes), in the API's form and headers."""
        status = getattr(error, "status_code", 404)
        what = "no such route" if status == 404 else f"{request.method} is not taken here"
        response = _error(status, f"{what}: {request.url.path[:MAX_ECHOED]!r}")
        response.headers.update(getattr(error, "headers", None) or {})  # 405's Allow
        return rest._answered(response, request)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_routed, 405: not_routed})
    app.state.service = service
    return app


def app_from_environment() -> Starlette:
    """uvicorn's factory in each worker process: the settings `babyweight serve` was started with."""
    settings = settings_lib.from_environment()
    logs.configure(settings)
    return create_app(settings)
