"""Where `babyweight predict-batch` reads records from and writes predictions to: CSV files (once or watched),
Pub/Sub messages and BigQuery rows in; files and BigQuery tables out."""

import csv
import glob
import io
import json
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
import orjson
from apache_beam.io import fileio

from models import features
from serving.batch.core import (
    BATCH_SIZE,
    BROKEN,
    PREDICTIONS,
    REJECTED,
    Batch,
    Record,
    Sink,
    Source,
    in_batches,
)

ALLOWED_LATENESS_SECONDS = 7 * 24 * 3600


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
        yield Batch(
            [
                Record(
                    f"{name}:1",
                    lines[0].rstrip("\n"),
                    {
                        BROKEN: (
                            "the first line names none of the model's features: predict-batch reads CSV files whose "
                            "header names "
                            f"the natality table's columns ({', '.join(features.FEATURE_NAMES)}); the file was not read"
                        )
                    },
                )
            ]
        )
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
            batch.append(
                Record(
                    f"{name}:{start}",
                    "".join(lines[start - 1 : min(end, start + 2)]).rstrip("\n"),
                    {BROKEN: f"lines {start}-{end} can't be read as CSV: {error}"},
                )
            )
            continue
        start, end = end + 1, reader.line_num  # a quoted field may hold line breaks: the row spans lines
        original = (lines[start - 1] if start == end else "".join(lines[start - 1 : end])).rstrip("\n")
        if len(row) == len(header):
            values = {column: row[index] for column, index in wanted if row[index]}
            if values or "".join(row).strip():
                batch.append(Record(f"{name}:{start}", original, values))
            else:
                batch.append(Record(f"{name}:{start}", original, {BROKEN: "no value in any field"}))
        elif "".join(row).strip():
            batch.append(
                Record(f"{name}:{start}", original, {BROKEN: f"{len(row)} fields; the header has {len(header)}"})
            )
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


def matched_files(pattern: str) -> List[str]:
    """The files a glob names (a folder is none); none at all is an error naming the glob, checked before a job
    starts: the job would read nothing and predict nothing."""
    from apache_beam.io.filesystems import FileSystems

    (result,) = FileSystems.match([pattern])
    paths = [metadata.path for metadata in result.metadata_list if not os.path.isdir(metadata.path)]
    if not paths:
        raise ValueError(
            f"--input {pattern!r} matches no file: nothing to predict (a glob of CSV files, quoted so that the "
            "shell passes it whole)"
        )
    return paths


class CsvFiles(Source):
    """Development: CSV files in the table's 31-column schema (a glob), each row a record named file:line."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        return (
            pipeline
            | "Match" >> fileio.MatchFiles(self.pattern)
            | "Open" >> fileio.ReadMatches()
            | "Rows" >> beam.FlatMap(csv_batches, glob_root(self.pattern)).with_output_types(Batch)
        )


class WatchedFolder(Source):
    """Local streaming: CSV files landing in a folder (a glob), picked up as they appear, in fixed windows."""

    def __init__(
        self, pattern: str, poll_seconds: float = 5.0, window_seconds: int = 60, stop_after_seconds: float = 0
    ):
        self.pattern = pattern
        self.poll_seconds = poll_seconds
        self.window_seconds = window_seconds
        self.stop_after_seconds = stop_after_seconds  # 0: until stopped

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

        stop = Timestamp.now() + self.stop_after_seconds if self.stop_after_seconds else MAX_TIMESTAMP
        return (
            pipeline
            | "Watch"
            >> fileio.MatchContinuously(
                self.pattern, interval=self.poll_seconds, start_timestamp=Timestamp.now(), stop_timestamp=stop
            )
            | "Open" >> fileio.ReadMatches()
            | "Rows" >> beam.FlatMap(csv_batches, glob_root(self.pattern)).with_output_types(Batch)
            | "Window" >> beam.WindowInto(beam.window.FixedWindows(self.window_seconds))
        )


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
            self._write_lines(
                predictions | "CsvLines" >> beam.Map(self.csv_lines), PREDICTIONS, ".csv", ",".join(self.COLUMNS)
            )
        else:
            self._write_lines(predictions | "JsonLines" >> beam.Map(self.json_lines), PREDICTIONS, ".jsonl")
        self._write_lines(rejects | "RejectedLines" >> beam.Map(json.dumps), REJECTED, ".jsonl")


# The names of the files Files writes beside its prefix: a run's shards as WriteToText names them
# (PREFIX-predictions-00000-of-00003.jsonl), a watching job's as WindowFiles does (PREFIX-rejected-START-ID.jsonl).
OUTPUT_NAME = rf"-({PREDICTIONS}|{REJECTED})-(\d{{5,}}-of-\d{{5,}}|\d{{8}}T\d{{6}}-[0-9a-f]{{8}})\.(jsonl|csv)"


def output_files(prefix: str) -> Dict[str, Tuple[int, ...]]:
    """The files predict-batch writes beside `prefix` that are there now (a run's shards, a watching job's
    files, either format; no other file), each with what tells a rewritten file from the one that was there."""
    named = re.compile(re.escape(os.path.basename(prefix)) + OUTPUT_NAME)
    pattern = glob.escape(prefix) + "-*"
    found: Dict[str, Tuple[int, ...]] = {}
    if "://" in prefix:  # Cloud Storage: through Beam's file systems
        from apache_beam.io.filesystems import FileSystems

        (result,) = FileSystems.match([pattern])
        found = {m.path: (m.size_in_bytes, m.last_updated_in_seconds) for m in result.metadata_list}
    else:  # locally a glob, which lists one folder (Beam's match walks every folder under it)
        for path in glob.glob(pattern):
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            found[path] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return {path: facts for path, facts in found.items() if named.fullmatch(os.path.basename(path))}


def remove_earlier_outputs(prefix: str, before: Dict[str, Tuple[int, ...]]) -> List[str]:
    """After a run: removes the files of `before` (output_files before it) that it did not rewrite, an earlier
    run's shards (3 of them where this run wrote 2) that readers of PREFIX-* would read with its own; returns them.
    Removed only once the run has written its files, so a run that fails leaves the earlier output whole."""
    from apache_beam.io.filesystems import FileSystems

    now = output_files(prefix)
    earlier = sorted(path for path, facts in before.items() if now.get(path) == facts)
    if earlier:
        FileSystems.delete(earlier)
    return earlier


def message_record(message: Any) -> Record:
    """A Pub/Sub message -> a record named by its message id (or, where a runner gives none, its `id` attribute,
    else a digest of its data), its data the original (JSON) text."""
    import hashlib

    record_id = (
        message.message_id
        or (message.attributes or {}).get("id")
        or "sha1:" + hashlib.sha1(message.data).hexdigest()[:16]
    )
    return Record(record_id, message.data.decode("utf-8", errors="replace"))


class PubSubMessages(Source):
    """Production, streaming: JSON messages of a subscription, in fixed windows of `window_seconds`."""

    def __init__(self, subscription: str, window_seconds: int = 60):
        self.subscription = subscription
        self.window_seconds = window_seconds

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        return self.records(
            pipeline | "ReadPubSub" >> beam.io.ReadFromPubSub(subscription=self.subscription, with_attributes=True)
        )

    def records(self, messages: beam.PCollection) -> beam.PCollection:
        """Messages -> windowed batches of records: what the subscription gives, or a TestStream in tests."""
        # The core groups nothing across bundles, so a message later than the watermark is predicted like any
        # other (a test checks it); the allowed lateness keeps it for a sink that groups by window, too.
        return in_batches(
            messages
            | "Records" >> beam.Map(message_record)
            | "Window"
            >> beam.WindowInto(beam.window.FixedWindows(self.window_seconds), allowed_lateness=ALLOWED_LATENESS_SECONDS)
        )


class BigQueryRows(Source):
    """Production backfill: the rows of a query in the table's schema, each a record named by its key column."""

    def __init__(self, query: str, key_column: str):
        self.query = query
        self.key_column = key_column

    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        return in_batches(
            pipeline
            | "ReadBigQuery" >> beam.io.ReadFromBigQuery(query=self.query, use_standard_sql=True)
            | "Records" >> beam.Map(table_record, self.key_column)
        )


def table_record(row: Dict[str, Any], key_column: str) -> Record:
    """A query's row -> a record named by its key column's value. A key column the query doesn't return is an error
    naming it and the columns it does: a mistyped name would otherwise name every row None."""
    if key_column not in row:
        raise ValueError(
            f"--key-column {key_column!r} is not a column of the query; the query returns {', '.join(row)}"
        )
    return Record(str(row[key_column]), json.dumps(row, default=str), {k: v for k, v in row.items() if v is not None})


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

        written = (
            predictions
            | "EachRow" >> beam.FlatMap(lambda rows: rows)
            | "WritePredictions"
            >> WriteToBigQuery(
                self.table,
                schema=PREDICTION_SCHEMA,
                method=WriteToBigQuery.Method.STREAMING_INSERTS,
                insert_retry_strategy=retry,
                create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
                write_disposition=BigQueryDisposition.WRITE_APPEND,
            )
        )
        refused = written.failed_rows_with_errors | "Refused" >> beam.Map(
            lambda failed: {
                "id": str(failed[1].get("id")),
                "reason": f"BigQuery refused the row: {failed[2]}",
                "text": json.dumps(failed[1]),
            }
        )
        errors = (
            (rejects, refused)
            | "AllErrors" >> beam.Flatten()
            | "WriteErrors"
            >> WriteToBigQuery(
                self.error_table,
                schema=REJECTED_SCHEMA,
                method=WriteToBigQuery.Method.STREAMING_INSERTS,
                insert_retry_strategy=retry,
                create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
                write_disposition=BigQueryDisposition.WRITE_APPEND,
            )
        )
        # The last resort for a row even the error table refuses: the job's log (Dataflow's Logs Explorer).
        errors.failed_rows_with_errors | "ErrorTableRefused" >> beam.Map(
            lambda failed: logging.error("the error table refused %s: %s", failed[1], failed[2])
        )
