"""One pipeline run of one span, started by `babyweight watch` (watch/runs.py) in a process of its own.

It runs what `make run` runs, pinned to the span (input_span), and writes how it ended to --outcome last, whole
(a temporary file renamed): {ok, blocked, crash, recorded, summary}. The run lock the watcher passed down stays
held until this process ends, however it ends.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
from typing import List, Optional

import babyweight_cli


def write_outcome(path: pathlib.Path, outcome: dict) -> None:
    """Writes the outcome whole or not at all: a reader never sees half of it."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".outcome-", delete=False) as handle:
        json.dump(outcome, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--span", type=int, required=True)
    parser.add_argument("--outcome", type=pathlib.Path, required=True)
    parser.add_argument("--lock-fd", type=int, help="the run lock's descriptor, held for the run's life")
    args = parser.parse_args(argv)
    if args.lock_fd is not None:
        os.set_inheritable(args.lock_fd, False)  # a process this run starts must not hold the lock after it
    babyweight_cli.install_quiet_tensorflow()
    from pipeline import config as config_lib
    from pipeline.commands import run as run_lib

    overrides = {**config_lib.parse_overrides(args.set), "input_span": str(args.span)}
    config = config_lib.load_config(args.profile, overrides)
    run_lib.setup_logging(pathlib.Path(config.log_path), console=False)
    outcome = run_lib.run_local(config)
    print(outcome.summary, flush=True)
    write_outcome(
        args.outcome,
        {
            "ok": outcome.ok,
            "blocked": not outcome.ok and not outcome.crash,
            "crash": outcome.crash,
            "recorded": outcome.recorded,
            "summary": outcome.summary,
        },
    )
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
