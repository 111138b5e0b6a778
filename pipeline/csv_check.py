"""Checks the input CSV files of the newest span before the pipeline starts, naming file, line and column.

Only what would break CsvExampleGen stops the run here: an empty file, a row with the wrong number of
fields (Beam fails deep inside), files of one span with different headers (CsvExampleGen reads them all
with the first file's). Missing or extra columns and values of the wrong type are data validation's to
report (pipeline/validation.py); this check adds where the first such values are, which TFDV can't say.
"""
import csv
import dataclasses
import fnmatch
import pathlib
import re
from typing import Dict, List, Optional

from tensorflow_metadata.proto.v0 import schema_pb2


MAX_REPORTED = 10


class InputDataError(ValueError):
    """The input files can't be read as natality CSV; the message lists each problem found."""


@dataclasses.dataclass
class CsvSummary:
    files: List[pathlib.Path]
    rows: int
    span: Optional[int]  # the newest span, when the input is in span-N/ folders
    notes: List[str]  # values that TFDV will see as the wrong type, with their file, line and column


def newest_span(data_dir: pathlib.Path, pattern: str) -> Optional[int]:
    """The span CsvExampleGen will read for a span-{SPAN} pattern (the newest), else None."""
    if "{SPAN}" not in pattern:
        return None
    folder = re.compile(re.escape(pattern.split("/")[0]).replace(re.escape("{SPAN}"), r"(\d+)") + "$")
    spans = [int(m.group(1)) for p in data_dir.iterdir() if p.is_dir() and (m := folder.match(p.name))]
    if not spans:
        raise InputDataError(f"no span folders matching {pattern.split('/')[0]!r} in {data_dir}")
    return max(spans)


def input_files(data_dir: pathlib.Path, pattern: str) -> List[pathlib.Path]:
    """The files CsvExampleGen will read: `pattern` under `data_dir` (in its newest span), as its glob does."""
    if not data_dir.is_dir():
        raise InputDataError(f"input folder {data_dir} does not exist (set it with --data-dir)")
    span = newest_span(data_dir, pattern)
    glob = pattern if span is None else pattern.replace("{SPAN}", str(span))
    files = sorted(p for p in data_dir.glob(glob) if p.is_file() and not fnmatch.fnmatch(p.name, ".*"))
    if not files:
        raise InputDataError(f"no input files match {glob!r} in {data_dir}")
    return files


def _numeric_types(schema: schema_pb2.Schema) -> Dict[str, type]:
    kinds = {schema_pb2.INT: int, schema_pb2.FLOAT: float}
    return {f.name: kinds[f.type] for f in schema.feature if f.type in kinds}


def check_csv_files(data_dir: pathlib.Path, pattern: str, schema: schema_pb2.Schema) -> CsvSummary:
    """Raises InputDataError unless CsvExampleGen can read every file; notes values of the wrong type."""
    files = input_files(data_dir, pattern)
    numeric = _numeric_types(schema)
    problems: List[str] = []
    notes: List[str] = []
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
            if first_header is None:
                first_header = header
            elif header != first_header:
                problems.append(f"{path}: its header differs from {files[0]}'s "
                                "(CsvExampleGen reads every file of a span with the first file's header)")
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
                if len(notes) < MAX_REPORTED:
                    notes.extend(_type_notes(path, line, header, row, numeric))
            if file_rows == 0 and not problems:
                problems.append(f"{path}: the file has a header but no rows")
            rows += file_rows
        if len(problems) >= MAX_REPORTED:
            problems.append(f"(stopped after {MAX_REPORTED} problems)")
            break
    if problems:
        raise InputDataError("input data can't be used:\n  " + "\n  ".join(problems))
    return CsvSummary(files, rows, newest_span(data_dir, pattern), notes[:MAX_REPORTED])


def _type_notes(path: pathlib.Path, line: int, header: List[str], row: List[str],
                numeric: Dict[str, type]) -> List[str]:
    notes = []
    for name, value in zip(header, row):
        kind = numeric.get(name)
        if kind and value != "":
            try:
                kind(value)
            except ValueError:
                notes.append(f"{path}, line {line}, column {name}: {value!r} is not "
                             f"{'an integer' if kind is int else 'a number'}")
    return notes
