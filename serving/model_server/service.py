"""What a request meets below its protocol: the manager, the batcher, the prediction table, the experiment, the request
log and the metrics of one server process. REST (app.py) and gRPC (grpc_api.py) read and answer requests in their
own formats; a checked request takes one path here, and its answer or refusal is an `Outcome` either turns into its
own form (an HTTP status, or the gRPC code TF Serving gives for it).
"""

import asyncio
import dataclasses
import gc
import logging
import os
import re
import secrets
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import tensorflow as tf

from models import features
from serving.core import batching, cache, contract, loader, manager
from serving.experiments import experiment
from serving.model_server import metrics, request_log
from serving.model_server import settings as settings_lib
from serving.model_server.settings import ServerSettings

# A client's request id (it joins outcomes) and client id (a label it chooses for its traffic, not who it is): both
# go into the request log, so they are short and plain.
CLIENT_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:/+=-]{{1,{experiment.MAX_REQUEST_ID}}}\Z")
PLAIN_CHARACTERS = f"at most {experiment.MAX_REQUEST_ID} letters, digits and . _ : / + = - characters"
BAD_REQUEST_ID = f"X-Request-Id: {PLAIN_CHARACTERS}"
BAD_CLIENT_ID = f"X-Client-Id: {PLAIN_CHARACTERS}"
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


@dataclasses.dataclass
class Outcome:
    """A prediction request's end: answered (status 200, predictions) or refused (an HTTP status and a message)."""

    status: int
    request_id: str
    version: str  # the version that answered or refused, "none" where none was chosen
    message: str = ""
    predictions: Optional[List[float]] = None
    parsed: Optional[contract.Request] = None
    arm: Optional[str] = None  # the experiment's arm that answered


class Service:
    """One process's serving state, shared by its protocols."""

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
            on_change=settle_memory,
            on_storage_error=self.metrics.storage_error,
        )
        self.metrics.watch_versions(self.manager)
        self.log: Optional[request_log.RequestLog] = None
        self.experiment = None
        if settings.experiment_file:
            config = experiment.load_config(settings.experiment_file)
            self.experiment = experiment.Experiment(config, on_error=self.metrics.experiment_error)
        self._shadows: set = set()  # shadow predictions running after their requests were answered
        self._id_prefix = secrets.token_hex(4)  # tells the worker processes apart in the logs
        self.feedback_token = settings_lib.feedback_token(settings)

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

    def request_id(self, given: Optional[str]) -> tuple:
        """(the request's id, whether the client's was refused): the client's where it is one, else a new one."""
        bad = bool(given) and CLIENT_REQUEST_ID.match(given) is None  # an empty one: none sent
        return (given, False) if given and not bad else (self.new_id(), bad)

    def client_id(self, given: Optional[str]) -> tuple:
        """(the request's client id, whether the client's was refused): the X-Client-Id sent, else ""."""
        bad = bool(given) and CLIENT_REQUEST_ID.match(given) is None
        return ("" if bad or not given else given), bad

    def new_id(self) -> str:
        """The process's prefix, then 128 random bits: no client can guess another's id (and send its outcome)."""
        return f"{self._id_prefix}-{secrets.token_hex(16)}"

    def refused(self, status: int, message: str, request_id: str, version: str, route: str) -> Outcome:
        self.metrics.request(version, route, status)
        return Outcome(status, request_id, version, message)

    async def answer(
        self,
        parse: Callable[[], contract.Request],
        version: Optional[int],
        label: Optional[str],
        route: str,
        request_id: str,
        routing_key: Optional[str],
        started: float,
        client: str = "",
    ) -> Outcome:
        """A request's predictions: the version chosen (by the client, else the experiment), the request read
        (`parse` raises RequestError naming the instance and feature), the table or the model asked, the answer
        recorded, logged (with the client id checked by client_id) and counted. Every failure is a refusal with its
        status; nothing raises."""
        version_name = "none"
        arm = shadow = None
        if self.experiment is not None and version is None and label is None:
            arm, shadow = self.experiment.route(routing_key)
            version, label = experiment.arm_target(arm)
        try:
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
            parsed = parse()
            predictions, path = await self.predictions(handle, parsed)
        except contract.RequestError as error:
            return self.refused(error.status, str(error), request_id, version_name, route)
        except manager.NotFound as error:
            return self.refused(404, str(error), request_id, version_name, route)
        except manager.Unavailable as error:
            return self.refused(503, str(error), request_id, version_name, route)
        except batching.NotANumber as error:  # the version's fault: said, counted, never served
            logging.error("request %s: %s", request_id, error, extra={"request_id": request_id})
            self.metrics.not_a_number(version_name)
            return self.refused(500, str(error), request_id, version_name, route)
        except tf.errors.InvalidArgumentError as error:  # the model refuses what the contract's check let through
            return self.refused(400, loader.first_reason(error.message), request_id, version_name, route)
        except Exception:  # a bug, not the request's fault: an answer in the API's form, counted, logged
            logging.exception("request %s failed", request_id, extra={"request_id": request_id})
            message = f"internal error answering request {request_id} (see the server's log)"
            return self.refused(500, message, request_id, version_name, route)
        if arm is not None and not await self._record(request_id, arm, handle, predictions, shadow, parsed):
            # Outcomes for this id join the earlier request's answer: this one's would be joined wrongly (and an
            # id sent ahead by another client would capture this client's outcomes), so it is not answered.
            message = f"X-Request-Id {request_id!r} was used by an earlier request of this experiment; send a new one"
            return self.refused(409, message, request_id, version_name, route)
        seconds = time.perf_counter() - started
        self.metrics.request(version_name, route, 200)
        self.metrics.observe(version_name, path, seconds)
        if self.log is not None:
            now = time.time()
            for index, (instance, prediction) in enumerate(zip(parsed.instances, predictions)):
                self.log.write(
                    {
                        "request_id": request_id,
                        "client": client,
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
        return Outcome(200, request_id, version_name, predictions=predictions, parsed=parsed, arm=arm)

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
            shadowed, _ = await self.predictions(challenger, parsed)
            await self.experiment.record(request_id, shadow, challenger.version, shadowed, shadow=True)
        except Exception:  # the shadow's failure is logged, never the client's
            logging.exception("shadow %s failed on request %s", shadow, request_id, extra={"request_id": request_id})

    async def predictions(self, handle: Any, parsed: contract.Request) -> tuple:
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


def settle_memory() -> None:
    """After a version loads or leaves: collect, then keep what is live out of later collections.

    A version's objects and its table (up to --cache-capacity keys) would otherwise be walked by every full collection
    of the garbage collector, a pause of milliseconds in the middle of requests. What an earlier call froze is
    unfrozen first: a version unloaded since then (its SavedModel's graphs hold reference cycles) is freed only by a
    collection that sees it, and frozen it would stay in memory for good (about 54 MiB a push).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
