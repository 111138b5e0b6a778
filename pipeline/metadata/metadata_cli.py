"""Reads what the pipeline recorded in ML Metadata: runs, steps, artifacts, lineage, contents, differences.

    babyweight metadata runs
    babyweight metadata run RUN
    babyweight metadata artifacts [--type Model] [--run RUN]
    babyweight metadata lineage [ARTIFACT_ID]        (default: the latest pushed model)
    babyweight metadata show ARTIFACT_ID
    babyweight metadata diff RUN_A RUN_B
Every subcommand takes --json. The store is outputs/metadata.sqlite unless --store or --mysql-* say
otherwise; these flags go before or after the subcommand. RUN may be a run id or a negative index (-1 = the
latest run). A MySQL password is read from --mysql-password-file PATH or the BABYWEIGHT_MYSQL_PASSWORD
environment variable, never from the command line (where `ps` shows it to every user of the machine).
"""

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from ml_metadata import metadata_store
from ml_metadata.proto import metadata_store_pb2

from pipeline.artifacts import GATE_ID, TFLITE_MODEL_TYPE
from pipeline.metadata.mlmd import INPUT_EVENTS, STATES, MetadataError, Store, open_sqlite, value_of


def _timestamp(milliseconds: int) -> str:
    return datetime.datetime.fromtimestamp(milliseconds / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


PASSWORD_VARIABLE = "BABYWEIGHT_MYSQL_PASSWORD"


def mysql_password(path: Optional[str]) -> str:
    """The MySQL password: the first line of the file at `path` if given, else $BABYWEIGHT_MYSQL_PASSWORD, else none."""
    if path is None:
        return os.environ.get(PASSWORD_VARIABLE, "")
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise MetadataError(
            f"--mysql-password-file {path}: can't read it: {getattr(error, 'strerror', None) or error}"
        ) from None
    if not password:
        raise MetadataError(f"--mysql-password-file {path}: the file is empty")
    return password


def connect(args: argparse.Namespace) -> Store:
    """The store named by the flags: MySQL if --mysql-host is given, else the SQLite file."""
    if not args.mysql_host:
        return open_sqlite(args.store)
    config = metadata_store_pb2.ConnectionConfig()
    config.mysql.host = args.mysql_host
    config.mysql.port = args.mysql_port
    config.mysql.database = args.mysql_database
    config.mysql.user = args.mysql_user
    config.mysql.password = mysql_password(args.mysql_password_file)
    try:
        return Store(metadata_store.MetadataStore(config))
    except Exception as error:  # MLMD raises its own status errors with C++ detail
        raise MetadataError(
            f"can't open the ML Metadata store at MySQL {args.mysql_host}:{args.mysql_port}/"
            f"{args.mysql_database}: {error}"
        ) from None


def _sqlite_path(args: argparse.Namespace) -> Optional[str]:
    """The SQLite store's file, or None on MySQL (where an interrupted run can't be told from a live one)."""
    return None if args.mysql_host else args.store


def _run_summary(store: Store, run: metadata_store_pb2.Context, sqlite_path: Optional[str]) -> Dict[str, Any]:
    executions = store.executions(run)
    states = [STATES.get(e.last_known_state, "unknown") for e in executions]
    start, seconds = store.run_times(run)
    return {
        "run": run.name,
        "status": store.run_status(run, sqlite_path),
        "started": _timestamp(start),
        "seconds": seconds,
        "steps": len(executions),
        "cached": states.count("cached"),
    }


def _output_rows(store: Store, outputs: Dict[str, List[metadata_store_pb2.Artifact]]) -> List[Dict[str, Any]]:
    """Output artifacts as rows: key, id, type and URI."""
    return [
        {"key": key, "id": a.id, "type": store.type_name(a), "uri": a.uri}
        for key, artifacts in outputs.items()
        for a in artifacts
    ]


def _steps(store: Store, run: metadata_store_pb2.Context) -> List[Dict[str, Any]]:
    return [
        {
            "step": step.node_id,
            "state": step.state,
            "seconds": step.seconds,
            "outputs": _output_rows(store, step.outputs),
        }
        for step in store.steps(run)
    ]


def _lineage(store: Store, artifact: metadata_store_pb2.Artifact) -> Dict[str, Any]:
    """Every artifact upstream of `artifact` (through the executions that produced them) and its consumers."""
    upstream, seen, frontier = [], {artifact.id}, [artifact]
    while frontier:
        current = frontier.pop(0)
        producer = store.producer(current)
        if producer is None:
            continue
        consumers = [producer]
        if store.node_of(producer) == "Transform":
            # Transform runs only after the DataGate of its run passed; TFX records that as step
            # order, not as an input, so follow it here to reach the anomalies and statistics it checked.
            run = store.run(store.run_of(producer))
            consumers += [e for e in store.executions(run) if store.node_of(e) == GATE_ID]
        for consumer in consumers:
            inputs = [e for e in store.events(execution_ids=[consumer.id]) if e.type in INPUT_EVENTS]
            for parent in store.artifacts_by_id([e.artifact_id for e in inputs]):
                if parent.id not in seen:
                    seen.add(parent.id)
                    upstream.append(dict(store.describe(parent), consumed_by=store.node_of(consumer)))
                    frontier.append(parent)
    consumers = [e for e in store.events(artifact_ids=[artifact.id]) if e.type in INPUT_EVENTS]
    downstream = [
        {
            "step": store.node_of(execution),
            "run": store.run_of(execution),
            "state": STATES.get(execution.last_known_state, "unknown"),
        }
        for execution in store.executions_by_id({e.execution_id for e in consumers})
    ]
    return {"artifact": store.describe(artifact), "upstream": upstream, "downstream": downstream}


def _show(store: Store, artifact: metadata_store_pb2.Artifact) -> Dict[str, Any]:
    """A readable summary of an artifact's content, by its type."""
    from tfx.types.standard_artifacts import HyperParameters, InfraBlessing, TunerResults

    from pipeline.components import infra_validator, monitor, tflite_export
    from pipeline.components.monitor import PredictionStatistics
    from pipeline.components.validation import read_verdict
    from pipeline.reports import summary

    described = store.describe(artifact)
    kind = described["type"]
    if kind == "ExampleStatistics":
        content = {}
        for split, stats in summary.split_stats(artifact).items():
            rows = {}
            for feature in stats.features:
                name = feature.path.step[0]
                common = (
                    feature.num_stats.common_stats
                    if feature.HasField("num_stats")
                    else feature.string_stats.common_stats
                )
                row = {"count": common.num_non_missing, "missing": common.num_missing}
                if feature.HasField("num_stats"):
                    row.update(mean=round(feature.num_stats.mean, 4), std=round(feature.num_stats.std_dev, 4))
                else:
                    row["top"] = [v.value for v in feature.string_stats.top_values[:3]]
                rows[name] = row
            content[split] = {"examples": stats.num_examples, "features": rows}
    elif kind == "ExampleAnomalies":
        verdict = read_verdict(artifact.uri)
        content = {
            "span": verdict.span,
            "compared_with_span": verdict.baseline_span,
            "questions": verdict.answers(),
            "anomalies": verdict.lines(),
        }
    elif kind == "ModelEvaluation":
        import tensorflow_model_analysis as tfma

        validation = tfma.load_validation_result(artifact.uri)
        evaluator = store.producer(artifact)
        thresholds = summary.evaluation_thresholds(store, artifact)
        blessings = store.outputs(evaluator).get("blessing", []) if evaluator else []
        content = {
            "metrics": summary.slice_metrics(artifact.uri),
            "thresholds": thresholds,
            "validation_ok": validation.validation_ok,
            "blessed": bool(blessings) and value_of(blessings[0].custom_properties["blessed"]) == 1,
            "failures": [
                f"{f.metric_key.name} = {f.metric_value.double_value.value:.3f}"
                for s in validation.metric_validations_per_slice
                for f in s.failures
            ],
        }
    elif kind == "ModelBlessing":
        content = {"blessed": described["properties"].get("blessed") == 1}
    elif kind == "PushedModel":
        content = {
            "pushed": described["properties"].get("pushed") == 1,
            "path": described["properties"].get("pushed_destination"),
            "version": described["properties"].get("pushed_version"),
        }
    elif kind == PredictionStatistics.TYPE_NAME:
        content = monitor.read(artifact.uri)
    elif kind == InfraBlessing.TYPE_NAME:
        content = infra_validator.read(artifact.uri)
    elif kind == tflite_export.TFLiteModel.TYPE_NAME:
        content = tflite_export.read(artifact.uri)
    elif kind in (HyperParameters.TYPE_NAME, TunerResults.TYPE_NAME):  # either shows the whole search
        tuner = store.producer(artifact)
        outputs = store.outputs(tuner) if tuner else {}
        if not (outputs.get("best_hyperparameters") and outputs.get("tuner_results")):
            raise MetadataError(
                f"#{artifact.id} {kind}: the Tuner execution that wrote it, and its other output, "
                "are not in ML Metadata"
            )
        content = summary.tuning_record(outputs["best_hyperparameters"][0].uri, outputs["tuner_results"][0].uri)
    else:
        content = {}
    return dict(described, content=content)


def _diff(store: Store, run_a: metadata_store_pb2.Context, run_b: metadata_store_pb2.Context) -> Dict[str, Any]:
    """Which steps ran or were cached in each run, and how their outputs' key numbers changed."""
    steps_a = {s["step"]: s for s in _steps(store, run_a)}
    steps_b = {s["step"]: s for s in _steps(store, run_b)}
    steps = [
        {
            "step": name,
            "a": steps_a.get(name, {}).get("state"),
            "b": steps_b.get(name, {}).get("state"),
            "same_outputs": sorted(o["id"] for o in steps_a.get(name, {}).get("outputs", []))
            == sorted(o["id"] for o in steps_b.get(name, {}).get("outputs", [])),
        }
        for name in list(steps_a) + [n for n in steps_b if n not in steps_a]
    ]

    def numbers(step_outputs: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
        from pipeline.reports import summary

        result = {}
        for output in step_outputs.get("Evaluator", {}).get("outputs", []):
            if output["type"] == "ModelEvaluation":
                overall = summary.slice_metrics(output["uri"]).get("overall", {})
                result.update(
                    {
                        f"eval {k}": round(v, 4)
                        for k, v in overall.items()
                        if k in ("root_mean_squared_error", "mean_absolute_error")
                    }
                )
        for output in step_outputs.get("StatisticsGen", {}).get("outputs", []):
            if output["type"] == "ExampleStatistics":
                for split, stats in summary.split_stats(store.artifact(output["id"])).items():
                    result[f"{split} examples"] = stats.num_examples
        return result

    numbers_a, numbers_b = numbers(steps_a), numbers(steps_b)
    changes = {
        key: {"a": numbers_a.get(key), "b": numbers_b.get(key)} for key in sorted(set(numbers_a) | set(numbers_b))
    }
    return {"a": run_a.name, "b": run_b.name, "steps": steps, "numbers": changes}


def _print_table(rows: List[Dict[str, Any]], columns: List[str]) -> None:
    widths = {c: max([len(c)] + [len(str(row.get(c, ""))) for row in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _human(command: str, result: Any) -> None:
    if command == "runs":
        _print_table(result, ["run", "status", "started", "seconds", "steps", "cached"])
    elif command == "run":
        for step in result:
            print(f"{step['step']:<32} {step['state']:<11} {step['seconds']:7.1f} s")
            for output in step["outputs"]:
                print(f"    {output['key']}: #{output['id']} {output['type']} {output['uri']}")
        stopped = [step["step"] for step in result if step["state"] == "interrupted"]
        if stopped:
            print(
                f"interrupted in {', '.join(stopped)}: no process is running this run any more (killed, or its "
                "machine lost). Run the pipeline again: it reuses every step that completed."
            )
    elif command == "artifacts":
        _print_table(
            [dict(a, properties=json.dumps(a["properties"], sort_keys=True)) for a in result],
            ["id", "type", "producer", "uri", "properties"],
        )
    elif command == "lineage":
        a = result["artifact"]
        print(f"#{a['id']} {a['type']} from {a['producer']}: {a['uri']}")
        print("made from:")
        for item in result["upstream"]:
            print(
                f"  #{item['id']} {item['type']:<20} by {item['producer'] or 'import':<16} "
                f"-> {item['consumed_by']:<16} {item['uri']}"
            )
        print("used by:" if result["downstream"] else "used by: nothing yet")
        for item in result["downstream"]:
            print(f"  {item['step']} in run {item['run']} ({item['state']})")
    elif command == "diff":
        print(f"a = {result['a']}\nb = {result['b']}")
        _print_table(
            [dict(s, outputs="same" if s["same_outputs"] else "new") for s in result["steps"]],
            ["step", "a", "b", "outputs"],
        )
        for key, change in result["numbers"].items():
            print(f"{key}: {change['a']} -> {change['b']}")
    else:  # show
        from pipeline.components.monitor import PredictionStatistics

        print(f"#{result['id']} {result['type']} from {result['producer'] or 'import'}: {result['uri']}")
        content = result["content"]
        if result["type"] == "ExampleStatistics":
            for split, stats in content.items():
                print(f"split {split}: {stats['examples']} examples")
                _print_table(
                    [dict(feature=name, **row) for name, row in stats["features"].items()],
                    ["feature", "count", "missing", "mean", "std", "top"],
                )
        elif result["type"] == "ModelEvaluation":
            _print_table(
                [
                    {
                        "slice": name,
                        "rmse": round(m.get("root_mean_squared_error", float("nan")), 3),
                        "mae": round(m.get("mean_absolute_error", float("nan")), 3),
                        "n": m.get("weighted_example_count"),
                    }
                    for name, m in content["metrics"].items()
                ],
                ["slice", "rmse", "mae", "n"],
            )
            for metric, thresholds in content["thresholds"].items():
                print(f"threshold {metric}: {json.dumps(thresholds)}")
            print(f"blessed: {content['blessed']}" + "".join(f"\n  failed: {f}" for f in content["failures"]))
        elif result["type"] == "InfraBlessing":
            from pipeline.reports.summary import infra_lines

            print("\n".join(infra_lines(content, indent="")))
            budget = content["budget"]
            print(
                f"budget: {budget['max_memory_mb']:g} MiB, p99 {budget['max_p99_ms']:g} ms, "
                f"load within {budget['load_timeout_seconds']:g} s"
            )
        elif result["type"] in ("HyperParameters", "TunerResults"):
            from pipeline.reports.summary import tuning_lines

            print("\n".join(tuning_lines(content, indent="")))
        elif result["type"] == TFLITE_MODEL_TYPE:
            from pipeline.reports.summary import tflite_lines

            print("\n".join(tflite_lines(content, indent="")))
        elif result["type"] == PredictionStatistics.TYPE_NAME:
            from pipeline.reports.summary import monitor_lines

            print("\n".join(line[2:] for line in monitor_lines(content)))
            print("predicted against actual: the run's report plots it (--json prints its grid)")
        else:
            for key, value in list(content.items()) + list(result["properties"].items()):
                print(f"{key}: {value if not isinstance(value, list) else chr(10).join(['', *value])}")


def _latest_pushed_model(store: Store) -> metadata_store_pb2.Artifact:
    pushed = [
        a
        for a in store.artifacts()
        if store.type_name(a) == "PushedModel" and value_of(a.custom_properties["pushed"]) == 1
    ]
    if not pushed:
        raise MetadataError("no model has been pushed yet; pass an artifact id (babyweight metadata artifacts)")
    return pushed[-1]


def run_command(args: argparse.Namespace) -> Any:
    """Executes one subcommand and returns its result as plain data."""
    store = connect(args)
    if args.command == "runs":
        runs = store.runs()
        if not runs:
            raise MetadataError(f"the store at {args.store} has no pipeline runs yet (make run writes one)")
        return [_run_summary(store, run, _sqlite_path(args)) for run in runs]
    if args.command == "run":
        run = store.run(args.run)
        steps = _steps(store, run)
        if store.interrupted(run, _sqlite_path(args)):
            for step in steps:
                step["state"] = "interrupted" if step["state"] == "running" else step["state"]
        return steps
    if args.command == "artifacts":
        artifacts = [store.describe(a) for a in store.artifacts()]
        if args.type:
            known = sorted({a["type"] for a in artifacts})
            if args.type not in known:
                raise MetadataError(f"no artifacts of type {args.type!r}; types: {', '.join(known)}")
            artifacts = [a for a in artifacts if a["type"] == args.type]
        if args.run:
            run = store.run(args.run)
            made = {o["id"] for step in _steps(store, run) for o in step["outputs"]}
            artifacts = [a for a in artifacts if a["id"] in made]
        return artifacts
    if args.command == "lineage":
        return _lineage(store, store.artifact(args.artifact) if args.artifact else _latest_pushed_model(store))
    if args.command == "show":
        return _show(store, store.artifact(args.artifact))
    return _diff(store, store.run(args.run_a), store.run(args.run_b))


def _store_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The flags that pick the store and the output, on the command and on every subcommand, so that they may
    come before or after it; a subcommand's copy has no default, so it never undoes the command's."""
    from pipeline import config as config_lib

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    store = config_lib.load_config().metadata_path if defaults else None
    parser.add_argument(
        "--store", default=default(store), help="SQLite store (default: the local profile's outputs/metadata.sqlite)"
    )
    parser.add_argument(
        "--mysql-host", default=default(None), help="read a MySQL-compatible ML Metadata server instead"
    )
    parser.add_argument("--mysql-port", type=int, default=default(3306))
    parser.add_argument("--mysql-database", default=default("mlmd"))
    parser.add_argument("--mysql-user", default=default("mlmd"))
    parser.add_argument(
        "--mysql-password-file",
        default=default(None),
        metavar="PATH",
        help=f"a file holding the MySQL password (default: ${PASSWORD_VARIABLE}, else none)",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON for scripts")


def build_parser() -> argparse.ArgumentParser:
    """The `babyweight metadata ...` command line."""
    # No abbreviations: `--mysql-password W` must not be taken for --mysql-password-file.
    parser = argparse.ArgumentParser(
        prog="babyweight metadata", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    _store_flags(parser, defaults=True)
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _store_flags(flags, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[flags], allow_abbrev=False)

    command("runs", "pipeline runs with status, start time and duration")
    command("run", "a run's steps, their state and outputs").add_argument("run")
    artifacts = command("artifacts", "artifacts with type, producer, URI and properties")
    artifacts.add_argument("--type")
    artifacts.add_argument("--run")
    command("lineage", "what an artifact was made from and what used it").add_argument("artifact", nargs="?")
    command("show", "an artifact's content, readable").add_argument("artifact")
    diff = command("diff", "what changed between two runs")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """`babyweight metadata SUBCOMMAND ...`; errors are one line on stderr and exit code 1."""
    given = sys.argv[1:] if argv is None else argv
    if any(arg == "--mysql-password" or arg.startswith("--mysql-password=") for arg in given):
        # argparse would repeat the unknown flag's value, the password, in its error.
        print(
            "error: there is no --mysql-password (a password on the command line shows in `ps`): put it in a "
            f"file for --mysql-password-file PATH, or in ${PASSWORD_VARIABLE}",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    # Reading an evaluation (show, diff) loads TensorFlow, whose deprecation warnings are no answer.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        result = run_command(args)
    except MetadataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _human(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
