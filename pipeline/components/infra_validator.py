"""Infra validation: the candidate model served by the project's own server before the Pusher may push it.

TFX's InfraValidator starts TensorFlow Serving's binary on the candidate; this project serves with its own server
(serving/, docs/serving.md), so this step starts that one: `babyweight serve` (`python -m serving.model_server.server`)
in a subprocess on a free local port, one worker process with the server's default settings (its warm-up, cache,
batching and request log included), on CPUs as the serving image runs. It blesses the model (TFX's
InfraBlessing, which TFX's Pusher checks beside the Evaluator's blessing) only if every check passes:

    load      the server loaded the model (its status says AVAILABLE) within the load timeout
    answers   every request got the answer the serving contract (models/features.py) promises: one finite
              prediction within the label's schema domain per instance, or a refusal naming the feature.
              The requests: eval-split rows, one per request; each feature missing, and as each of its
              'unknown' codes; only the required features; each number at its schema domain's bounds (the
              next value where a bound is the 'unknown' code) and each value of a text feature's domain; the
              largest request the server takes (its max_instances) and one instance more (413); eval rows
              through :regress.
    memory    the server process's peak resident memory (VmHWM) within the budget
    latency   the p99 of the single-row requests the model answers, sent one after another, within the budget

The blessing's folder holds the checks with their figures (infra_validation.json), the server's log, and TFX's
INFRA_BLESSED or INFRA_NOT_BLESSED file. The server is stopped (SIGTERM, then SIGKILL to its process group) pass
or fail. A model the Evaluator did not bless is not served: its infra blessing says so and is not blessed.
"""

import dataclasses
import http.client
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import psutil
import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import v1 as tfx
from tfx.utils import io_utils, path_utils

from models import features

RECORD_FILE = "infra_validation.json"
SERVER_LOG = "server.log"
MODEL_NAME = "candidate"  # the NAME in the validating server's /v1/models/NAME
REQUEST_TIMEOUT_SECONDS = 60.0
STATUS_TIMEOUT_SECONDS = 5.0
STOP_SECONDS = 15.0
PORT_ATTEMPTS = 3  # a free port can be taken by another process before the server binds it
FAILURES_KEPT = 20  # failed requests listed in the record (all are counted)
REGRESS_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the serving machines allow one server process (config: infra_*)."""

    max_memory_mb: float
    max_p99_ms: float
    load_timeout_seconds: float


@dataclasses.dataclass(frozen=True)
class Case:
    """One request and the answer the serving contract promises for it."""

    name: str
    body: Dict[str, Any]
    status: int = 200  # 200: one valid prediction per instance; 400: a refusal naming one of `names`; 413: too large
    names: Tuple[str, ...] = ()
    route: str = "predict"
    timed: bool = False  # a single eval row: its latency counts in the p99

    @property
    def instances(self) -> List[Any]:
        return self.body["instances" if self.route == "predict" else "examples"]


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    figure: str  # what was measured, next to its limit
    failures: List[str] = dataclasses.field(default_factory=list)


def expect(name: str, instances: List[Dict[str, Any]], route: str = "predict", timed: bool = False) -> Case:
    """A request of `instances` and its promised answer: refused naming a required feature the first instance
    lacking one lacks, or answered."""
    body = {"instances" if route == "predict" else "examples": instances}
    lacking = next((names for names in map(features.missing_required, instances) if names), [])
    return Case(name, body, 400 if lacking else 200, tuple(lacking), route, timed)


def instance_of(row: Mapping[str, Any]) -> Dict[str, Any]:
    """A request instance from a row of `baseline.read_examples`: the features it has, integers as integers."""
    instance: Dict[str, Any] = {}
    for column in features.FEATURES:
        value = row[column.name]
        if column.dtype == "string":
            if value:
                instance[column.name] = value
        elif not math.isnan(value):
            instance[column.name] = int(value) if column.dtype == "int" else float(value)
    return instance


def domain_values(feature: schema_pb2.Feature, schema: schema_pb2.Schema) -> List[Tuple[str, Any]]:
    """A feature's edge values from its schema domain: a number's minimum and maximum, each value of a text."""
    kind = feature.WhichOneof("domain_info")
    if kind in ("int_domain", "float_domain"):
        domain = getattr(feature, kind)
        return [
            (f"its schema {bound}imum", getattr(domain, bound)) for bound in ("min", "max") if domain.HasField(bound)
        ]
    texts: Sequence[str] = ()
    if kind == "string_domain":
        texts = feature.string_domain.value
    elif kind == "domain":  # the name of a string domain of the schema's
        texts = next((d.value for d in schema.string_domain if d.name == feature.domain), ())
    return [("a value of its domain", text) for text in texts]


def complete_instance(instances: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The first instance with every required feature, each feature it lacks taken from the first that has one."""
    base = dict(next(i for i in instances if not features.missing_required(i)))
    for column in features.FEATURES:
        if features.is_missing_value(column, base.get(column.name)):
            base.pop(column.name, None)
            found = next(
                (i[column.name] for i in instances if not features.is_missing_value(column, i.get(column.name))), None
            )
            if found is not None:
                base[column.name] = found
    return base


def edge_cases(base: Dict[str, Any], schema: schema_pb2.Schema) -> List[Case]:
    """The serving contract's edge cases around a complete instance: features missing, 'unknown', at their bounds."""
    in_schema = {f.name: f for f in schema.feature}
    cases = [expect("only the required features", [{c.name: base[c.name] for c in features.REQUIRED_FEATURES}])]
    for column in features.FEATURES:
        cases.append(expect(f"{column.name} missing", [{k: v for k, v in base.items() if k != column.name}]))
        for code in column.missing_codes:
            cases.append(
                expect(f"{column.name} = {code:g} (its 'unknown' code)", [dict(base, **{column.name: int(code)})])
            )
        if column.name in in_schema:
            for why, value in domain_values(in_schema[column.name], schema):
                if value in column.missing_codes:  # the domain's bound is the 'unknown' code: the next value in
                    step = -1 if "maximum" in why else 1
                    while value in column.missing_codes:
                        value += step
                    why += ", next to the 'unknown' code"
                cases.append(expect(f"{column.name} = {value} ({why})", [dict(base, **{column.name: value})]))
    return cases


def request_cases(instances: Sequence[Dict[str, Any]], schema: schema_pb2.Schema, max_instances: int) -> List[Case]:
    """Every request the validator sends: the eval rows one by one, the edge cases, the size limit, :regress."""
    answerable = [i for i in instances if not features.missing_required(i)]
    if not answerable:
        raise ValueError(
            f"none of the {len(instances)} eval rows has every required feature "
            f"({', '.join(c.name for c in features.REQUIRED_FEATURES)}): nothing to send"
        )
    cases = [expect(f"eval row {number}", [instance]) for number, instance in enumerate(instances)]
    cases = [dataclasses.replace(case, timed=case.status == 200) for case in cases]  # refusals never reach the model
    cases += edge_cases(complete_instance(instances), schema)
    largest = [answerable[k % len(answerable)] for k in range(max_instances)]
    cases.append(Case(f"the largest request the server takes ({max_instances} instances)", {"instances": largest}))
    cases.append(Case(f"one instance over the limit ({max_instances + 1})", {"instances": largest + largest[:1]}, 413))
    cases.append(
        expect(
            f"{min(len(answerable), REGRESS_ROWS)} eval rows through :regress",
            answerable[:REGRESS_ROWS],
            route="regress",
        )
    )
    return cases


def label_bounds(schema: schema_pb2.Schema) -> Tuple[float, float]:
    """The range a prediction must fall in: the label's schema domain, or any finite number."""
    label = next((f for f in schema.feature if f.name == features.LABEL.name), None)
    if label is not None and label.HasField("float_domain"):
        domain = label.float_domain
        return (domain.min if domain.HasField("min") else -math.inf, domain.max if domain.HasField("max") else math.inf)
    return -math.inf, math.inf


def _short(body: Any) -> str:
    text = json.dumps(body) if not isinstance(body, str) else body
    return text if len(text) <= 300 else text[:300] + "..."


def judge(case: Case, status: int, body: Any, bounds: Tuple[float, float]) -> Optional[str]:
    """Why an answer is not the one the contract promises, or None if it is."""
    if status != case.status:
        wanted = {200: "predictions", 400: "a refusal (400)", 413: "a refusal as too large (413)"}[case.status]
        return f"expected {wanted}, got {status}: {_short(body)}"
    if status == 400:
        error = body.get("error", "") if isinstance(body, dict) else ""
        if not any(repr(name) in error for name in case.names):  # quoted, as serving/core/contract.py names it
            return f"refused without naming the lacking feature {case.names[0]!r}: {_short(body)}"
    if status != 200:
        return None
    key = "predictions" if case.route == "predict" else "results"
    answers = body.get(key) if isinstance(body, dict) else None
    if not isinstance(answers, list) or len(answers) != len(case.instances):
        return f"expected {len(case.instances)} {key}, got {_short(body)}"
    low, high = bounds
    for index, answer in enumerate(answers):
        value = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            return (
                f"instance {index}: prediction {_short(value)} is not a number within the label's schema "
                f"domain [{low:g}, {high:g}]"
            )
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environment() -> Dict[str, str]:
    """The validator's environment for the server, less what would make it serve something else: Vertex AI's
    AIP_* variables (another model folder and port) and the GPUs (the serving image runs on CPUs)."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("AIP_")}
    return {**environment, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def peak_memory_mb(pid: int) -> float:
    """A process's peak resident memory (Linux's VmHWM); where /proc has none, its resident memory now."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss / 2**20


class Server:
    """`babyweight serve` on one model folder in its own session (process group), on a free local port; the log
    of every start in one file."""

    def __init__(self, model_dir: str, scratch: str):
        self.model_dir = model_dir
        self.scratch = scratch
        os.makedirs(scratch, exist_ok=True)
        self.log_path = os.path.join(scratch, SERVER_LOG)
        self.process: Optional[subprocess.Popen] = None
        self.port = 0
        self._connection: Optional[http.client.HTTPConnection] = None

    def start(self) -> None:
        self.port = free_port()
        self._connection = None
        command = [
            sys.executable,
            "-m",
            "serving.model_server.server",
            "--model-dir",
            self.model_dir,
            "--model-name",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--grpc-port",
            "0",  # REST is what it validates; the gRPC port would be shared with a server already running
            "--workers",
            "1",
            "--log-dir",
            os.path.join(self.scratch, "requests"),
            "--metrics-dir",
            os.path.join(self.scratch, "metrics"),
        ]
        with open(self.log_path, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_environment()
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to whatever of its process group is left."""
        if self._connection is not None:
            self._connection.close()
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                logging.warning("the validating server did not stop in %.0f s: killed", STOP_SECONDS)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, lines: int = 6) -> str:
        with open(self.log_path, errors="replace") as log:
            return " | ".join(line.strip() for line in log.readlines()[-lines:] if line.strip())

    def request(
        self, method: str, path: str, body: Optional[bytes] = None, timeout: float = REQUEST_TIMEOUT_SECONDS
    ) -> Tuple[int, Any]:
        """(status, parsed JSON) on one kept-alive connection; raises OSError if there is no answer."""
        if self._connection is None:
            self._connection = http.client.HTTPConnection("127.0.0.1", self.port)
        self._connection.timeout = timeout
        if self._connection.sock is not None:
            self._connection.sock.settimeout(timeout)
        try:
            self._connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
            response = self._connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            self._connection.close()
            self._connection = None
            raise OSError(f"no answer: {error}") from None
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload.decode(errors="replace")

    def wait_until_loaded(self, timeout: float) -> Check:
        """Starts the server (on another port if its port was taken) and waits for the model to be AVAILABLE."""
        started = time.monotonic()
        for attempt in range(PORT_ATTEMPTS):
            self.start()
            while True:
                code = self.process.poll()
                if code is not None:
                    if "address already in use" in self.log_tail().lower() and attempt + 1 < PORT_ATTEMPTS:
                        self.stop()
                        break
                    return Check(
                        "load", False, f"the server exited (code {code}) before loading the model: {self.log_tail()}"
                    )
                try:
                    status, body = self.request("GET", f"/v1/models/{MODEL_NAME}", timeout=STATUS_TIMEOUT_SECONDS)
                    versions = body.get("model_version_status", []) if status == 200 and isinstance(body, dict) else []
                except OSError:
                    versions = []
                if self.process.poll() is not None:
                    continue  # whatever answered, it was not this server: it has exited
                if any(v["state"] == "AVAILABLE" for v in versions):
                    return Check("load", True, f"loaded in {time.monotonic() - started:.1f} s (timeout {timeout:g} s)")
                refused = [v["status"]["error_message"] for v in versions if v["status"]["error_message"]]
                if refused:
                    return Check("load", False, f"the server refused the model: {refused[0]}")
                if time.monotonic() - started > timeout:
                    return Check("load", False, f"not loaded after {timeout:g} s: {self.log_tail()}")
                time.sleep(0.2)
        raise AssertionError("unreachable: the last attempt returns")


def send(server: Server, cases: Sequence[Case], bounds: Tuple[float, float]) -> Tuple[Check, List[float]]:
    """Sends every case one after another; the answers check, and the seconds each timed case took."""
    failures: List[str] = []
    latencies: List[float] = []
    sent = 0
    for case in cases:
        started = time.perf_counter()
        sent += 1
        try:
            status, answer = server.request(
                "POST", f"/v1/models/{MODEL_NAME}:{case.route}", json.dumps(case.body).encode()
            )
        except OSError as error:  # a server that doesn't answer one request is not sent more
            try:
                code = server.process.wait(timeout=2)  # a closed connection: is it dying?
            except subprocess.TimeoutExpired:
                code = None
            why = (
                f"the server died answering it (exit code {code}): {server.log_tail()}"
                if code is not None
                else f"{error} (after {REQUEST_TIMEOUT_SECONDS:.0f} s at most)"
            )
            failures.append(f"{case.name}: {why}; the {len(cases) - sent} request(s) after it were not sent")
            break
        if case.timed:
            latencies.append(time.perf_counter() - started)
        why = judge(case, status, answer, bounds)
        if why:
            failures.append(f"{case.name}: {why}")
    timed = sum(case.timed for case in cases)
    figure = (
        f"{sent - len(failures)} of {len(cases)} requests answered as the serving contract says "
        f"({timed} eval rows one by one, {len(cases) - timed} edge cases and limits)"
    )
    return Check("answers", not failures, figure, failures[:FAILURES_KEPT]), latencies


def validate(
    model_dir: str, instances: Sequence[Dict[str, Any]], schema: schema_pb2.Schema, budget: Budget, scratch: str
) -> Tuple[List[Check], Dict[str, float]]:
    """Serves `model_dir` and runs the checks; the checks and their figures. The server is gone on return."""
    server = Server(model_dir, scratch)
    figures: Dict[str, float] = {}
    if not tf.io.gfile.exists(os.path.join(model_dir, "saved_model.pb")):
        return [Check("load", False, f"no SavedModel in {model_dir} (no saved_model.pb)")], figures
    try:
        load = server.wait_until_loaded(budget.load_timeout_seconds)
        if not load.passed:
            return [load], figures
        try:
            status, metadata = server.request("GET", f"/v1/models/{MODEL_NAME}/metadata")
        except OSError as error:
            status, metadata = None, str(error)
        if status != 200:
            return [load, Check("answers", False, f"the metadata request got {status}: {_short(metadata)}")], figures
        max_instances = (metadata.get("limits") or {}).get("max_instances") if isinstance(metadata, dict) else None
        if not isinstance(max_instances, int):
            return [
                load,
                Check("answers", False, f"the server's metadata names no max_instances: {_short(metadata)}"),
            ], figures
        try:
            cases = request_cases(instances, schema, max_instances)
        except ValueError as error:
            return [load, Check("answers", False, str(error))], figures
        answers, latencies = send(server, cases, label_bounds(schema))
        alive = server.process.poll() is None
        memory = peak_memory_mb(server.process.pid) if alive else math.nan
    finally:
        server.stop()
    checks = [load, answers]
    if alive:
        figures["peak_memory_mb"] = memory
        checks.append(
            Check(
                "memory",
                memory <= budget.max_memory_mb,
                f"peak {memory:.0f} MiB resident (budget {budget.max_memory_mb:.0f} MiB)",
            )
        )
    else:
        checks.append(Check("memory", False, "not measured: the server died"))
    if latencies:
        p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
        figures.update(p50_ms=p50, p99_ms=p99)
        checks.append(
            Check(
                "latency",
                p99 <= budget.max_p99_ms,
                f"p99 {p99:.1f} ms, p50 {p50:.1f} ms over {len(latencies)} single-row requests "
                f"(budget p99 {budget.max_p99_ms:g} ms)",
            )
        )
    else:
        checks.append(Check("latency", False, "not measured: no single-row request was answered"))
    return checks, figures


def read(uri: str) -> Dict[str, Any]:
    """The record an InfraValidator wrote: blessed, the checks with their figures (or why none ran)."""
    return json.loads(io_utils.read_string_file(os.path.join(uri, RECORD_FILE)))


@tfx.dsl.components.component
def InfraValidator(
    model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Model],
    model_blessing: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ModelBlessing],
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    schema: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Schema],
    blessing: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.InfraBlessing],
    code_fingerprint: tfx.dsl.components.Parameter[str],  # pipeline/cache.py: this module and the server's code
    eval_requests: tfx.dsl.components.Parameter[int],
    max_memory_mb: tfx.dsl.components.Parameter[float],
    max_p99_ms: tfx.dsl.components.Parameter[float],
    load_timeout_seconds: tfx.dsl.components.Parameter[float],
) -> None:
    """Serves the Evaluator-blessed `model` with the project's server and blesses it if every check passes."""
    import tensorflow_data_validation as tfdv

    from pipeline.artifacts import EVAL_SPLIT
    from pipeline.components.baseline import read_examples, split_files

    budget = Budget(max_memory_mb, max_p99_ms, load_timeout_seconds)
    record: Dict[str, Any] = {"budget": dataclasses.asdict(budget), "checks": [], "figures": {}}
    if model_blessing.get_int_custom_property("blessed") != 1:
        record["skipped"] = "the Evaluator did not bless the model, so it was not served"
    else:
        rows = read_examples(split_files(examples, EVAL_SPLIT), limit=eval_requests)
        instances = [instance_of(row) for row in rows.to_dict("records")]
        schema_proto = tfdv.load_schema_text(io_utils.get_only_uri_in_dir(schema.uri))
        model_dir = path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))
        with tempfile.TemporaryDirectory(prefix="babyweight-infra-") as scratch:
            try:
                checks, record["figures"] = validate(model_dir, instances, schema_proto, budget, scratch)
            finally:
                if os.path.exists(os.path.join(scratch, SERVER_LOG)):
                    io_utils.copy_file(os.path.join(scratch, SERVER_LOG), os.path.join(blessing.uri, SERVER_LOG), True)
        record["checks"] = [dataclasses.asdict(check) for check in checks]
    failed = [check["name"] for check in record["checks"] if not check["passed"]]
    blessed = bool(record["checks"]) and not failed
    record["blessed"] = blessed
    io_utils.write_string_file(os.path.join(blessing.uri, RECORD_FILE), json.dumps(record, indent=1))
    # TFX's own marks (tfx/components/infra_validator/executor.py), which TFX's Pusher reads.
    io_utils.write_string_file(os.path.join(blessing.uri, "INFRA_BLESSED" if blessed else "INFRA_NOT_BLESSED"), "")
    blessing.set_int_custom_property("blessed", int(blessed))
    blessing.set_string_custom_property("failed_checks", ",".join(failed))
    for name, value in record["figures"].items():
        blessing.set_float_custom_property(name, value)
    for check in record["checks"]:
        logging.log(
            logging.INFO if check["passed"] else logging.WARNING,
            "infra validation %s: %s: %s",
            check["name"],
            "passed" if check["passed"] else "FAILED",
            check["figure"],
        )
