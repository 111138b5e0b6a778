"""`babyweight predict-batch`: many predictions in one Beam pipeline; only where they come from and go to differ.

babyweight predict-batch --input 'data/natality/*.csv' --output outputs/predictions/run1   # files -> files
"""

import os
from typing import Any, Iterable, List, Optional

import apache_beam as beam

from serving.batch.core import PREDICTIONS, REJECTED, Counts, build, counts
from serving.batch.io import (
    BigQueryRows,
    BigQueryTables,
    CsvFiles,
    Files,
    PubSubMessages,
    WatchedFolder,
    matched_files,
    output_files,
    remove_earlier_outputs,
)


def written_rows(prefix: str, kind: str, earlier: Iterable[str] = ()) -> int:
    """The rows in the files a local job has written (`earlier`: files there before it started)."""
    import glob

    return sum(
        sum(1 for line in open(path) if line.strip()) - path.endswith(".csv")  # a CSV file's header
        for path in set(glob.glob(f"{prefix}-{kind}-*")) - set(earlier)
        if not path.endswith(".tmp")
    )


def written_counts(prefix: str, earlier: Iterable[str]) -> Counts:
    """A watching job's counts, from the files it wrote: its metrics can't be read after a long run (Beam's local
    runner merges them recursively, one level per bundle) nor after Ctrl-C."""
    predicted, rejected = written_rows(prefix, PREDICTIONS, earlier), written_rows(prefix, REJECTED, earlier)
    return Counts(predicted + rejected, predicted, rejected)


def stop_watching(prefix: str, earlier: Iterable[str]) -> Any:
    """Ctrl-C's handler for a --watch job, the way such a job ends: says what the job wrote and exits at once.
    (A KeyboardInterrupt could land inside Beam's local runner, which works in this thread, and leave its
    threads running.) Files whose bundles were done are complete; a bundle's unfinished file keeps its .tmp
    name, and the job's files are matched anew when it restarts."""
    import sys

    def stop(signum: int, frame: Any) -> None:
        found = written_counts(prefix, earlier)
        print(
            f"stopped (Ctrl-C): {found.predicted} prediction(s) and {found.rejected} rejected row(s) written "
            f"beside {prefix}; files are matched anew when the job restarts",
            flush=True,
        )
        sys.stderr.flush()
        os._exit(0)

    return stop


def quiet_tensorflow_at_exit() -> None:
    """TensorFlow's functions freed while Python shuts down (the job's loaded model) report a TypeError, their
    module's globals being gone already: noise on the console after every job. Only that report, made while
    the interpreter is finalizing, is dropped; the hook is installed once."""
    import sys

    default = sys.unraisablehook
    if getattr(default, "quiets_tensorflow", False):
        return

    def hook(unraisable: Any) -> None:
        if not (
            sys.is_finalizing()
            and isinstance(unraisable.exc_value, TypeError)
            and getattr(unraisable.object, "__qualname__", "") == "AtomicFunction.__del__"
        ):
            default(unraisable)

    hook.quiets_tensorflow = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def cloud_options(config: Any, streaming: bool) -> Any:
    """Dataflow's options from the vertex profile (project, region, bucket, image, account), streaming or not."""
    from apache_beam.options.pipeline_options import PipelineOptions

    job = f"--job_name={config.pipeline_name}-{'stream' if streaming else 'backfill'}-predictions"
    return PipelineOptions(config.beam_pipeline_args() + [job] + (["--streaming"] if streaming else []))


def main(argv: Optional[List[str]] = None) -> int:
    """`babyweight predict-batch`: files -> files on Beam's DirectRunner, or Pub/Sub or BigQuery -> BigQuery on
    Dataflow with a vertex profile."""
    import argparse
    import sys

    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import (
        config as config_lib,  # the profile's settings only, as the server reads them
    )

    parser = argparse.ArgumentParser(prog="babyweight predict-batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="files: a glob of CSV files in the table's 31-column schema")
    parser.add_argument(
        "--output", help="files: prefix of the predictions and rejected files (an earlier run's there are replaced)"
    )
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="files: of the predictions")
    parser.add_argument("--watch", action="store_true", help="files: keep picking up new files (streaming)")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="--watch: how often the folder is listed")
    parser.add_argument(
        "--window-seconds", type=int, default=60, help="--watch and Pub/Sub: predictions are grouped per window"
    )
    parser.add_argument("--watch-seconds", type=float, default=0, help="--watch: stop after this long (0: Ctrl-C)")
    parser.add_argument("--profile", default="local", help="vertex: run on Dataflow with that profile's settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a profile setting")
    parser.add_argument("--subscription", help="vertex, streaming: projects/P/subscriptions/S of JSON messages")
    parser.add_argument("--query", help="vertex, backfill: a BigQuery query of rows in the table's schema")
    parser.add_argument("--key-column", help="vertex, backfill: the column naming each row")
    parser.add_argument("--table", help="vertex: PROJECT:DATASET.TABLE the predictions are written to")
    parser.add_argument("--error-table", help="vertex: rejected and refused rows (default: TABLE_errors)")
    parser.add_argument("--model-dir", help="the pushed models folder, local or gs:// (default: the profile's)")
    parser.add_argument("--version", help="a pushed version (default: the newest)")
    parser.add_argument("--dry-run", action="store_true", help="vertex: build the job, don't submit it")
    args = parser.parse_args(argv)
    try:
        config = config_lib.load_config(args.profile, config_lib.parse_overrides(args.set))
        cloud = config.orchestrator == "vertex"
        if cloud and not (args.table and bool(args.subscription) != bool(args.query)):
            raise config_lib.ConfigError(
                "a vertex profile reads --subscription (streaming) or --query (backfill), "
                "one of them, and writes --table"
            )
        if args.dry_run and not cloud:
            raise config_lib.ConfigError("--dry-run builds a Dataflow job: it needs --profile vertex")
        if args.dry_run and not args.version:
            raise config_lib.ConfigError(
                "a dry run needs --version N: finding the newest would list the model folder in Cloud Storage"
            )
        if cloud and args.query and not args.key_column:
            raise config_lib.ConfigError("a backfill needs --key-column: the query's column that names each row")
        if cloud and not (args.model_dir or "").startswith("gs://"):
            raise config_lib.ConfigError(
                "Dataflow's workers read the model from Cloud Storage: pass --model-dir "
                "gs://... (the folder of pushed versions)"
            )
        if not cloud and not (args.input and args.output):
            raise config_lib.ConfigError("files -> files needs --input GLOB and --output PREFIX")
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_dir = args.model_dir or config.serving_dir
    try:
        if cloud:
            source = (
                PubSubMessages(args.subscription, args.window_seconds)
                if args.subscription
                else BigQueryRows(args.query, args.key_column)
            )
            options = cloud_options(config, streaming=bool(args.subscription))
            # A dry run builds the same graph without Dataflow's checks, which already call Google Cloud.
            pipeline = beam.Pipeline() if args.dry_run else beam.Pipeline(options=options)
            build(
                pipeline,
                source,
                BigQueryTables(args.table, args.error_table or args.table + "_errors"),
                model_dir,
                args.version,
            )
            if args.dry_run:
                print(f"built the job for {options.get_all_options()['project']}; not submitted")
                return 0
            pipeline.run()
            print(f"submitted to Dataflow: predictions into {args.table} (see the console's Dataflow jobs)")
            return 0
        if not args.watch:  # a watching job waits for files to land
            matched_files(args.input)
        quiet_tensorflow_at_exit()
        pipeline = beam.Pipeline(
            options=PipelineOptions(["--runner=DirectRunner"] + (["--streaming"] if args.watch else []))
        )
        source = (
            WatchedFolder(args.input, args.poll_seconds, args.window_seconds, args.watch_seconds)
            if args.watch
            else CsvFiles(args.input)
        )
        core = build(pipeline, source, Files(args.output, args.format, streaming=args.watch), model_dir, args.version)
        import glob
        import signal

        earlier = glob.glob(f"{args.output}-*")
        before = {} if args.watch else output_files(args.output)
        previous = signal.signal(signal.SIGINT, stop_watching(args.output, earlier)) if args.watch else None
        try:
            result = pipeline.run()
            result.wait_until_finish()
        finally:
            if args.watch:
                signal.signal(signal.SIGINT, previous)
        # Its files written, a run removes an earlier run's it did not rewrite (its 3rd shard where this one wrote
        # 2); a watching job adds files beside those there (restarted, it predicts every file again).
        removed = [] if args.watch else remove_earlier_outputs(args.output, before)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # TensorFlow's file errors (a missing --model-dir) are no OSError
        import tensorflow as tf

        if not isinstance(error, tf.errors.OpError):
            raise
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    found = written_counts(args.output, earlier) if args.watch else counts(result)
    print(
        f"{found.read} row(s) {'of ' + args.input + ' written' if args.watch else 'read from ' + args.input}, "
        f"{found.predicted} predicted by version {core.version}, "
        f"{found.rejected} rejected\npredictions: {args.output}-predictions-*.{args.format}\n"
        f"rejected (with reasons): {args.output}-rejected-*.jsonl"
        + (f"\nremoved {len(removed)} file(s) an earlier run wrote beside {args.output}" if removed else "")
    )
    if args.watch or found.predicted:
        return 0
    if found.rejected:
        print(
            f"error: every row was rejected ({found.rejected} of {found.read}); the rows and the reasons: "
            f"{args.output}-rejected-*.jsonl",
            file=sys.stderr,
        )
    else:
        print(f"error: the files matching {args.input!r} hold no row: nothing was predicted", file=sys.stderr)
    return 1
