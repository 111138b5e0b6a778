"""A prediction server in a subprocess on a free local port, stopped (and checked gone) after the test."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import pytest

from tests.serving import toy_model

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
START_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(
    url: str, body: Optional[Any] = None, headers: Optional[Dict[str, str]] = None, raw: Optional[bytes] = None
) -> Tuple[int, Dict[str, str], Any]:
    """(status, headers, parsed JSON body) of a GET, or of a POST when a body is given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"null")


@contextlib.contextmanager
def running_server(
    model_dir: pathlib.Path,
    log_dir: pathlib.Path,
    *flags: str,
    env: Optional[Dict[str, str]] = None,
    available: int = 1,
    through_make: bool = False,
) -> Iterator[str]:
    """`babyweight serve` on a free port once `available` versions are; yields its URL; SIGTERM at the end, and
    every process must be gone."""
    port = free_port()
    arguments = [
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        "--log-dir",
        str(log_dir),
        "--poll-seconds",
        "0.2",
        "--workers",
        "1",
        "--grpc-port",
        "0",  # a test that calls gRPC gives a free port in `flags` (the last flag wins)
        *flags,
    ]
    command = (
        [sys.executable, "-m", "babyweight_cli", "serve", *arguments]
        if not through_make
        else ["make", "-s", "serve", "ARGS=" + " ".join(arguments)]
    )  # as docs/serving.md says
    inherited = {key: value for key, value in os.environ.items() if key != "BABYWEIGHT_FEEDBACK_TOKEN"}
    environment = {**inherited, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}  # a token only where a test gives one
    port = int(environment.get("AIP_HTTP_PORT", port))
    output = log_dir.parent / f"server-{port}.log"
    with output.open("w") as handle:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert process.poll() is None, f"the server exited: {output.read_text()[-3000:]}"
            try:
                status, _, body = call(f"{url}/v1/models/babyweight")
                if sum(v["state"] == "AVAILABLE" for v in body["model_version_status"]) >= available:
                    break
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            assert time.monotonic() < deadline, (
                f"no version available in {START_SECONDS} s: {output.read_text()[-3000:]}"
            )
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        # Its worker processes (and multiprocessing's helper) are in its session: none may be left.
        deadline = time.monotonic() + 10
        while True:
            leftovers = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True).stdout.split()
            if not leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not leftovers, f"server processes left running: {leftovers}"


@pytest.fixture(scope="module")
def toy_versions(tmp_path_factory) -> pathlib.Path:
    """A models folder with toy versions 1 and 2 (offsets 1 and 2)."""
    root = tmp_path_factory.mktemp("serving_model")
    for version in (1, 2):
        toy_model.save(root / str(version), float(version))
    return root


def wait_for(condition: Callable[[], Any], seconds: float = 10.0, step: float = 0.05) -> Any:
    """What `condition` returns once it is truthy; AssertionError if it isn't within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(step)
    raise AssertionError(f"not within {seconds:g} s")
