"""`babyweight predict-batch`: many predictions in one Beam pipeline; only where they come from and go to differ.

    babyweight predict-batch --input 'data/natality/*.csv' --output outputs/predictions/run1   # files -> files

A source reads records (an id and the original text), a sink writes predictions and rejected records; the
core between them is the same for every pair: each record is parsed into the serving contract's instance
(`serving.contract.check_instance`, the server's own check), predicted by a pushed version through Beam's
RunInference (a model handler calling the version's `serving_raw` signature on batches), and formatted as a
row: the record's id, the prediction, the model version and a timestamp. A record that can't be parsed or
predicted goes to the dead-letter output with its reason and original text; nothing stops the job.
"""
import abc
import csv
import dataclasses
import io
import json
import os
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.ml.inference import base as inference

from models import features

PREDICTIONS, REJECTED = "predictions", "rejected"
BATCH_SIZE = 1024
ALLOWED_LATENESS_SECONDS = 7 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class Record:
    """One instance as read: where it came from (a file and line, a message id) and its original text."""

    id: str
    text: str
    fields: Optional[Dict[str, Any]] = None  # named values, when the source knows them (a CSV row, a table row)


def rejected(record: Record, reason: str) -> Dict[str, Any]:
    return {"id": record.id, "reason": reason, "text": record.text}


class ParseRecord(beam.DoFn):
    """A record -> (id, the model's instance key), or a rejected row on the REJECTED output."""

    def process(self, record: Record) -> Iterator[Any]:
        from serving import client

        try:
            values = record.fields if record.fields is not None else json.loads(record.text)
            if not isinstance(values, dict):
                raise ValueError("expected an object of feature values")
            instance = client.to_instance(values)
        except (ValueError, TypeError) as error:
            yield beam.pvalue.TaggedOutput(REJECTED, rejected(record, str(error)))
            return
        yield record.id, (features.instance_key(instance), record.text)


class VersionHandler(inference.ModelHandler):
    """Beam's RunInference model handler for a pushed version: serving_raw on batches of instance keys."""

    def __init__(self, version_dir: str, batch_size: int = BATCH_SIZE):
        super().__init__()
        self.version_dir = version_dir
        self.batch_size = batch_size

    def load_model(self) -> Any:
        """The loaded SavedModel itself: its objects (the transform's tables) live as long as it does."""
        import tensorflow as tf

        return tf.saved_model.load(self.version_dir)

    def run_inference(self, batch: Sequence[Tuple[Any, str]], model: Any,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[inference.PredictionResult]:
        from serving import loader

        signature = model.signatures["serving_raw"]
        predictions = signature(**loader.columns_of([key for key, _ in batch]))["predictions"].numpy().reshape(-1)
        return [inference.PredictionResult(example, float(value)) for example, value in zip(batch, predictions)]

    def batch_elements_kwargs(self) -> Dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "babyweight"


def newest_version(model_dir: str) -> str:
    """The pushed version folder with the highest number."""
    import tensorflow as tf

    versions = [name.rstrip("/") for name in tf.io.gfile.listdir(model_dir) if name.rstrip("/").isdigit()]
    if not versions:
        raise ValueError(f"{model_dir}: no pushed version (a folder named by a number) to predict with")
    return max(versions, key=int)


class Predict(beam.PTransform):
    """The core every source and sink share: records -> {PREDICTIONS: rows, REJECTED: rows}."""

    def __init__(self, model_dir: str, version: Optional[str] = None):
        super().__init__()
        self.version = version or newest_version(model_dir)
        self.version_dir = os.path.join(model_dir, self.version)

    def expand(self, records: beam.PCollection):  # -> {PREDICTIONS: rows, REJECTED: rows}
        parsed = records | "Parse" >> beam.ParDo(ParseRecord()).with_outputs(REJECTED, main=PREDICTIONS)
        version = int(self.version)

        def row(keyed: Tuple[str, inference.PredictionResult]) -> Dict[str, Any]:
            record_id, result = keyed
            prediction = result.inference
            return {"id": record_id, "prediction": prediction, "model_version": version, "timestamp": time.time()}

        predicted = (parsed[PREDICTIONS]
                     | "RunInference" >> inference.RunInference(inference.KeyedModelHandler(
                         VersionHandler(self.version_dir)))
                     | "Row" >> beam.Map(row))
        return {PREDICTIONS: predicted, REJECTED: parsed[REJECTED]}


class Source(abc.ABC):
    """Reads records (an id and the original text) into a pipeline."""

    @abc.abstractmethod
    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        """The records, as `Record`s."""


class Sink(abc.ABC):
    """Writes the predicted rows and the rejected records."""

    @abc.abstractmethod
    def write(self, predictions: beam.PCollection, rejects: beam.PCollection) -> None:
        """Adds the writes to the pipeline."""


def csv_records(readable_file: Any, root: str = "") -> Iterator[Record]:
    """The rows of one CSV file in the table's schema, named by the file's path under `root` and the row's first
    line; a row that can't be read (its field count isn't the header's, no value at all, a file that isn't UTF-8)
    is a record without fields that is rejected with its reason."""
    path = readable_file.metadata.path
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    try:
        text = readable_file.read().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        yield Record(f"{name}:0", "", {"__error__": f"the file is not UTF-8 text: {error}"})
        return
    lines = io.StringIO(text).readlines()  # the same line breaks as the csv reader's
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    end = reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num  # a quoted field may hold line breaks: the row spans lines
        where = f"{name}:{start}"
        original = "".join(lines[start - 1:end]).rstrip("\r\n")
        if not any(field.strip() for field in row):
            if row:  # a row of empty fields, not a blank line
                yield Record(where, original, {"__error__": "no value in any field"})
            continue
        if len(row) != len(header):
            yield Record(where, original, {"__error__": f"{len(row)} fields; the header has {len(header)}"})
            continue
        yield Record(where, original, {key: value for key, value in zip(header, row) if value != ""})


def glob_root(pattern: str) -> str:
    """The folder of a glob before its first wildcard: ids are paths under it, so equal names in two folders differ."""
    fixed = []
    for part in pattern.split("/"):
        if any(char in part for char in "*?["):
            break
        fixed.append(part)
    return "/".join(fixed[:-1] if len(fixed) == len(pattern.split("/")) else fixed)


class CheckedRecord(beam.DoFn):
    """Rejects a record its source already found broken (a CSV row with the wrong number of fields)."""

    def process(self, record: Record) -> Iterator[Any]:
        if record.fields is not None and "__error__" in record.fields:
            yield beam.pvalue.TaggedOutput(REJECTED, rejected(record, record.fields["__error__"]))
        else:
            yield record


class CsvFiles(Source):
    """Development: CSV files in the table's 31-column schema (a glob), each row a record named file:line."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        return (pipeline | "Match" >> fileio.MatchFiles(self.pattern) | "Open" >> fileio.ReadMatches()
                | "Rows" >> beam.FlatMap(csv_records, glob_root(self.pattern)))


class WatchedFolder(Source):
    """Local streaming: CSV files landing in a folder (a glob), picked up as they appear, in fixed windows."""

    def __init__(self, pattern: str, poll_seconds: float = 5.0, window_seconds: int = 60,
                 stop_after_seconds: float = 0):
        self.pattern = pattern
        self.poll_seconds = poll_seconds
        self.window_seconds = window_seconds
        self.stop_after_seconds = stop_after_seconds  # 0: until stopped

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

        stop = Timestamp.now() + self.stop_after_seconds if self.stop_after_seconds else MAX_TIMESTAMP
        return (pipeline | "Watch" >> fileio.MatchContinuously(self.pattern, interval=self.poll_seconds,
                                                               start_timestamp=Timestamp.now(), stop_timestamp=stop)
                | "Open" >> fileio.ReadMatches() | "Rows" >> beam.FlatMap(csv_records, glob_root(self.pattern))
                | "Window" >> beam.WindowInto(beam.window.FixedWindows(self.window_seconds)))


class Files(Sink):
    """Development: predictions as JSON lines or CSV, rejected records as JSON lines, beside `prefix`; from a
    stream, files per window."""

    def __init__(self, prefix: str, output_format: str = "jsonl", streaming: bool = False):
        self.prefix = prefix
        self.output_format = output_format
        self.streaming = streaming

    def _write_lines(self, lines: beam.PCollection, kind: str, suffix: str, header: Optional[str] = None) -> None:
        name = f"{os.path.basename(self.prefix)}-{kind}"
        if self.streaming:
            lines | f"Write{kind}" >> fileio.WriteToFiles(
                path=os.path.dirname(os.path.abspath(self.prefix)), shards=1,
                file_naming=fileio.default_file_naming(prefix=name, suffix=suffix))
        else:
            lines | f"Write{kind}" >> beam.io.WriteToText(self.prefix + f"-{kind}", suffix, header=header)

    def write(self, predictions: beam.PCollection, rejects: beam.PCollection) -> None:
        if self.output_format == "csv":
            columns = ("id", "prediction", "model_version", "timestamp")

            def line(row: Dict[str, Any]) -> str:
                buffer = io.StringIO()
                csv.writer(buffer, lineterminator="").writerow([row[c] for c in columns])
                return buffer.getvalue()

            self._write_lines(predictions | "CsvLines" >> beam.Map(line), PREDICTIONS, ".csv", ",".join(columns))
        else:
            self._write_lines(predictions | "JsonLines" >> beam.Map(json.dumps), PREDICTIONS, ".jsonl")
        self._write_lines(rejects | "RejectedLines" >> beam.Map(json.dumps), REJECTED, ".jsonl")


def message_record(message: Any) -> Record:
    """A Pub/Sub message -> a record named by its message id, its data the original (JSON) text."""
    return Record(message.message_id or "", message.data.decode("utf-8", errors="replace"))


class PubSubMessages(Source):
    """Production, streaming: JSON messages of a subscription, in fixed windows of `window_seconds`."""

    def __init__(self, subscription: str, window_seconds: int = 60):
        self.subscription = subscription
        self.window_seconds = window_seconds

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        return self.records(pipeline | "ReadPubSub" >> beam.io.ReadFromPubSub(
            subscription=self.subscription, with_attributes=True))

    def records(self, messages: beam.PCollection) -> beam.PCollection:
        """Messages -> windowed records: what the subscription gives, or a TestStream in tests."""
        # The core groups nothing, so a message later than the watermark is predicted like any other (a test
        # checks it); the allowed lateness keeps it for a sink that groups by window, too.
        return (messages | "Records" >> beam.Map(message_record)
                | "Window" >> beam.WindowInto(beam.window.FixedWindows(self.window_seconds),
                                              allowed_lateness=ALLOWED_LATENESS_SECONDS))


class BigQueryRows(Source):
    """Production backfill: the rows of a query in the table's schema, each a record named by its key column."""

    def __init__(self, query: str, key_column: str):
        self.query = query
        self.key_column = key_column

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        key = self.key_column
        return (pipeline | "ReadBigQuery" >> beam.io.ReadFromBigQuery(query=self.query, use_standard_sql=True)
                | "Records" >> beam.Map(lambda row: Record(str(row.get(key)), json.dumps(row, default=str),
                                                           {k: v for k, v in row.items() if v is not None})))


PREDICTION_SCHEMA = "id:STRING,prediction:FLOAT,model_version:INTEGER,timestamp:TIMESTAMP"
REJECTED_SCHEMA = "id:STRING,reason:STRING,text:STRING"


class BigQueryTables(Sink):
    """Production: predictions streamed into a table with a schema; rejected records, and rows BigQuery refused
    to insert, into an error table."""

    def __init__(self, table: str, error_table: str):
        self.table = table
        self.error_table = error_table

    def write(self, predictions: beam.PCollection, rejects: beam.PCollection) -> None:
        from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
        from apache_beam.io.gcp.bigquery_tools import RetryStrategy

        # Transient errors are retried; a row BigQuery refuses for good goes to the error table (the default,
        # retrying always, would stall the stream on it).
        retry = RetryStrategy.RETRY_ON_TRANSIENT_ERROR

        written = predictions | "WritePredictions" >> WriteToBigQuery(
            self.table, schema=PREDICTION_SCHEMA, method=WriteToBigQuery.Method.STREAMING_INSERTS,
            insert_retry_strategy=retry,
            create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=BigQueryDisposition.WRITE_APPEND)
        refused = written.failed_rows_with_errors | "Refused" >> beam.Map(
            lambda failed: {"id": str(failed[1].get("id")), "reason": f"BigQuery refused the row: {failed[2]}",
                            "text": json.dumps(failed[1])})
        ((rejects, refused) | "AllErrors" >> beam.Flatten()
         | "WriteErrors" >> WriteToBigQuery(
             self.error_table, schema=REJECTED_SCHEMA, method=WriteToBigQuery.Method.STREAMING_INSERTS,
             insert_retry_strategy=retry,
             create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
             write_disposition=BigQueryDisposition.WRITE_APPEND))


@dataclasses.dataclass
class Counts:
    read: int
    predicted: int
    rejected: int


def build(pipeline: beam.Pipeline, source: Source, sink: Sink, model_dir: str,
          version: Optional[str] = None) -> Predict:
    """source -> checks -> the core -> sink; returns the core (its version)."""
    read = source.read(pipeline) | "CountRead" >> beam.ParDo(Count("read"))
    records = read | "Checked" >> beam.ParDo(CheckedRecord()).with_outputs(REJECTED, main="ok")
    core = Predict(model_dir, version)
    outputs = records["ok"] | "Predict" >> core
    rejects = ((records[REJECTED], outputs[REJECTED]) | "AllRejected" >> beam.Flatten()
               | "CountRejected" >> beam.ParDo(Count("rejected")))
    predictions = outputs[PREDICTIONS] | "CountPredicted" >> beam.ParDo(Count("predicted"))
    sink.write(predictions, rejects)
    return core


class Count(beam.DoFn):
    """Passes elements on, counting them in the job's metrics (one counter object, not one per element)."""

    def __init__(self, name: str):
        super().__init__()
        self.counter = beam.metrics.Metrics.counter("babyweight", name)

    def process(self, element: Any) -> Iterator[Any]:
        self.counter.inc()
        yield element


def counts(result: Any) -> Counts:
    """Rows read (parsed or not), predicted and rejected, from the pipeline's metrics."""
    found = {}
    for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("babyweight"))["counters"]:
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + counter.committed
    return Counts(found.get("read", 0), found.get("predicted", 0), found.get("rejected", 0))


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

    from pipeline import config as config_lib  # the profile's settings only, as the server reads them

    parser = argparse.ArgumentParser(prog="babyweight predict-batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="files: a glob of CSV files in the table's 31-column schema")
    parser.add_argument("--output", help="files: prefix of the predictions and rejected files")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="files: of the predictions")
    parser.add_argument("--watch", action="store_true", help="files: keep picking up new files (streaming)")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="--watch: how often the folder is listed")
    parser.add_argument("--window-seconds", type=int, default=60, help="--watch: files are written per window")
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
            raise config_lib.ConfigError("a vertex profile reads --subscription (streaming) or --query (backfill), "
                                         "one of them, and writes --table")
        if cloud and args.query and not args.key_column:
            raise config_lib.ConfigError("a backfill needs --key-column: the query's column that names each row")
        if cloud and not (args.model_dir or "").startswith("gs://"):
            raise config_lib.ConfigError("Dataflow's workers read the model from Cloud Storage: pass --model-dir "
                                         "gs://... (the folder of pushed versions)")
        if not cloud and not (args.input and args.output):
            raise config_lib.ConfigError("files -> files needs --input GLOB and --output PREFIX")
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_dir = args.model_dir or config.serving_dir
    try:
        if cloud:
            source = (PubSubMessages(args.subscription) if args.subscription
                      else BigQueryRows(args.query, args.key_column))
            options = cloud_options(config, streaming=bool(args.subscription))
            # A dry run builds the same graph without Dataflow's checks, which already call Google Cloud.
            pipeline = beam.Pipeline() if args.dry_run else beam.Pipeline(options=options)
            build(pipeline, source, BigQueryTables(args.table, args.error_table or args.table + "_errors"),
                  model_dir, args.version)
            if args.dry_run:
                print(f"built the job for {options.get_all_options()['project']}; not submitted")
                return 0
            pipeline.run()
            print(f"submitted to Dataflow: predictions into {args.table} (see the console's Dataflow jobs)")
            return 0
        pipeline = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"] + (["--streaming"] if args.watch
                                                                                      else [])))
        source = (WatchedFolder(args.input, args.poll_seconds, args.window_seconds, args.watch_seconds) if args.watch
                  else CsvFiles(args.input))
        core = build(pipeline, source, Files(args.output, args.format, streaming=args.watch), model_dir, args.version)
        result = pipeline.run()
        result.wait_until_finish()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # TensorFlow's file errors (a missing --model-dir) are no OSError
        import tensorflow as tf

        if not isinstance(error, tf.errors.OpError):
            raise
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    found = counts(result)
    print(f"{found.read} row(s) read from {args.input}, {found.predicted} predicted by version {core.version}, "
          f"{found.rejected} rejected\npredictions: {args.output}-predictions-*.{args.format}\n"
          f"rejected (with reasons): {args.output}-rejected-*.jsonl")
    return 0
