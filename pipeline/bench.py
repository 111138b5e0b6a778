"""Benchmark: runs the pipeline uncached on N rows and prints the seconds per component from ML Metadata.

    make bench                                  # the bundled 20k rows
    make bench ARGS="--rows 200000"             # generated rows
    make bench ARGS="--set beam_direct_running_mode=multi_processing --set beam_direct_num_workers=2"
"""
import argparse
import pathlib
import tempfile
import time

import babyweight_cli
from pipeline import config as config_lib
from pipeline import mlmd


def main() -> None:
    """Generates or takes the data, runs the pipeline once without cache, prints a table of seconds; the
    libraries' logs go to outputs/bench.log, not to the console."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=0, help="generate this many rows (default: the bundled data)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    babyweight_cli.install_quiet_tensorflow()
    from data import generator
    from pipeline import run as run_lib

    log_path = pathlib.Path(config_lib.load_config().output_dir) / "bench.log"
    log_path.unlink(missing_ok=True)  # this run's log only
    run_lib.setup_logging(log_path, console=False)

    with tempfile.TemporaryDirectory(prefix="babyweight-bench-") as work:
        overrides = {"output_dir": str(pathlib.Path(work) / "out"), "enable_cache": "false"}
        if args.rows:
            started = time.time()
            generator.write(args.rows, args.seed, pathlib.Path(work) / "data")
            print(f"generated {args.rows} rows in {time.time() - started:.1f} s")
            overrides["data_dir"] = str(pathlib.Path(work) / "data")
        overrides.update(config_lib.parse_overrides(args.set))
        config = config_lib.load_config("local", overrides)

        started = time.time()
        outcome = run_lib.run_local(config)
        wall = time.time() - started
        store = mlmd.open_sqlite(config.metadata_path)
        steps = store.steps(store.runs()[-1])

    rows = args.rows or "bundled"
    print(f"\nrows: {rows}; beam: {' '.join(config.beam_pipeline_args())}; run ok: {outcome.ok}")
    print(f"{'component':<32} {'state':<9} {'seconds':>8}")
    for step in steps:
        print(f"{step.node_id:<32} {step.state:<9} {step.seconds:8.1f}")
    print(f"{'components total':<42} {sum(step.seconds for step in steps):8.1f}")
    print(f"{'pipeline wall time (check, run, summary)':<42} {wall:8.1f}")
    if not outcome.ok:
        print(outcome.summary)
    print(f"log: {log_path}")


if __name__ == "__main__":
    main()
