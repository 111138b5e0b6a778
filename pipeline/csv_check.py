"""Checks the input CSV files before the pipeline starts, naming the file, line and column of a problem.

CsvExampleGen fails deep inside Beam on a malformed row, and infers a column's type from what it
sees, so a stray word in a numeric column would only show up later as a type anomaly with no row.
This check is the CSV-level half of validation; the schema-level half is TFDV's (ExampleValidator).
"""
import csv
import dataclasses
import fnmatch
import pathlib
from typing import Dict, List

from tensorflow_metadata.proto.v0 import schema_pb2

from models import features

MAX_REPORTED = 10


class InputDataError(ValueError):
    """The input files can't be read as natality CSV; the message lists each problem found."""


@dataclasses.dataclass
class CsvSummary:
    files: List[pathlib.Path]
    rows: int


def input_files(data_dir: pathlib.Path, pattern: str) -> List[pathlib.Path]:
    """The files CsvExampleGen will read: `pattern` under `data_dir`, as its glob does."""
    if not data_dir.is_dir():
        raise InputDataError(f"input folder {data_dir} does not exist (set it with --data-dir)")
    files = sorted(p for p in data_dir.glob(pattern) if p.is_file() and not fnmatch.fnmatch(p.name, ".*"))
    if not files:
        raise InputDataError(f"no input files match {pattern!r} in {data_dir}")
    return files


def _numeric_types(schema: schema_pb2.Schema) -> Dict[str, type]:
    kinds = {schema_pb2.INT: int, schema_pb2.FLOAT: float}
    return {f.name: kinds[f.type] for f in schema.feature if f.type in kinds}


def check_csv_files(data_dir: pathlib.Path, pattern: str, schema: schema_pb2.Schema) -> CsvSummary:
    """Raises InputDataError unless every file has the table's columns and parsable values."""
    files = input_files(data_dir, pattern)
    numeric = _numeric_types(schema)
    expected = list(features.COLUMN_NAMES)
    problems: List[str] = []
    rows = 0
    first_header = None
    for path in files:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                problems.append(f"{path}: the file is empty (expected a header line and rows)")
                continue
            header = [name.strip() for name in header]
            missing = [name for name in expected if name not in header]
            unexpected = [name for name in header if name not in expected]
            if missing or unexpected:
                problems.append(
                    f"{path}: header does not match the natality table's columns"
                    + (f"; missing: {', '.join(missing)}" if missing else "")
                    + (f"; unexpected: {', '.join(unexpected)}" if unexpected else ""))
                continue
            if first_header is None:
                first_header = header
            elif header != first_header:
                problems.append(f"{path}: columns are in another order than in {files[0]} "
                                "(CsvExampleGen reads every file with the first file's header)")
                continue
            file_rows = 0
            for line, row in enumerate(reader, start=2):
                if len(problems) >= MAX_REPORTED:
                    break
                if not row:
                    continue
                file_rows += 1
                if len(row) != len(header):
                    problems.append(f"{path}, line {line}: {len(row)} fields, expected {len(header)}")
                    continue
                for name, value in zip(header, row):
                    kind = numeric.get(name)
                    if kind and value != "":
                        try:
                            kind(value)
                        except ValueError:
                            problems.append(f"{path}, line {line}, column {name}: {value!r} is not "
                                            f"{'an integer' if kind is int else 'a number'}")
            if file_rows == 0 and not problems:
                problems.append(f"{path}: the file has a header but no rows")
            rows += file_rows
        if len(problems) >= MAX_REPORTED:
            problems.append(f"(stopped after {MAX_REPORTED} problems)")
            break
    if problems:
        raise InputDataError("input data can't be used:\n  " + "\n  ".join(problems))
    return CsvSummary(files, rows)
