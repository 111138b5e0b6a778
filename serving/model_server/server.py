"""`babyweight serve`: the prediction server over the pushed models, in worker processes on one port.

babyweight serve                                   # outputs/serving_model on http://127.0.0.1:8501
babyweight serve --model-dir gs://BUCKET/serving_model --host 0.0.0.0 --workers 4
babyweight serve --model-config-file models.config  # TF Serving's model_config_list: policy and labels
"""

import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
from typing import List, Optional

from serving.model_server import logs
from serving.model_server import settings as settings_lib
from serving.model_server.settings import SettingsError

APP_FACTORY = "serving.model_server.app:app_from_environment"
METRICS_PREFIX = "babyweight-metrics-"
METRICS_FOLDER = re.compile(rf"{METRICS_PREFIX}(?P<pid>\d+)-\w+")


def remove_dead_metrics_folders(parent: str) -> List[str]:
    """The counters' folders of servers that died without cleaning up (SIGKILL, OOM): removed; a live one's stay."""
    removed = []
    for folder in pathlib.Path(parent).glob(METRICS_PREFIX + "*"):
        match = METRICS_FOLDER.fullmatch(folder.name)
        try:  # another user's folder (the temporary folder is shared) is theirs to remove
            ours = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.geteuid()
        except OSError:
            continue
        if match is None or not ours or alive(int(match.group("pid"))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    return removed


def alive(pid: int) -> bool:
    """Whether a process of this number runs (on this machine: a pid is known in its own pid namespace only); another
    user's counts."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except (OverflowError, ValueError, OSError):  # no process has such a number
        return False
    return True


def check_port_free(host: str, port: int) -> None:
    """SettingsError if another process listens on the gRPC port. The workers bind it with SO_REUSEPORT (each
    takes its share of the connections): a second server would share it silently, so it is tried alone first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # A listener is what conflicts: an earlier server's connections still closing (TIME_WAIT) are not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SettingsError(f"--grpc-port {port}: can't listen on {host}:{port} ({error.strerror})") from None


def run(settings: settings_lib.ServerSettings) -> None:
    """Starts uvicorn with the settings' workers; returns when it is stopped (Ctrl-C, SIGTERM)."""
    import uvicorn

    from serving.model_server.protocol import LimitedHttpToolsProtocol

    settings_lib.feedback_token(settings)  # a token that can't be read stops the start, not each worker
    logs.configure(settings)
    if settings.grpc_port:
        check_port_free(settings.host, settings.grpc_port)
    workers = settings.workers or settings_lib.usable_cpus()
    # A folder of our own for the workers' counters (an earlier server's would add up with ours), made inside
    # --metrics-dir where given: only it is removed at exit, never the folder given or anything else in it.
    if settings.metrics_dir:
        os.makedirs(settings.metrics_dir, exist_ok=True)
    parent = settings.metrics_dir or tempfile.gettempdir()
    for removed in remove_dead_metrics_folders(parent):
        logging.info("removed %s, left by a server that is gone", removed)
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-", dir=parent)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[settings_lib.ENV_SETTINGS] = settings_lib.to_environment(settings)
    logging.info(
        "serving %s as %r on http://%s:%d/v1/models/%s%s (%d worker process(es))",
        settings.model_dir or "the profile's serving_model folder",
        settings.model_name,
        settings.host,
        settings.port,
        settings.model_name,
        f" and gRPC {settings.host}:{settings.grpc_port}" if settings.grpc_port else "",
        workers,
    )
    try:
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            loop="uvloop",
            http=LimitedHttpToolsProtocol,  # httptools with limits on a request's head (protocol.py)
            limit_concurrency=settings.max_connections,
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
            log_config=None,  # uvicorn's own lines go through the root logger: JSON where the server's are
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    """`babyweight serve [--flags]`: see --help for every setting."""
    try:
        run(settings_lib.parse(argv))
    except SettingsError as error:
        print(f"babyweight serve: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
