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
and the version that answered in the X-Request-Id and X-Model-Version headers.
"""

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import re
import secrets
import sqlite3
import time
from typing import Any, Dict, List, Optional, Sequence

import orjson

import babyweight_cli

# Each worker process imports TensorFlow itself: its start-up lines off the console, as the command keeps them.
babyweight_cli.install_quiet_tensorflow()
import tensorflow as tf  # noqa: E402
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from models import features
from serving.core import batching, cache, contract, loader, manager
from serving.experiments import experiment
from serving.model_server import metrics, request_log
from serving.model_server import settings as settings_lib
from serving.model_server.settings import ServerSettings

MODELS_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>/metadata|:predict|:regress|:feedback)?$"
)
JSON = "application/json"
ROUTING_HEADER = experiment.ROUTING_HEADER.encode()
# A client's X-Request-Id: it goes into the request log and joins outcomes, so it is short and plain.
CLIENT_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:/+=-]{{1,{experiment.MAX_REQUEST_ID}}}\Z")
BAD_REQUEST_ID = f"X-Request-Id: at most {experiment.MAX_REQUEST_ID} letters, digits and . _ : / + = - characters"
MAX_ECHOED = 200  # characters of a client's path echoed in an error
MAX_VERSION_DIGITS = 18  # a version number's: int64's, as TF Serving's
BODY_SECONDS = 30.0  # a request body's time to arrive, whole; beyond, 408
DRAIN_BYTES = 64 << 20  # of a body too large, read and dropped before the 413 (then the connection is closed)
TRAFFIC_HEAD_RECORDS = 50_000  # newest request log records read for the traffic's head when a version loads


def default_paths(settings: ServerSettings) -> Dict[str, str]:
    """The model folder and the log folder: the settings', else the local profile's outputs."""
    if settings.model_dir and settings.log_dir:
        return {"model_dir": settings.model_dir, "log_dir": settings.log_dir}
    from pipeline import config as config_lib  # the profile's paths only; serving uses no pipeline component

    config = config_lib.load_config()
    return {
        "model_dir": settings.model_dir or config.serving_dir,
        "log_dir": settings.log_dir or os.path.join(config.output_dir, "serving_logs"),
    }


class ModelServer:
    """What the routes share: the manager, the batcher, the request log and the metrics of one process."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        paths = default_paths(settings)
        self.log_dir = paths["log_dir"]
        self.metrics = metrics.Metrics()
        self.batcher = batching.Batcher(
            settings.max_batch_size, settings.batch_timeout_micros / 1e6, on_batch=self.metrics.batched
        )
        self.manager = manager.Manager(
            settings,
            paths["model_dir"],
            traffic_head=self.traffic_head,
            on_change=_settle_memory,
            on_storage_error=self.metrics.storage_error,
        )
        self.log: Optional[request_log.RequestLog] = None
        self.experiment = None
        if settings.experiment_file:
            config = experiment.load_config(settings.experiment_file)
            self.experiment = experiment.Experiment(config, on_error=self.metrics.experiment_error)
        self._shadows: set = set()  # shadow predictions running after their requests were answered
        self._id_prefix = secrets.token_hex(4)  # tells the worker processes apart in the logs
        self._feedback_token = settings_lib.feedback_token(settings)

    def start(self) -> None:
        if self.settings.request_log_enabled:
            self.log = request_log.RequestLog(
                self.log_dir,
                self.settings.log_max_bytes,
                self.settings.log_keep_files,
                max_total_bytes=self.settings.log_max_total_bytes,
            )
            self.metrics.watch_request_log(self.log.counts)
        self.manager.start()

    def stop(self) -> None:
        self.manager.stop()
        if self.log is not None:
            self.log.close()
        if self.experiment is not None:
            self.experiment.close()

    def traffic_head(self) -> Sequence[features.InstanceKey]:
        """The most frequent instances of the request log, for a loading version's table."""
        if not self.settings.request_log_enabled:
            return ()
        keys = []
        for record in request_log.recent_records(self.log_dir, TRAFFIC_HEAD_RECORDS):
            if isinstance(record.get("instance"), dict):
                try:
                    keys.append(contract.check_instance(0, record["instance"]))
                except contract.RequestError:
                    continue
        return cache.most_frequent(keys, self.settings.cache_head_size)

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
                return self._refused(404, message, self._request_id(request), "none", (action or ":")[1:])
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
        if self._feedback_token is None:
            return _error(
                403,
                f"feedback is off: this server has no feedback token ({settings_lib.FEEDBACK_TOKEN_ENV} or "
                "--feedback-token-file)",
            )
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._feedback_token.encode()):
            response = _error(401, "feedback takes the server's feedback token: Authorization: Bearer TOKEN")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if self.experiment is None:
            return _error(400, "this server runs no experiment (babyweight serve --experiment-file FILE)")
        try:
            items = experiment.parse_feedback(orjson.loads(await self._body(request, None)))
            return _json((await self.experiment.feedback(items)).as_json())
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
                # Beyond TF Serving's answer: what one request may hold, for clients and infra validation.
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
        declared, request_id, routing_key = None, None, None
        for key, value in request.scope["headers"]:  # one pass over the raw headers for those we read
            if key == b"content-length":
                declared = value
            elif key == b"x-request-id":
                request_id = value.decode("latin-1")
            elif key == ROUTING_HEADER:
                routing_key = value.decode("latin-1")
        bad_id = bool(request_id) and CLIENT_REQUEST_ID.match(request_id) is None  # an empty one: none sent
        if not request_id or bad_id:
            request_id = self._new_id()
        version_name = "none"
        arm = shadow = None
        if self.experiment is not None and version is None and label is None:
            arm, shadow = self.experiment.route(routing_key)
            version, label = experiment.arm_target(arm)
        try:
            if bad_id:
                raise contract.RequestError(BAD_REQUEST_ID)
            body = await self._body(request, declared)
            try:
                handle = self.manager.resolve(version, label)
            except (manager.NotFound, manager.Unavailable) as error:
                incumbent = self.experiment.config.arms[0] if arm is not None else None
                if arm is None or arm == incumbent:
                    raise
                # A client that asked for no version is answered: by the incumbent, while the arm can't.
                logging.warning("arm %s can't answer (%s); the incumbent %s answers", arm, error, incumbent)
                arm = incumbent
                handle = self.manager.resolve(*experiment.arm_target(arm))
            version_name = str(handle.version)
            parsed = (
                contract.parse_regress(body, self.settings.max_instances)
                if route == "regress"
                else contract.parse_predict(body, self.settings.max_instances)
            )
            predictions, path = await self._predictions(handle, parsed)
        except contract.RequestError as error:
            return self._refused(error.status, str(error), request_id, version_name, route)
        except manager.NotFound as error:
            return self._refused(404, str(error), request_id, version_name, route)
        except manager.Unavailable as error:
            return self._refused(503, str(error), request_id, version_name, route)
        except batching.NotANumber as error:  # the version's fault: said, counted, never served
            logging.error("request %s: %s", request_id, error)
            self.metrics.not_a_number(version_name)
            return self._refused(500, str(error), request_id, version_name, route)
        except tf.errors.InvalidArgumentError as error:  # the model refuses what the contract's check let through
            return self._refused(400, loader.first_reason(error.message), request_id, version_name, route)
        except Exception:  # a bug, not the request's fault: an answer in the API's form, counted, logged
            logging.exception("request %s failed", request_id)
            return self._refused(
                500,
                f"internal error answering request {request_id} (see the server's log)",
                request_id,
                version_name,
                route,
            )
        if arm is not None and not await self._record(request_id, arm, handle, predictions, shadow, parsed):
            # Outcomes for this id join the earlier request's answer: this one's would be joined wrongly (and an
            # id sent ahead by another client would capture this client's outcomes), so it is not answered.
            message = f"X-Request-Id {request_id!r} was used by an earlier request of this experiment; send a new one"
            return self._refused(409, message, request_id, version_name, route)
        if route == "regress":
            content = orjson.dumps({"results": predictions})
        else:
            content = contract.response(parsed, predictions)
        seconds = time.perf_counter() - started
        self.metrics.request(version_name, route, 200)
        self.metrics.observe(version_name, path, seconds)
        if self.log is not None:
            now = time.time()
            for index, (instance, prediction) in enumerate(zip(parsed.instances, predictions)):
                self.log.write(
                    {
                        "request_id": request_id,
                        "time": now,
                        "model": self.manager.config.name,
                        "version": handle.version,
                        "signature": parsed.signature,
                        "index": index,
                        "instance": instance,
                        "prediction": prediction,
                        "latency_ms": seconds * 1e3,
                        "path": path,
                    }
                )
        return _Answer(content, 200, request_id, version_name, arm)

    async def _record(
        self,
        request_id: str,
        arm: str,
        handle: Any,
        predictions: List[float],
        shadow: Optional[str],
        parsed: contract.Request,
    ) -> bool:
        """The experiment's record of a routed request; in shadow mode the challenger is asked after the answer.
        False (nothing recorded) if the request id was recorded already; a record that failed, or is still waiting
        for the state file after RECORD_WAIT_SECONDS, answers all the same."""
        record = self.experiment.record(request_id, arm, handle.version, predictions)
        try:  # the answer waits a moment for its record (so that a reused id is refused), never for a locked file
            recorded = await asyncio.wait_for(asyncio.shield(record), experiment.RECORD_WAIT_SECONDS)
        except asyncio.TimeoutError:
            recorded = None
        if recorded is False:
            return False
        if shadow is not None:
            task = asyncio.get_running_loop().create_task(self._shadow(request_id, shadow, parsed))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)
        return True

    async def _shadow(self, request_id: str, shadow: str, parsed: contract.Request) -> None:
        """The challenger's predictions for a request already answered, recorded and never returned."""
        try:
            challenger = self.manager.resolve(*experiment.arm_target(shadow))
            shadowed, _ = await self._predictions(challenger, parsed)
            await self.experiment.record(request_id, shadow, challenger.version, shadowed, shadow=True)
        except Exception:  # the shadow's failure is logged, never the client's
            logging.exception("shadow %s failed on request %s", shadow, request_id)

    async def _predictions(self, handle: Any, parsed: contract.Request) -> tuple:
        """The version's predictions for a checked request (floats, in order) and the path they took."""
        table = handle.table
        predictions: List[Optional[float]] = [table.get(key) for key in parsed.keys]
        misses = [index for index, value in enumerate(predictions) if value is None]
        self.metrics.lookups(str(handle.version), len(predictions) - len(misses), len(misses))
        if not misses:
            return predictions, "cache"
        answered = (await self.batcher.predict(handle, [parsed.keys[index] for index in misses])).tolist()
        for index, value in zip(misses, answered):
            predictions[index] = value
        return predictions, "model"

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
        given = request.headers.get("x-request-id")
        return given if given and CLIENT_REQUEST_ID.match(given) else self._new_id()

    def _new_id(self) -> str:
        """The process's prefix, then 128 random bits: no client can guess another's id (and send its outcome)."""
        return f"{self._id_prefix}-{secrets.token_hex(16)}"

    def _refused(self, status: int, message: str, request_id: str, version: str, route: str) -> Response:
        self.metrics.request(version, route, status)
        return _Answer(contract.error_body(message), status, request_id, version)

    async def vertex_predict(self, request: Request) -> Response:
        """Vertex AI's AIP_PREDICT_ROUTE: the default version, Vertex's body ({"instances": ...})."""
        return await self.predict(request, None, None, "predict")

    async def health(self, request: Request) -> Response:
        """Vertex AI's AIP_HEALTH_ROUTE: 200 once a version is available, else 503."""
        if self.manager.available:
            return self._answered(_json({"status": "AVAILABLE", "versions": sorted(self.manager.available)}), request)
        return self._answered(_error(503, "no version available yet"), request)

    async def prometheus(self, request: Request) -> Response:
        return self._answered(Response(self.metrics.exposition(), media_type=metrics.CONTENT_TYPE), request)


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


def _settle_memory() -> None:
    """After a version loads or leaves: collect, then keep what is live out of later collections.

    A version's objects and its table (up to --cache-capacity keys) would otherwise be walked by every full collection
    of the garbage collector, a pause of milliseconds in the middle of requests. What an earlier call froze is
    unfrozen first: a version unloaded since then (its SavedModel's graphs hold reference cycles) is freed only by a
    collection that sees it, and frozen it would stay in memory for good (about 54 MiB a push).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON)


def _error(status: int, message: str) -> Response:
    return Response(contract.error_body(message), status_code=status, media_type=JSON)


def create_app(settings: ServerSettings) -> Starlette:
    """The ASGI app of one server process."""
    cpus = settings_lib.usable_cpus()
    threads = max(1, cpus // max(1, settings.workers or cpus))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    server = ModelServer(settings)
    routes = [
        Route("/v1/models/{rest:path}", server.models, methods=["GET", "POST"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
    ]
    if settings.health_route:
        routes.append(Route(settings.health_route, server.health, methods=["GET"]))
    if settings.predict_route:
        routes.append(Route(settings.predict_route, server.vertex_predict, methods=["POST"]))

    async def flush_metrics() -> None:
        while True:
            await asyncio.sleep(metrics.FLUSH_SECONDS)
            server.metrics.flush()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        server.start()
        flusher = asyncio.get_running_loop().create_task(flush_metrics())
        try:
            yield
        finally:
            flusher.cancel()
            server.metrics.flush()
            server.stop()

    async def not_routed(request: Request, error: Exception) -> Response:
        """Starlette's own 404 and 405 (a path or method no route takes), in the API's form and headers."""
        status = getattr(error, "status_code", 404)
        what = "no such route" if status == 404 else f"{request.method} is not taken here"
        response = _error(status, f"{what}: {request.url.path[:MAX_ECHOED]!r}")
        response.headers.update(getattr(error, "headers", None) or {})  # 405's Allow
        return server._answered(response, request)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_routed, 405: not_routed})
    app.state.server = server
    return app


def app_from_environment() -> Starlette:
    """uvicorn's factory in each worker process: the settings `babyweight serve` was started with."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    return create_app(settings_lib.from_environment())
