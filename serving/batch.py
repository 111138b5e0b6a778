"""`babyweight predict-batch`: many predictions in one Beam pipeline; only where they come from and go to differ.

    babyweight predict-batch --input 'data/natality/*.csv' --output outputs/predictions/run1   # files -> files

A source reads batches of records (an id and the original text), a sink writes predictions and rejected
records; the core between them is the same for every pair: each batch is read into the model's inputs by the
serving contract (`client.to_instance`, whose check is the server's, applied a column at a time where the values
allow: `parse`), predicted by a pushed version through Beam's RunInference (a model handler calling the
version's `serving_raw` signature on the batch), and formatted as rows: the record's id, the prediction, the
model version and a timestamp. A record that can't be parsed or predicted goes to the dead-letter output with
its reason and original text; nothing stops the job.
"""
import abc
import csv
import io
import itertools
import json
import logging
import os
import pickle
import time
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.ml.inference import base as inference
import numpy
import orjson

from models import features

PREDICTIONS, REJECTED = "predictions", "rejected"
BATCH_SIZE = 4096  # instances per model call: 1,024 predict at 280,000/s here, 4,096 at 500,000/s
ALLOWED_LATENESS_SECONDS = 7 * 24 * 3600


class Record(NamedTuple):
    """One instance as read: where it came from (a file and line, a message id) and its original text."""

    id: str
    text: str
    fields: Optional[Dict[str, Any]] = None  # named values, when the source knows them (a CSV row, a table row)


BROKEN = "__error__"  # a record's field saying why its source could not read it (a CSV row's field count)


def rejected(record: Record, reason: str) -> Dict[str, Any]:
    return {"id": record.id, "reason": reason, "text": record.text}


class Batch(list):
    """Records or output rows moved through the pipeline as one element."""


class _BatchCoder(beam.coders.Coder):
    """Pickles a batch when the runner moves it, and estimates its size without encoding it: Beam samples the size
    of a step's outputs, and pickling batches of 4,096 records to measure them took a tenth of a run."""

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> Any:
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, value: Any) -> int:
        return 100 * len(value.ids if isinstance(value, Parsed) else value)  # about 100 bytes a record or row


class Parsed(NamedTuple):
    """A batch of records the contract accepts: their ids and serving_raw's inputs, one array per feature."""

    ids: List[str]
    texts: List[str]
    columns: Dict[str, Any]


beam.coders.registry.register_coder(Batch, _BatchCoder)
beam.coders.registry.register_coder(Parsed, _BatchCoder)


_PLAIN_NUMBER = {str, int, float, type(None)}  # what float() reads as the contract does: not bool, not a list
_PLAIN_TEXT = {str, bool, type(None)}  # true/false: a BigQuery BOOL column's values
_TEXT_OF = {None: "", True: "true", False: "false"}


def _plain_columns(values: Sequence[Dict[str, Any]]) -> Optional[Dict[str, numpy.ndarray]]:
    """serving_raw's inputs for instances whose values are all plain (a number or a number's text, a text or
    true/false, none),
    converted a column at a time; None if any value is not, and each instance then takes the contract's own path."""
    columns = {}
    for column in features.FEATURES:
        column_values = list(map(dict.get, values, itertools.repeat(column.name)))
        kinds = set(map(type, column_values))
        if column.dtype == "string":
            if not kinds <= _PLAIN_TEXT:
                return None
            columns[column.name] = numpy.array([_TEXT_OF.get(value, value) for value in column_values], object)
        else:
            if not kinds <= _PLAIN_NUMBER:
                return None
            try:
                columns[column.name] = numpy.array(column_values, numpy.float64).astype(numpy.float32)
            except (ValueError, TypeError):  # a text that is not a number ("" too): the contract names it
                return None
    return columns


def _perhaps_lacking(columns: Dict[str, numpy.ndarray]) -> numpy.ndarray:
    """The instances that may lack a required feature (no value, or one of its 'unknown' codes): the contract's
    own check (`features.missing_required`) decides for each of these; the others have every required one."""
    mask = numpy.zeros(len(next(iter(columns.values()))), bool)
    for column in features.REQUIRED_FEATURES:
        values = columns[column.name]
        if column.dtype == "string":
            mask |= values == ""
        else:
            # An integer column's value is read as the integer it truncates to (99.5 weeks is 99, 'unknown').
            read = numpy.trunc(values) if column.dtype == "int" else values
            mask |= numpy.isnan(values) | numpy.isin(read, numpy.array(column.missing_codes, numpy.float32))
    return mask


def parse(records: Sequence[Record]) -> Tuple[Optional[Parsed], List[Dict[str, Any]]]:
    """Records -> the accepted ones' model inputs, and the rejected ones with their reasons.

    The contract is `client.to_instance` (the server's check: types, value counts, required features); a batch
    of plain values is converted a column at a time, which gives the same inputs (tests check), and only the
    instances that may lack a required feature go through the contract one by one.
    """
    from serving import client, loader

    kept, values, rejects = [], [], []
    for record in records:
        if record.fields is not None:
            if BROKEN in record.fields:
                rejects.append(rejected(record, record.fields[BROKEN]))
                continue
            fields = record.fields
        else:
            try:
                fields = orjson.loads(record.text)  # as the server reads a body: nesting limited, no NaN
            except orjson.JSONDecodeError as error:
                rejects.append(rejected(record, f"not JSON: {error}"))
                continue
            if not isinstance(fields, dict):
                rejects.append(rejected(record, "expected an object of feature values"))
                continue
            unknown = [name for name in fields if name not in features.BY_NAME]
            if unknown:  # a message may carry any of the table's columns; another name is a mistake, e.g. a typo
                rejects.append(rejected(record, f"unknown column {unknown[0]!r} (a message takes the natality "
                                                "table's columns; the model reads "
                                                f"{', '.join(features.FEATURE_NAMES)})"))
                continue
        kept.append(record)
        values.append(fields)
    columns = _plain_columns(values) if values else None
    if columns is None:  # not plain (or nothing left): each instance through the contract
        keys, accepted = [], []
        for record, fields in zip(kept, values):
            try:
                keys.append(features.instance_key(client.to_instance(fields)))
                accepted.append(record)
            except ValueError as error:
                rejects.append(rejected(record, str(error)))
        if not accepted:
            return None, rejects
        kept, columns = accepted, {name: tensor.numpy() for name, tensor in loader.columns_of(keys).items()}
    else:
        keep = numpy.ones(len(kept), bool)
        for index in numpy.flatnonzero(_perhaps_lacking(columns)):
            try:
                client.to_instance(values[index])
            except ValueError as error:
                rejects.append(rejected(kept[index], str(error)))
                keep[index] = False
        if not keep.all():
            kept = [record for record, kept_one in zip(kept, keep) if kept_one]
            columns = {name: array[keep] for name, array in columns.items()}
        if not kept:
            return None, rejects
    return Parsed([record.id for record in kept], [record.text for record in kept], columns), rejects


class ParseBatch(beam.DoFn):
    """A batch of records -> Parsed (the accepted ones) and rejected rows on the REJECTED output."""

    def process(self, records: Batch) -> Iterator[Any]:
        parsed, rejects = parse(records)
        for row in rejects:
            yield beam.pvalue.TaggedOutput(REJECTED, row)
        if parsed is not None:
            yield parsed


class VersionHandler(inference.ModelHandler):
    """Beam's RunInference model handler for a pushed version: serving_raw on each parsed batch.

    A batch the model refuses as a whole is predicted one instance at a time, so only the instance it refuses
    is rejected (its inference is the model's error, text); the others are predicted.
    """

    def __init__(self, version_dir: str):
        super().__init__()
        self.version_dir = version_dir

    def load_model(self) -> Any:
        """The loaded SavedModel itself: its objects (the transform's tables) live as long as it does."""
        import tensorflow as tf

        return tf.saved_model.load(self.version_dir)

    def run_inference(self, batch: Sequence[Parsed], model: Any,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[inference.PredictionResult]:
        import tensorflow as tf

        from serving import loader

        signature = model.signatures["serving_raw"]

        def predict(columns: Dict[str, Any]) -> numpy.ndarray:
            return signature(**columns)["predictions"].numpy().reshape(-1)

        results = []
        for parsed in batch:
            refused: Dict[int, str] = {}  # instance -> the model's reason
            try:
                predictions = predict(parsed.columns)
            except tf.errors.OpError:
                predictions = numpy.full(len(parsed.ids), numpy.nan, numpy.float32)
                for index in range(len(parsed.ids)):
                    try:
                        predictions[index] = predict({name: values[index:index + 1]
                                                      for name, values in parsed.columns.items()})[0]
                    except tf.errors.OpError as error:
                        refused[index] = f"the model refused the instance: {loader.first_reason(error.message)}"
            results.append(inference.PredictionResult(parsed, (predictions, refused)))
        return results

    def get_num_bytes(self, batch: Sequence[Parsed]) -> int:
        """For Beam's metrics, without pickling each batch as the default does (a tenth of a run)."""
        return sum(_BatchCoder().estimate_size(parsed) for parsed in batch)

    def batch_elements_kwargs(self) -> Dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": 1}  # each element is a batch already

    def get_metrics_namespace(self) -> str:
        return "babyweight"


def newest_version(model_dir: str) -> str:
    """The pushed version folder with the highest number."""
    import tensorflow as tf

    versions = [name.rstrip("/") for name in tf.io.gfile.listdir(model_dir) if name.rstrip("/").isdigit()]
    if not versions:
        raise ValueError(f"{model_dir}: no pushed version (a folder named by a number) to predict with")
    return max(versions, key=int)


class Rows(beam.DoFn):
    """A predicted batch -> a batch of output rows (id, prediction, model version, timestamp); an instance the
    model refused, or answered with no finite number, is rejected with the reason."""

    def __init__(self, version: int):
        super().__init__()
        self.version = version

    def process(self, result: inference.PredictionResult) -> Iterator[Any]:
        parsed, (predictions, refused) = result.example, result.inference
        good = numpy.isfinite(predictions)
        for index in numpy.flatnonzero(~good):
            reason = refused.get(index) or f"the model's prediction is not a number: {predictions[index]}"
            yield beam.pvalue.TaggedOutput(REJECTED, {"id": parsed.ids[index], "reason": reason,
                                                      "text": parsed.texts[index]})
        now, version = time.time(), self.version
        if good.all():
            ids, values = parsed.ids, predictions.tolist()
        else:
            ids, values = [parsed.ids[index] for index in numpy.flatnonzero(good)], predictions[good].tolist()
        if ids:
            yield Batch({"id": record_id, "prediction": value, "model_version": version, "timestamp": now}
                        for record_id, value in zip(ids, values))


def failed_batch(failure: Tuple[Sequence[Parsed], Tuple[type, str, List[str]]]) -> Iterator[Dict[str, Any]]:
    """RunInference's dead letter (a batch whose prediction raised, with the error's type, repr and traceback)
    -> each instance rejected with the error."""
    batch, (_, error, _) = failure
    for parsed in batch:
        for record_id, text in zip(parsed.ids, parsed.texts):
            yield {"id": record_id, "reason": f"prediction failed: {error}", "text": text}


class Predict(beam.PTransform):
    """The core every source and sink share: batches of records -> {PREDICTIONS: batches of rows, REJECTED: rows}."""

    def __init__(self, model_dir: str, version: Optional[str] = None):
        super().__init__()
        self.version = version or newest_version(model_dir)
        self.version_dir = os.path.join(model_dir, self.version)

    def expand(self, batches: beam.PCollection):  # -> {PREDICTIONS: row batches, REJECTED: rows}
        parsed = batches | "Parse" >> beam.ParDo(ParseBatch()).with_output_types(Parsed).with_outputs(
            REJECTED, main=PREDICTIONS)
        predicted, failed = (parsed[PREDICTIONS] | "RunInference" >> inference.RunInference(
            VersionHandler(self.version_dir)).with_exception_handling())
        rows = predicted | "Rows" >> beam.ParDo(Rows(int(self.version))).with_output_types(Batch).with_outputs(
            REJECTED, main=PREDICTIONS)
        failures = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch)
        rejects = (parsed[REJECTED], rows[REJECTED], failures) | "Rejected" >> beam.Flatten()
        return {PREDICTIONS: rows[PREDICTIONS], REJECTED: rejects}


def in_batches(records: beam.PCollection) -> beam.PCollection:
    """Records one by one (messages, table rows) -> batches for the core, within each window."""
    return (records | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=BATCH_SIZE)
            | "AsBatch" >> beam.Map(Batch).with_output_types(Batch))


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


def csv_batches(readable_file: Any, root: str = "", size: int = BATCH_SIZE) -> Iterator[List[Record]]:
    """The rows of one CSV file in the table's schema, in batches, each named by the file's path under `root` and
    the row's first line; a row that can't be read (its field count isn't the header's, no value at all, a file
    that isn't UTF-8) is a record its source found broken, rejected with the reason."""
    path = readable_file.metadata.path
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    try:
        text = readable_file.read().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        yield Batch([Record(f"{name}:0", "", {BROKEN: f"the file is not UTF-8 text: {error}"})])
        return
    lines = io.StringIO(text, newline=None).readlines()  # \r\n and a lone \r end lines too
    reader = csv.reader(lines)
    batch = Batch()
    try:
        header = next(reader, None) or []
    except csv.Error as error:
        yield Batch([Record(f"{name}:1", lines[0].rstrip("\n"), {BROKEN: f"the header can't be read: {error}"})])
        return
    wanted = [(column, header.index(column)) for column in features.FEATURE_NAMES if column in header]
    if header and not wanted:  # no header (a file saved without one), or another table's
        yield Batch([Record(f"{name}:1", lines[0].rstrip("\n"), {BROKEN: (
            "the first line names none of the model's features: predict-batch reads CSV files whose header names "
            f"the natality table's columns ({', '.join(features.FEATURE_NAMES)}); the file was not read")})])
        return
    end = reader.line_num
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as error:  # a NUL byte; a quote left open, which makes the rest of the file one value
            start, end = end + 1, reader.line_num
            batch.append(Record(f"{name}:{start}", "".join(lines[start - 1:min(end, start + 2)]).rstrip("\n"),
                                {BROKEN: f"lines {start}-{end} can't be read as CSV: {error}"}))
            continue
        start, end = end + 1, reader.line_num  # a quoted field may hold line breaks: the row spans lines
        original = (lines[start - 1] if start == end else "".join(lines[start - 1:end])).rstrip("\n")
        if len(row) == len(header):
            values = {column: row[index] for column, index in wanted if row[index]}
            if values or "".join(row).strip():
                batch.append(Record(f"{name}:{start}", original, values))
            else:
                batch.append(Record(f"{name}:{start}", original, {BROKEN: "no value in any field"}))
        elif "".join(row).strip():
            batch.append(Record(f"{name}:{start}", original, {BROKEN: f"{len(row)} fields; the header has "
                                                                      f"{len(header)}"}))
        elif row:  # a row of empty fields, not a blank line
            batch.append(Record(f"{name}:{start}", original, {BROKEN: "no value in any field"}))
        else:
            continue
        if len(batch) == size:
            yield batch
            batch = Batch()
    if batch:
        yield batch


def glob_root(pattern: str) -> str:
    """The folder of a glob before its first wildcard: ids are paths under it, so equal names in two folders differ."""
    fixed = []
    for part in pattern.split("/"):
        if any(char in part for char in "*?["):
            break
        fixed.append(part)
    return "/".join(fixed[:-1] if len(fixed) == len(pattern.split("/")) else fixed)


class CsvFiles(Source):
    """Development: CSV files in the table's 31-column schema (a glob), each row a record named file:line."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        return (pipeline | "Match" >> fileio.MatchFiles(self.pattern) | "Open" >> fileio.ReadMatches()
                | "Rows" >> beam.FlatMap(csv_batches, glob_root(self.pattern)).with_output_types(Batch))


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
                | "Open" >> fileio.ReadMatches()
                | "Rows" >> beam.FlatMap(csv_batches, glob_root(self.pattern)).with_output_types(Batch)
                | "Window" >> beam.WindowInto(beam.window.FixedWindows(self.window_seconds)))


class WindowFiles(beam.DoFn):
    """From a stream: the lines of each window in a bundle to a file of their own, named by the window, written
    whole (a temporary name, then renamed) as soon as the bundle is done: no grouping waits for the watermark,
    which Beam's local runner doesn't advance while it watches a folder."""

    def __init__(self, prefix: str, suffix: str, header: Optional[str]):
        super().__init__()
        self.prefix, self.suffix, self.header = prefix, suffix, header

    def start_bundle(self) -> None:
        self.windows: Dict[Any, List[str]] = {}

    def process(self, lines: str, window: Any = beam.DoFn.WindowParam) -> None:
        self.windows.setdefault(window, []).append(lines)

    def finish_bundle(self) -> None:
        import uuid

        from apache_beam.io.filesystems import FileSystems

        for window, blocks in self.windows.items():
            start = window.start.to_utc_datetime().strftime("%Y%m%dT%H%M%S")
            path = f"{self.prefix}-{start}-{uuid.uuid4().hex[:8]}{self.suffix}"
            with FileSystems.create(path + ".tmp") as handle:
                handle.write("\n".join(([self.header] if self.header else []) + blocks + [""]).encode())
            FileSystems.rename([path + ".tmp"], [path])
        self.windows = {}


class Files(Sink):
    """Development: predictions as JSON lines or CSV, rejected records as JSON lines, beside `prefix`; from a
    stream, files per window."""

    COLUMNS = ("id", "prediction", "model_version", "timestamp")

    def __init__(self, prefix: str, output_format: str = "jsonl", streaming: bool = False):
        self.prefix = prefix
        self.output_format = output_format
        self.streaming = streaming

    def _write_lines(self, lines: beam.PCollection, kind: str, suffix: str, header: Optional[str] = None) -> None:
        if self.streaming:
            lines | f"Write{kind}" >> beam.ParDo(WindowFiles(f"{self.prefix}-{kind}", suffix, header))
        else:
            lines | f"Write{kind}" >> beam.io.WriteToText(self.prefix + f"-{kind}", suffix, header=header)

    @classmethod
    def csv_lines(cls, rows: List[Dict[str, Any]]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([[row[c] for c in cls.COLUMNS] for row in rows])
        return buffer.getvalue()[:-1]

    @staticmethod
    def json_lines(rows: List[Dict[str, Any]]) -> str:
        return "\n".join(orjson.dumps(row).decode() for row in rows)

    def write(self, predictions: beam.PCollection, rejects: beam.PCollection) -> None:
        """Each batch of predicted rows is written as one block of lines."""
        if self.output_format == "csv":
            self._write_lines(predictions | "CsvLines" >> beam.Map(self.csv_lines), PREDICTIONS, ".csv",
                              ",".join(self.COLUMNS))
        else:
            self._write_lines(predictions | "JsonLines" >> beam.Map(self.json_lines), PREDICTIONS, ".jsonl")
        self._write_lines(rejects | "RejectedLines" >> beam.Map(json.dumps), REJECTED, ".jsonl")


def message_record(message: Any) -> Record:
    """A Pub/Sub message -> a record named by its message id (or, where a runner gives none, its `id` attribute,
    else a digest of its data), its data the original (JSON) text."""
    import hashlib

    record_id = (message.message_id or (message.attributes or {}).get("id")
                 or "sha1:" + hashlib.sha1(message.data).hexdigest()[:16])
    return Record(record_id, message.data.decode("utf-8", errors="replace"))


class PubSubMessages(Source):
    """Production, streaming: JSON messages of a subscription, in fixed windows of `window_seconds`."""

    def __init__(self, subscription: str, window_seconds: int = 60):
        self.subscription = subscription
        self.window_seconds = window_seconds

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        return self.records(pipeline | "ReadPubSub" >> beam.io.ReadFromPubSub(
            subscription=self.subscription, with_attributes=True))

    def records(self, messages: beam.PCollection) -> beam.PCollection:
        """Messages -> windowed batches of records: what the subscription gives, or a TestStream in tests."""
        # The core groups nothing across bundles, so a message later than the watermark is predicted like any
        # other (a test checks it); the allowed lateness keeps it for a sink that groups by window, too.
        return in_batches(messages | "Records" >> beam.Map(message_record)
                          | "Window" >> beam.WindowInto(beam.window.FixedWindows(self.window_seconds),
                                                        allowed_lateness=ALLOWED_LATENESS_SECONDS))


class BigQueryRows(Source):
    """Production backfill: the rows of a query in the table's schema, each a record named by its key column."""

    def __init__(self, query: str, key_column: str):
        self.query = query
        self.key_column = key_column

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        key = self.key_column
        return in_batches(pipeline | "ReadBigQuery" >> beam.io.ReadFromBigQuery(query=self.query,
                                                                                use_standard_sql=True)
                          | "Records" >> beam.Map(lambda row: Record(
                              str(row.get(key)), json.dumps(row, default=str),
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

        written = predictions | "EachRow" >> beam.FlatMap(lambda rows: rows) | "WritePredictions" >> WriteToBigQuery(
            self.table, schema=PREDICTION_SCHEMA, method=WriteToBigQuery.Method.STREAMING_INSERTS,
            insert_retry_strategy=retry,
            create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=BigQueryDisposition.WRITE_APPEND)
        refused = written.failed_rows_with_errors | "Refused" >> beam.Map(
            lambda failed: {"id": str(failed[1].get("id")), "reason": f"BigQuery refused the row: {failed[2]}",
                            "text": json.dumps(failed[1])})
        errors = ((rejects, refused) | "AllErrors" >> beam.Flatten()
                  | "WriteErrors" >> WriteToBigQuery(
                      self.error_table, schema=REJECTED_SCHEMA, method=WriteToBigQuery.Method.STREAMING_INSERTS,
                      insert_retry_strategy=retry,
                      create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
                      write_disposition=BigQueryDisposition.WRITE_APPEND))
        # The last resort for a row even the error table refuses: the job's log (Dataflow's Logs Explorer).
        errors.failed_rows_with_errors | "ErrorTableRefused" >> beam.Map(
            lambda failed: logging.error("the error table refused %s: %s", failed[1], failed[2]))


class Counts(NamedTuple):
    read: int
    predicted: int
    rejected: int


def build(pipeline: beam.Pipeline, source: Source, sink: Sink, model_dir: str,
          version: Optional[str] = None) -> Predict:
    """source -> the core -> sink; returns the core (its version)."""
    batches = source.read(pipeline) | "CountRead" >> beam.ParDo(Count("read", batches=True))
    core = Predict(model_dir, version)
    outputs = batches | "Predict" >> core
    rejects = outputs[REJECTED] | "CountRejected" >> beam.ParDo(Count("rejected"))
    predictions = outputs[PREDICTIONS] | "CountPredicted" >> beam.ParDo(Count("predicted", batches=True))
    sink.write(predictions, rejects)
    return core


class Count(beam.DoFn):
    """Passes elements on, counting them (or the items of each, for batches) in the job's metrics."""

    def __init__(self, name: str, batches: bool = False):
        super().__init__()
        self.counter = beam.metrics.Metrics.counter("babyweight", name)
        self.batches = batches

    def process(self, element: Any) -> Iterator[Any]:
        self.counter.inc(len(element) if self.batches else 1)
        yield element


def counts(result: Any) -> Counts:
    """Rows read (parsed or not), predicted and rejected, from the pipeline's metrics."""
    found = {}
    for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("babyweight"))["counters"]:
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + counter.committed
    return Counts(found.get("read", 0), found.get("predicted", 0), found.get("rejected", 0))


def written_rows(prefix: str, kind: str, earlier: Iterable[str] = ()) -> int:
    """The rows in the files a local job has written (`earlier`: files there before it started)."""
    import glob

    return sum(sum(1 for line in open(path) if line.strip()) - path.endswith(".csv")  # a CSV file's header
               for path in set(glob.glob(f"{prefix}-{kind}-*")) - set(earlier) if not path.endswith(".tmp"))


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
        print(f"stopped (Ctrl-C): {found.predicted} prediction(s) and {found.rejected} rejected row(s) written "
              f"beside {prefix}; files are matched anew when the job restarts", flush=True)
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
        if not (sys.is_finalizing() and isinstance(unraisable.exc_value, TypeError)
                and getattr(unraisable.object, "__qualname__", "") == "AtomicFunction.__del__"):
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

    from pipeline import config as config_lib  # the profile's settings only, as the server reads them

    parser = argparse.ArgumentParser(prog="babyweight predict-batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="files: a glob of CSV files in the table's 31-column schema")
    parser.add_argument("--output", help="files: prefix of the predictions and rejected files")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="files: of the predictions")
    parser.add_argument("--watch", action="store_true", help="files: keep picking up new files (streaming)")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="--watch: how often the folder is listed")
    parser.add_argument("--window-seconds", type=int, default=60,
                        help="--watch and Pub/Sub: predictions are grouped per window")
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
        if args.dry_run and not cloud:
            raise config_lib.ConfigError("--dry-run builds a Dataflow job: it needs --profile vertex")
        if args.dry_run and not args.version:
            raise config_lib.ConfigError("a dry run needs --version N: finding the newest would list the model "
                                         "folder in Cloud Storage")
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
            source = (PubSubMessages(args.subscription, args.window_seconds) if args.subscription
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
        quiet_tensorflow_at_exit()
        pipeline = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"] + (["--streaming"] if args.watch
                                                                                      else [])))
        source = (WatchedFolder(args.input, args.poll_seconds, args.window_seconds, args.watch_seconds) if args.watch
                  else CsvFiles(args.input))
        core = build(pipeline, source, Files(args.output, args.format, streaming=args.watch), model_dir, args.version)
        import glob
        import signal

        earlier = glob.glob(f"{args.output}-*")
        previous = signal.signal(signal.SIGINT, stop_watching(args.output, earlier)) if args.watch else None
        try:
            result = pipeline.run()
            result.wait_until_finish()
        finally:
            if args.watch:
                signal.signal(signal.SIGINT, previous)
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
    print(f"{found.read} row(s) {'of ' + args.input + ' written' if args.watch else 'read from ' + args.input}, "
          f"{found.predicted} predicted by version {core.version}, "
          f"{found.rejected} rejected\npredictions: {args.output}-predictions-*.{args.format}\n"
          f"rejected (with reasons): {args.output}-rejected-*.jsonl")
    return 0
