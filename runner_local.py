"""Runs the babyweight pipeline locally: LocalDagRunner, Beam's DirectRunner, SQLite ML Metadata.

    python runner_local.py                          # the bundled data, outputs under outputs/
    python runner_local.py --data-dir ~/natality_export --output-dir /tmp/run1
    python runner_local.py --set train_epochs=8 --set strategy=mirrored
"""
import argparse
import logging
import os
import pathlib
import sys
import time
import warnings
from typing import List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the summary
warnings.filterwarnings("ignore", category=FutureWarning)  # google-api-core's Python 3.10 notices


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local", help="config profile in pipeline/profiles/ (default: local)")
    parser.add_argument("--data-dir", type=pathlib.Path, help="folder of natality CSV files (31-column export)")
    parser.add_argument("--output-dir", type=pathlib.Path, help="pipeline root, metadata, models and logs go here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile setting, e.g. --set train_epochs=8 (repeatable)")
    return parser.parse_args(argv)


def _console_worthy(record: logging.LogRecord) -> bool:
    """Errors, our own warnings and component progress; the libraries' chatter stays in the file."""
    own = record.name == "root" or record.name.split(".")[0] in ("pipeline", "models", "data")
    return (record.levelno >= logging.ERROR or (own and record.levelno >= logging.WARNING)
            or str(record.msg).startswith("Component "))


def _setup_logging(log_path: pathlib.Path) -> None:
    """Everything at INFO to the run's log file; errors, our warnings and progress to the console."""
    import absl.logging

    log_path.parent.mkdir(parents=True, exist_ok=True)
    absl.logging.use_python_logging()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):  # libraries imported earlier may have installed their own
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    file_handler = logging.FileHandler(log_path)
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_console_worthy)
    for handler in (file_handler, console):
        handler.setFormatter(formatter)
        root.addHandler(handler)


def main(argv: Optional[List[str]] = None) -> int:
    """Checks the input, runs the pipeline and prints its summary; returns the exit code."""
    args = _parse_args(argv)
    from pipeline import config as config_lib

    try:
        overrides = config_lib.parse_overrides(args.set)
        if args.data_dir:
            overrides["data_dir"] = str(args.data_dir.expanduser().resolve())
        if args.output_dir:
            overrides["output_dir"] = str(args.output_dir.expanduser().resolve())
        config = config_lib.load_config(args.profile, overrides)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from pipeline import run as run_lib

    _setup_logging(pathlib.Path(config.log_path))
    started = time.time()
    outcome = run_lib.run_local(config)
    print(outcome.summary)
    print(f"({time.time() - started:.0f} s in all; log: {config.log_path})")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
