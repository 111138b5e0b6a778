"""The server's settings: one frozen object, from `babyweight serve` flags (each field is a flag) or the environment.

Worker processes get the settings of the command that started them through BABYWEIGHT_SERVE_SETTINGS (JSON).
On Vertex AI the platform's variables win: AIP_HTTP_PORT, AIP_STORAGE_URI, AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE.
"""

import argparse
import dataclasses
import json
import os
from typing import Any, List, Mapping, Optional

ENV_SETTINGS = "BABYWEIGHT_SERVE_SETTINGS"
MODEL_NAME = "babyweight"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What `babyweight serve` runs with; the help text of each flag is the comment here."""

    model_dir: str = ""  # the pushed models folder (one folder per version), local or gs://; '' = the profile's
    model_name: str = MODEL_NAME  # the NAME in /v1/models/NAME
    model_config_file: str = ""  # TF Serving's model_config_list (version policy, labels); re-read when it changes
    host: str = "127.0.0.1"  # 0.0.0.0 to take requests from other machines (the serving image does)
    port: int = 8501  # TF Serving's REST port
    workers: int = 0  # server processes, each with its own model copy, batcher and cache; 0 = one per CPU
    poll_seconds: float = 1.0  # how often the model folder (and the config file) is looked at for new versions
    max_batch_size: int = 256  # instances per model call, concurrent requests together
    batch_timeout_micros: int = 0  # wait this long for more requests before a call (0: take what is queued)
    max_instances: int = 1024  # instances per request; more is refused with 413
    max_body_bytes: int = 1 << 20  # bytes per request body; more is refused with 413
    cache_head_size: int = 50_000  # frequent instances predicted when a version loads (training data, request log)
    cache_capacity: int = 200_000  # answers kept per version (the head and what traffic repeats)
    cache_admit_after: int = 2  # an instance is kept after this many model answers for it
    log_dir: str = ""  # request log folder ('' = OUTPUT_DIR/serving_logs); 'off' = no request log
    log_max_bytes: int = 64 << 20  # a log file is closed and a new one started at this size
    log_keep_files: int = 20  # older log files beyond this many are deleted
    health_route: str = ""  # Vertex AI's AIP_HEALTH_ROUTE: 200 once a version is available
    predict_route: str = ""  # Vertex AI's AIP_PREDICT_ROUTE: predicts with the default version
    metrics_dir: str = ""  # where worker processes keep Prometheus counters ('' = a fresh temporary folder)
    experiment_file: str = (
        ""  # an A/B split, shadow or bandit between versions (serving/experiments/experiment.py); '' = none
    )

    @property
    def request_log_enabled(self) -> bool:
        return self.log_dir != "off"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting, with the field's default and comment."""
    comments = _field_comments()
    for field in dataclasses.fields(ServerSettings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=field.type,
            default=field.default,
            help=comments.get(field.name, "") + " (default: %(default)r)",
        )


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
    if environ.get("AIP_HTTP_PORT"):
        changes.update(port=int(environ["AIP_HTTP_PORT"]), host="0.0.0.0")
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
    return from_args(parser.parse_args(argv))
