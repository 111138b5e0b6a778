"""A year of arrivals: generates spans with a drift, runs the pipeline once per span, prints a table.

    babyweight simulate                                        # 12 spans of 2,000 rows, no drift
    babyweight simulate --spans 6 --married-rate-shift-per-span -0.05 --corrupt 4:type
    make simulate ARGS="--spans 4 --rows 1500"

Span N arrives as span-N/ in the data folder, so that each run ingests it as the newest span, as
CsvExampleGen would see a real feed. Everything goes under --output-dir (default outputs/simulation);
per span the table says what validation found, whether a model was trained, its eval RMSE, whether it
was blessed and which version was pushed.
"""

import argparse
import dataclasses
import logging
import pathlib
import shutil
import sys
from typing import Dict, List, Optional

from data import generator
from pipeline import config as config_lib
from pipeline.commands import run as run_lib
from pipeline.metadata import mlmd
from pipeline.reports import history, report


@dataclasses.dataclass
class SpanResult:
    span: int
    drift: str  # features whose distribution moved beyond their threshold, or '-'
    blocking: str  # blocking anomalies as check:feature, or '-'
    trained: bool
    eval_rmse: Optional[float]
    blessed: Optional[bool]
    pushed_version: str  # '-' when nothing was pushed
    crash: str = ""  # why the run failed, when not because of the data


def span_result(config: config_lib.PipelineConfig, span: int) -> SpanResult:
    """What the latest run did with `span`, read from ML Metadata (its row of the history page)."""
    store = mlmd.open_sqlite(config.metadata_path)
    runs = store.runs()
    row = history.run_row(config, store, runs[-1], len(runs))
    return SpanResult(
        span,
        ", ".join(row.drift_found) or "-",
        ", ".join(row.blocked_by) if row.verdict == "BLOCKED" else "-",
        row.trained,
        row.eval_rmse,
        row.blessed,
        row.pushed_version or "-",
    )


def table(results: List[SpanResult]) -> str:
    """The per-span table the command prints."""
    lines = [
        f"{'span':>4}  {'drift found':<20} {'blocking anomalies':<28} {'trained':<7}  {'eval RMSE':>9}  "
        f"{'blessed':<7}  pushed"
    ]
    for r in results:
        rmse = f"{r.eval_rmse:.3f}" if r.eval_rmse is not None else "-"
        blessed = "-" if r.blessed is None else "yes" if r.blessed else "no"
        trained = "CRASHED" if r.crash else "yes" if r.trained else "no"
        lines.append(
            f"{r.span:>4}  {r.drift:<20} {r.blocking:<28} {trained:<7}  {rmse:>9}  {blessed:<7}  {r.pushed_version}"
        )
    return "\n".join(lines)


def _corruptions(values: List[str], spans: int) -> Dict[int, str]:
    result = {}
    for value in values:
        span, _, kind = value.partition(":")
        if not span.isdigit() or not 1 <= int(span) <= spans or kind not in generator.CORRUPTIONS:
            raise config_lib.ConfigError(
                f"--corrupt {value!r}: expected SPAN:KIND with SPAN in 1-{spans} and KIND "
                f"one of {', '.join(generator.CORRUPTIONS)}"
            )
        result[int(span)] = kind
    return result


def pipeline_config(output_dir: pathlib.Path, overrides: Dict[str, str]) -> config_lib.PipelineConfig:
    """The pipeline's settings for the runs of a simulation under `output_dir`: arrivals in, pipeline_out out."""
    return config_lib.load_config(
        "local", {**overrides, "data_dir": str(output_dir / "arrivals"), "output_dir": str(output_dir / "pipeline_out")}
    )


def simulate(
    spans: int,
    rows: int,
    seed: int,
    output_dir: pathlib.Path,
    drift: generator.Drift,
    corruptions: Dict[int, str],
    overrides: Dict[str, str],
) -> List[SpanResult]:
    """Generates the spans, then for each: lets it arrive, runs the pipeline, records the result."""
    generated, arrivals = output_dir / "generated", output_dir / "arrivals"
    for folder in (generated, arrivals, output_dir / "pipeline_out"):
        shutil.rmtree(folder, ignore_errors=True)
    paths = generator.write(rows, seed, generated, spans=max(spans, 2), drift=drift)[:spans]
    for span, kind in corruptions.items():
        generator.corrupt(paths[span - 1], kind, seed)
    results = []
    for span, path in enumerate(paths, start=1):
        shutil.copytree(path.parent, arrivals / f"span-{span}")
        config = pipeline_config(output_dir, overrides)
        outcome = run_lib.run_local(config)
        logging.info("span %d: %s", span, outcome.summary)
        if outcome.recorded and not outcome.crash:
            results.append(span_result(config, span))
        else:  # nothing of this run in ML Metadata to read (the latest run there is an earlier one), or a crash
            results.append(
                SpanResult(
                    span,
                    "-",
                    "-" if outcome.crash else "input refused (see log)",
                    False,
                    None,
                    None,
                    "-",
                    outcome.crash,
                )
            )
        print(table(results).splitlines()[-1] if span > 1 else table(results), flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """`babyweight simulate`: prints one table row per span as it is processed."""
    parser = argparse.ArgumentParser(prog="babyweight simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=12)
    parser.add_argument("--rows", type=int, default=2000, help="rows per span")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--weight-shift-per-span", type=float, default=0.0, help="pounds added per span")
    parser.add_argument("--married-rate-shift-per-span", type=float, default=0.0)
    parser.add_argument(
        "--corrupt",
        action="append",
        default=[],
        metavar="SPAN:KIND",
        help=f"corrupt one span ({', '.join(generator.CORRUPTIONS)}); repeatable",
    )
    parser.add_argument(
        "--output-dir", type=pathlib.Path, default=pathlib.Path(config_lib.load_config().output_dir) / "simulation"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline setting")
    args = parser.parse_args(argv)
    try:
        corruptions = _corruptions(args.corrupt, args.spans)
        overrides = config_lib.parse_overrides(args.set)
        config_lib.load_config("local", overrides)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    run_lib.setup_logging(args.output_dir / "simulation.log", console=False)
    results = simulate(
        args.spans,
        args.rows,
        args.seed,
        args.output_dir.resolve(),
        generator.Drift(args.weight_shift_per_span, args.married_rate_shift_per_span),
        corruptions,
        overrides,
    )
    print(f"(per-run summaries: {args.output_dir / 'simulation.log'})")
    index = report.reports_dir(pipeline_config(args.output_dir.resolve(), overrides)) / history.INDEX
    if index.is_file():
        print(f"history of the runs, with plots: {index}")
    crashed = [r for r in results if r.crash]
    for result in crashed:
        print(f"span {result.span}: the run crashed: {result.crash}", file=sys.stderr)
    return 1 if crashed else 0
