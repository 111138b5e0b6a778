"""Runs the babyweight pipeline locally: LocalDagRunner, Beam's DirectRunner, SQLite ML Metadata.

python runner_local.py                          # the bundled data, outputs under outputs/
python runner_local.py --data-dir ~/natality_export --output-dir /tmp/run1
python runner_local.py --set train_epochs=8 --set strategy=mirrored
"""

import argparse
import pathlib
import sys
import time
from typing import List, Optional

import babyweight_cli


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local", help="config profile in pipeline/profiles/ (default: local)")
    parser.add_argument("--data-dir", type=pathlib.Path, help="folder of natality CSV files (31-column export)")
    parser.add_argument("--output-dir", type=pathlib.Path, help="pipeline root, metadata, models and logs go here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile setting, e.g. --set train_epochs=8 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Checks the input, runs the pipeline and prints its summary; returns the exit code."""
    args = _parse_args(argv)
    # What `make run` and the `babyweight` command set: Keras 2, and TensorFlow's start-up lines (CUDA plugin
    # registrations) and the libraries' version notices kept off the console.
    babyweight_cli.install_quiet_tensorflow()
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

    from pipeline.commands import run as run_lib

    run_lib.setup_logging(pathlib.Path(config.log_path))
    started = time.time()
    outcome = run_lib.run_local(config)
    print(outcome.summary)
    print(f"({time.time() - started:.0f} s in all; log: {config.log_path})")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
