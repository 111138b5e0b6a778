"""Benchmark: runs the pipeline uncached on N rows and prints the seconds and rows/s of each step from ML Metadata.

    make bench                                  # the bundled 20k rows
    make bench ARGS="--rows 1000000"            # generated rows
    make bench ARGS="--set beam_direct_running_mode=multi_processing --set beam_direct_num_workers=2"
    make bench ARGS="--rows 1000000 --compare-evaluators"   # then the run's eval split with a baseline, evaluated
                                                            # by the batched engine and by TFMA's, side by side

The table goes to stdout and outputs/bench/pipeline.json; the libraries' logs to outputs/bench.log.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Dict, List, Optional

import babyweight_cli
from pipeline import config as config_lib
from pipeline.metadata import mlmd

# The rows each step reads, by split of the new span ("all": both); steps not listed move no rows.
STEP_ROWS = {
    "CsvExampleGen": "all",
    "StatisticsGen": "all",
    "Transform": "train",
    "TreeBaseline": "all",
    "Tuner": "train",
    "Trainer": "train",
    "Evaluator": "eval",
    "PredictionMonitor": "eval",
}


def split_rows(steps: List[mlmd.StepRecord]) -> Dict[str, int]:
    """Rows per split of the run's new span, from StatisticsGen's statistics (train, eval and all)."""
    import tensorflow_data_validation as tfdv  # pylint: disable=import-outside-toplevel

    rows: Dict[str, int] = {}
    for step in steps:
        if step.node_id == "StatisticsGen" and step.outputs.get("statistics"):
            uri = step.outputs["statistics"][0].uri
            for split in ("train", "eval"):
                stats = tfdv.load_stats_binary(os.path.join(uri, f"Split-{split}", "FeatureStats.pb"))
                rows[split] = stats.datasets[0].num_examples
    if rows:
        rows["all"] = rows["train"] + rows["eval"]
    return rows


def trainer_fit(steps: List[mlmd.StepRecord]) -> Optional[Dict[str, Any]]:
    """The Trainer's own record of its model.fit: examples, seconds and examples/s (models/model.py)."""
    from models import model  # pylint: disable=import-outside-toplevel

    for step in steps:
        if step.node_id == "Trainer" and step.outputs.get("model_run"):
            path = pathlib.Path(step.outputs["model_run"][0].uri) / model.FIT_FILE
            if path.is_file():
                return json.loads(path.read_text())
    return None


def compare_evaluators(
    config: config_lib.PipelineConfig, steps: List[mlmd.StepRecord], rows: Dict[str, int], work: pathlib.Path
) -> Optional[Dict[str, Any]]:
    """The run's eval split evaluated by each engine (pipeline/components/evaluator.py: `evaluate`), the trained model
    against itself as the baseline (two models' work, as a run with a blessed baseline does), with the Beam options
    the run's Evaluator had; their seconds and rows/s."""
    from pipeline.components import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel

    found = {step.node_id: step for step in steps}
    if "Trainer" not in found or "CsvExampleGen" not in found:
        return None
    examples = found["CsvExampleGen"].outputs["examples"][0].uri
    model = found["Trainer"].outputs["model"][0].uri
    result: Dict[str, Any] = {"eval_rows": rows.get("eval", 0)}
    for engine in ("batched", "tfma"):
        # Each engine with the Beam options the pipeline gives its Evaluator (parallel_steps).
        engine_config = dataclasses.replace(config, evaluator_engine=engine)
        in_workers = "Evaluator" in config_lib.parallel_steps(engine_config)
        parallel = config_lib.parallel_beam_args(engine_config, rows.get("all", 0)) if in_workers else []
        beam = config.beam_pipeline_args() + parallel
        ran = evaluator_lib.evaluate(
            engine, examples, model, model, evaluator_lib.eval_config(config), str(work / engine), beam
        )
        result[engine] = {
            "seconds": round(ran["seconds"], 1),
            "rows_per_second": round(rows.get("eval", 0) / ran["seconds"]),
            "blessed": ran["blessed"],
            "beam": " ".join(arg for arg in beam if arg.startswith("--direct_")),
        }
    return result


def main() -> None:
    """Generates or takes the data, runs the pipeline once without cache, prints a table of seconds and
    rows/s; the libraries' logs go to outputs/bench.log, not to the console."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=0, help="generate this many rows (default: the bundled data)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--compare-evaluators",
        action="store_true",
        help="after the run, evaluate its eval split (the model against itself as the baseline) with both engines",
    )
    args = parser.parse_args()
    babyweight_cli.install_quiet_tensorflow()
    from data import generator
    from pipeline.commands import run as run_lib
    from pipeline.reports import summary  # imports TensorFlow: after its quiet import is in place

    output_dir = config_lib.load_config().output_dir
    log_path = pathlib.Path(output_dir) / "bench.log"
    log_path.unlink(missing_ok=True)  # this run's log only
    run_lib.setup_logging(log_path, console=False)

    with tempfile.TemporaryDirectory(prefix="babyweight-bench-") as work:
        overrides = {"output_dir": str(pathlib.Path(work) / "out"), "enable_cache": "false"}
        generated = None
        if args.rows:
            started = time.time()
            generator.write(args.rows, args.seed, pathlib.Path(work) / "data")
            generated = time.time() - started
            print(f"generated {args.rows} rows in {generated:.1f} s")
            overrides["data_dir"] = str(pathlib.Path(work) / "data")
        overrides.update(config_lib.parse_overrides(args.set))
        config = config_lib.load_config("local", overrides)

        started = time.time()
        outcome = run_lib.run_local(config)
        wall = time.time() - started
        store = mlmd.open_sqlite(config.metadata_path)
        steps = store.steps(store.runs()[-1])
        rows = split_rows(steps)
        fit = trainer_fit(steps)
        engines = compare_evaluators(config, steps, rows, pathlib.Path(work)) if args.compare_evaluators else None

    parallel = config_lib.parallel_beam_args(config, rows.get("all", 0))  # as the run gave parallel_steps
    record = {
        "rows": args.rows or config.data_dir,
        "rows_per_split": rows,
        "cores": os.cpu_count(),
        "beam": config.beam_pipeline_args(),
        "beam_parallel_steps": parallel and {step: parallel for step in config_lib.parallel_steps(config)},
        "run_ok": outcome.ok,
        "wall_seconds": round(wall, 1),
        "generated_seconds": generated and round(generated, 1),
        "trainer_fit": fit,
        "steps": [],
    }
    print(
        f"\nrows: {record['rows']} ({', '.join(f'{k} {v}' for k, v in rows.items())}); "
        f"beam: {' '.join(config.beam_pipeline_args()[2:])}"
        + (f" ({', '.join(config_lib.parallel_steps(config))}: {' '.join(parallel)})" if parallel else "")
        + f"; run ok: {outcome.ok}"
    )
    print(f"{'step':<32} {'state':<9} {'seconds':>8} {'rows/s':>10}")
    for step in steps:
        step_rows = rows.get(STEP_ROWS.get(step.node_id, ""), 0)
        per_second = round(step_rows / step.seconds) if step_rows and step.seconds else None
        record["steps"].append(
            {
                "step": step.node_id,
                "state": step.state,
                "seconds": step.seconds,
                "rows": step_rows or None,
                "rows_per_second": per_second,
            }
        )
        print(f"{step.node_id:<32} {step.state:<9} {step.seconds:8.1f} {per_second or '':>10}")
    total = round(sum(step.seconds for step in steps), 1)
    record["components_seconds"] = total
    print(f"{'components total':<42} {total:8.1f}")
    record["side_by_side"] = [list(pair) for pair in mlmd.overlaps(steps)]
    print(f"steps side by side (pipeline/runner.py): {summary.side_by_side(steps)}")
    print(f"{'pipeline wall time (check, run, summary)':<42} {wall:8.1f}")
    if fit:
        print(
            f"Trainer's model.fit: {fit['examples']} examples in {fit['seconds']} s, "
            f"{fit['examples_per_second']} examples/s"
        )
    if engines:
        record["evaluator_engines"] = engines
        batched, tfma_engine = engines["batched"], engines["tfma"]
        print(
            f"Evaluator engines on {engines['eval_rows']} eval rows with a baseline: batched "
            f"{batched['seconds']:.1f} s ({batched['rows_per_second']} rows/s; {batched['beam']}), TFMA "
            f"{tfma_engine['seconds']:.1f} s ({tfma_engine['rows_per_second']} rows/s; {tfma_engine['beam']}): "
            f"{tfma_engine['seconds'] / batched['seconds']:.1f}x"
        )
    if not outcome.ok:
        print(outcome.summary)
    config_lib.write_bench_figures(output_dir, "pipeline", record)
    print(f"log: {log_path}")


if __name__ == "__main__":
    main()
