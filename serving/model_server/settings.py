"""The server's settings: one frozen object, from `babyweight serve` flags (each field is a flag) or the environment.

Worker processes get the settings of the command that started them through BABYWEIGHT_SERVE_SETTINGS (JSON).
On Vertex AI the platform's variables win: AIP_HTTP_PORT, AIP_STORAGE_URI, AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, List, Mapping, Optional

ENV_SETTINGS = "BABYWEIGHT_SERVE_SETTINGS"
FEEDBACK_TOKEN_ENV = "BABYWEIGHT_FEEDBACK_TOKEN"
MIN_TOKEN_CHARACTERS = 16
MODEL_NAME = "babyweight"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What `babyweight serve` runs with; the help text of each flag is the comment here."""

    model_dir: str = ""  # the pushed models folder (one folder per version), local or gs://; '' = the profile's
    model_name: str = MODEL_NAME  # the NAME in /v1/models/NAME
    model_config_file: str = ""  # TF Serving's model_config_list (version policy, labels); re-read when it changes
    host: str = "127.0.0.1"  # 0.0.0.0 to take requests from other machines (the serving image does)
    port: int = 8501  # TF Serving's REST port
    grpc_port: int = 8500  # TF Serving's gRPC port (PredictionService, ModelService); 0 = no gRPC
    log_format: str = "text"  # the server's log lines: text, or json (one object a line, as Cloud Logging reads)
    workers: int = 0  # server processes, each with its own model copy, batcher and cache; 0 = one per usable CPU
    poll_seconds: float = 1.0  # how often the model folder (and the config file) is looked at for new versions
    max_batch_size: int = 256  # instances per model call, concurrent requests together
    batch_timeout_micros: int = 0  # wait this long for more requests before a call (0: take what is queued)
    max_instances: int = 1024  # instances per request; more is refused with 413
    max_body_bytes: int = 1 << 20  # bytes per request body; more is refused with 413
    max_connections: int = 1000  # per worker: REST connections and requests (503 beyond), gRPC calls at once
    cache_head_size: int = 50_000  # frequent instances predicted when a version loads (training data, request log)
    cache_capacity: int = 200_000  # answers kept per version (the head and what traffic repeats)
    cache_admit_after: int = 2  # an instance is kept after this many model answers for it
    cache_max_bytes: int = 128 << 20  # memory per version's table; the answers traffic added longest ago go first
    prefer_tflite_model: bool = True  # answer with a version's TFLite model where it agrees with its SavedModel
    log_dir: str = ""  # request log folder ('' = OUTPUT_DIR/serving_logs); 'off' = no request log
    log_max_bytes: int = 64 << 20  # a log file is closed and a new one started at this size
    log_keep_files: int = 100  # log files kept in the folder, all processes'; the oldest beyond go (never a live one)
    log_max_total_bytes: int = 1 << 30  # log bytes kept in the folder, all processes'; the oldest files beyond go
    health_route: str = ""  # Vertex AI's AIP_HEALTH_ROUTE: 200 once a version is available
    predict_route: str = ""  # Vertex AI's AIP_PREDICT_ROUTE: predicts with the default version
    metrics_dir: str = ""  # a folder made in it holds the workers' Prometheus counters ('' = the temporary folder)
    experiment_file: str = ""  # A/B split, shadow or bandit between versions (serving/experiments/); '' = none
    feedback_token_file: str = ""  # a file holding the token :feedback requires (else BABYWEIGHT_FEEDBACK_TOKEN)

    @property
    def request_log_enabled(self) -> bool:
        return self.log_dir != "off"


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: those its affinity allows, at most its cgroup's CPU quota rounded up (a
    container started with --cpus 2 on a 64-CPU host gets 2, not 64)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """CPUs the cgroup's quota allows (cgroup v2's cpu.max: the smallest from the process's cgroup up to the root,
    or v1's cpu.cfs_quota_us over cpu.cfs_period_us at the root); None where there is no quota or file to read."""
    try:
        own = next(line[3:] for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines() if line[:3] == "0::")
    except (OSError, StopIteration):
        own = "/"
    own_folder = pathlib.Path(root, own.strip().lstrip("/"))
    quotas = []
    for folder in [own_folder, *own_folder.parents]:
        if not folder.is_relative_to(root):
            break
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":  # an ancestor's quota applies too: the smallest binds
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    if quotas:
        return min(quotas)
    try:
        quota = int(pathlib.Path(root, "cpu", "cpu.cfs_quota_us").read_text())
        period = int(pathlib.Path(root, "cpu", "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


class SettingsError(ValueError):
    """A setting the server can't start with; the message names it."""


def feedback_token(settings: ServerSettings, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The bearer token :feedback requires: the contents of --feedback-token-file, else BABYWEIGHT_FEEDBACK_TOKEN;
    None when neither is set (feedback is then off). A secret is never a flag: flags show in `ps`."""
    environ = os.environ if environ is None else environ
    if settings.feedback_token_file:
        where = f"--feedback-token-file {settings.feedback_token_file}"
        try:
            token = pathlib.Path(settings.feedback_token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise SettingsError(f"{where}: can't read it ({error})") from None
    elif environ.get(FEEDBACK_TOKEN_ENV):
        where, token = FEEDBACK_TOKEN_ENV, environ[FEEDBACK_TOKEN_ENV].strip()
    else:
        return None
    if len(token) < MIN_TOKEN_CHARACTERS or not token.isascii() or not token.isprintable():
        raise SettingsError(
            f"{where}: the token must be at least {MIN_TOKEN_CHARACTERS} printable ASCII characters "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one)"
        )
    return token


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting, with the field's default and comment."""
    comments = _field_comments()
    for field in dataclasses.fields(ServerSettings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_boolean if field.type is bool else field.type,
            default=field.default,
            help=comments.get(field.name, "") + " (default: %(default)r)",
        )


def _boolean(text: str) -> bool:
    """A true/false flag's value, as TF Serving's flags take it (--prefer-tflite-model false)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def from_args(args: argparse.Namespace) -> ServerSettings:
    """Settings from parsed flags, then Vertex AI's variables where the platform sets them."""
    return with_vertex_environment(
        ServerSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)})
    )


def with_vertex_environment(settings: ServerSettings, environ: Optional[Mapping[str, str]] = None) -> ServerSettings:
    """Vertex AI tells a custom serving container its port, routes and model folder in AIP_* variables."""
    environ = os.environ if environ is None else environ
    changes = {
        name: environ[variable]
        for name, variable in (
            ("model_dir", "AIP_STORAGE_URI"),
            ("health_route", "AIP_HEALTH_ROUTE"),
            ("predict_route", "AIP_PREDICT_ROUTE"),
        )
        if environ.get(variable)
    }
    if environ.get("AIP_HTTP_PORT"):  # on Vertex AI: Cloud Logging reads each line's JSON (severity, request id)
        changes.update(port=int(environ["AIP_HTTP_PORT"]), host="0.0.0.0", log_format="json")
    return dataclasses.replace(settings, **changes)


def to_environment(settings: ServerSettings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def from_environment() -> ServerSettings:
    """The settings a worker process was started with."""
    values: Mapping[str, Any] = json.loads(os.environ.get(ENV_SETTINGS, "{}"))
    return ServerSettings(**values)


def _field_comments() -> dict:
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(ServerSettings).splitlines():
        match = re.match(r"\s+(\w+): \w+ = .*?  # (.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def parse(argv: Optional[List[str]] = None, prog: str = "babyweight serve") -> ServerSettings:
    parser = argparse.ArgumentParser(prog=prog)
    add_flags(parser)
    settings = from_args(parser.parse_args(argv))
    if settings.log_format not in ("text", "json"):
        parser.error(f"--log-format must be text or json, not {settings.log_format!r}")
    if not 0 <= settings.grpc_port <= 65535:
        parser.error(f"--grpc-port must be a port number (0 = no gRPC), not {settings.grpc_port}")
    if settings.grpc_port == settings.port:
        parser.error(f"--grpc-port {settings.grpc_port} is the REST port (--port): give another, or 0 for no gRPC")
    for name in POSITIVE:
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {getattr(settings, name)}")
    return settings


# Limits and sizes a server can't work with at 0 (or below).
POSITIVE = (
    "max_batch_size",
    "max_instances",
    "max_body_bytes",
    "max_connections",
    "cache_capacity",
    "cache_admit_after",
    "cache_max_bytes",
    "log_max_bytes",
    "log_keep_files",
    "log_max_total_bytes",
)
