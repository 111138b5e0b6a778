"""What the watch tests share: span folders as they land, a config on them, a webhook receiver, waiting."""

import http.server
import json
import os
import pathlib
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from pipeline import config as config_lib

FAKE_RUN = "tests.watch.fake_run"


def make_span(
    data_dir: pathlib.Path, number: int, behaviour: str = "ok", sleep: float = 0.0, marker: bool = False
) -> pathlib.Path:
    """A span folder as a finished copy leaves it: a CSV of whole lines, with what the fake run does beside it."""
    folder = data_dir / f"span-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "behaviour").write_text(behaviour)
    if sleep:
        (folder / "sleep").write_text(str(sleep))
    (folder / "data.csv").write_text("weight_pounds,mother_age\n7.5,30\n")
    if marker:
        (folder / "_SUCCESS").write_text("")
    return folder


def watch_config(tmp_path: pathlib.Path, **settings: str) -> config_lib.PipelineConfig:
    """The local profile on tmp_path/data and tmp_path/out, spans settled at once unless `settings` say otherwise."""
    values = {
        "data_dir": str(tmp_path / "data"),
        "output_dir": str(tmp_path / "out"),
        "input_pattern": config_lib.SPAN_PATTERN,
        "watch_settle_seconds": "0",
        **settings,
    }
    return config_lib.load_config(overrides=values)


def run_overrides(config: config_lib.PipelineConfig) -> List[str]:
    """The --set flags the watcher passes on to each run: where the fake run finds its span and its ledger."""
    return [f"data_dir={config.data_dir}", f"output_dir={config.output_dir}"]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Polls `condition` until it is true; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment of a watcher subprocess: this one's, quiet, with `extra` and no BABYWEIGHT_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BABYWEIGHT_")}
    env.update({"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore", **extra})
    return env


def watcher_command(data_dir: pathlib.Path, output_dir: pathlib.Path, *flags: str) -> List[str]:
    """The fake watcher (tests/watch/fake_watch.py) on these folders, polling fast."""
    return [
        sys.executable,
        "-m",
        "tests.watch.fake_watch",
        f"--data-dir={data_dir}",
        f"--output-dir={output_dir}",
        "--set=watch_poll_seconds=0.2",
        "--set=watch_settle_seconds=0",
        *flags,
    ]


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST and answers with the next status queued (else 200)."""

    def __init__(self) -> None:
        self.posts: List[Dict] = []
        self.statuses: List[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.posts.append(
                        {
                            "key": self.headers.get("Idempotency-Key"),
                            "authorization": self.headers.get("Authorization"),
                            "body": body,
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def keys(self, status: Optional[int] = 200) -> List[str]:
        """The Idempotency-Keys of the POSTs answered with `status`, in arrival order."""
        with self.lock:
            return [p["key"] for p in self.posts if status is None or p["status"] == status]

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
