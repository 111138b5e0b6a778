"""`babyweight watch`: the loop that runs itself, one watcher per pipeline output folder (docs/watch.md).

    babyweight watch                                   # until stopped: spans, requests, outcomes
    babyweight watch --experiment-file experiment.yaml # live outcomes from the experiment's feedback store too
    babyweight watch --once                            # one pass (queued runs included), then exit

New span-N/ folders in the data folder start pipeline runs, one at a time, in order; the server's request log
is checked for skew and drift; the live outcomes for decay. Checks and alerts go to outputs/watch/ (watch.sqlite,
alerts.jsonl), the history page, the log, and a webhook if BABYWEIGHT_WATCH_WEBHOOK_URL is set.
Exit status of --once: 0 no alert open, 1 alerts open (listed), 2 it could not run.
"""

import argparse
import fcntl
import logging
import os
import pathlib
import signal
import sys
import time
from typing import List, Optional

import babyweight_cli


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="babyweight watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, for runs too")
    parser.add_argument("--data-dir", type=pathlib.Path, help="the folder new span-N/ folders land in")
    parser.add_argument("--output-dir", type=pathlib.Path, help="the pipeline's output folder")
    parser.add_argument("--request-log", type=pathlib.Path, help="the server's request log (OUTPUT/serving_logs)")
    parser.add_argument("--experiment-file", type=pathlib.Path, help="the server's experiment: live outcomes")
    parser.add_argument("--once", action="store_true", help="one pass, waiting for the runs it starts; then exit")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    return parser.parse_args(argv)


def _hold_watcher_lock(folder: pathlib.Path) -> Optional[int]:
    """One watcher per output folder: the lock is the kernel's, dropped however the watcher ends."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "watcher.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    babyweight_cli.install_quiet_tensorflow()
    from pipeline import config as config_lib
    from pipeline.metadata import watch_store
    from serving.experiments.experiment import ExperimentError, load_config
    from serving.model_server import logs
    from serving.model_server.settings import ServerSettings
    from watch import alerts
    from watch.loop import Sources, Watcher, open_alert_lines

    logs.configure(ServerSettings(log_format=args.log_format))
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # TFMA's deprecation notices, each time runs are read
    try:
        overrides = config_lib.parse_overrides(args.set)
        for name in ("data_dir", "output_dir"):
            if getattr(args, name):
                overrides[name] = str(getattr(args, name).expanduser().resolve())
        config = config_lib.load_config(args.profile, overrides)
        if "{SPAN}" not in config.input_pattern:
            if "input_pattern" in overrides:
                raise config_lib.ConfigError(
                    f"input_pattern {config.input_pattern!r}: the watcher runs spans, so it needs a {{SPAN}} folder"
                )
            # a flat or empty data folder: watch it for the span-N/ folders to come
            overrides["input_pattern"] = config_lib.SPAN_PATTERN
            config = config_lib.load_config(args.profile, overrides)
        alerts.webhook_url()
        state = load_config(str(args.experiment_file)).state if args.experiment_file else None
    except (config_lib.ConfigError, alerts.WebhookError, ExperimentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = watch_store.path_of(config.output_dir).parent
    lock = _hold_watcher_lock(folder)
    if lock is None:
        holder = (folder / "watcher.lock").read_text().strip()
        print(f"error: a watcher (pid {holder or '?'}) already watches {config.output_dir}", file=sys.stderr)
        return 2
    request_log = args.request_log or pathlib.Path(config.output_dir) / "serving_logs"
    run_overrides = [f"{k}={v}" for k, v in overrides.items()]
    watcher = Watcher(config, Sources(request_log, pathlib.Path(state) if state else None), run_overrides)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    logging.info(
        "watch: %s every %g s, checks every %g s",
        config.data_dir,
        config.watch_poll_seconds,
        config.watch_interval_seconds,
    )
    for source in [request_log] + ([pathlib.Path(state)] if state else []):
        if not source.exists():
            logging.warning("watch: %s does not exist yet: nothing to check there until it does", source)
    try:
        if args.once:
            watcher.run_pass(time.time(), check=True)
            while watcher.runs.busy(time.time()) and not stopping:
                time.sleep(min(config.watch_poll_seconds, 2.0))
                watcher.run_pass(time.time(), check=False)
            watcher.run_pass(time.time(), check=True)
            lines = open_alert_lines(watcher.connection)
            print(f"{len(lines) or 'no'} open alert{'' if len(lines) == 1 else 's'}")
            for line in lines:
                print(f"  {line}")
            if watcher.errors:
                print(f"error: {watcher.errors} stage(s) of the pass failed (the log says why)", file=sys.stderr)
                return 2
            return 1 if lines else 0
        while not stopping:
            watcher.run_pass(time.time())
            deadline = time.time() + config.watch_poll_seconds
            while time.time() < deadline and not stopping:
                time.sleep(0.2)
        # SIGTERM: a run in progress goes on, holding its lock; the next watcher adopts it
        if watcher.runs.child is not None:
            child = watcher.runs.child
            logging.info(
                "watch: span %d's run (pid %d) goes on; the next watcher waits for it", child.span, child.process.pid
            )
        logging.info("watch: stopped")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        watcher.close()


if __name__ == "__main__":
    sys.exit(main())
