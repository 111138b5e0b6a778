"""Checks the input CSV files of the newest span before the pipeline starts, naming file, line and column.

Only what would break CsvExampleGen, or make it read something else than the file says, stops the run
here: an empty file, text that isn't UTF-8, a header that isn't comma-separated or names a column twice
(CsvExampleGen would keep one silently), a row with the wrong number of fields (Beam fails deep inside),
files of one span with different headers (CsvExampleGen reads them all with the first file's). Missing
or extra columns and values of the wrong type are data validation's to report (pipeline/components/validation.py);
this check adds where the first such values are, which TFDV can't say.

Files are read as the tools people use save them: a UTF-8 byte-order mark (Excel's "CSV UTF-8") and
CRLF line ends are read as a plain file's, here and by the pipeline's ExampleGen
(pipeline/components/csv_example_gen.py).
"""

import collections
import csv
import dataclasses
import fnmatch
import pathlib
import re
import shlex
from typing import Any, Dict, List, Optional, Tuple

from tensorflow_metadata.proto.v0 import schema_pb2

MAX_REPORTED = 10
# A UTF-8 byte-order mark at the start of a file is not part of its first column's name.
BYTE_ORDER_MARK = "\ufeff"
ENCODING = "utf-8-sig"
OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "vertical bar"}
UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")
# Remedies to copy: each rewrites the file in place, through a hidden file that no input pattern reads.
# TO_COMMAS also writes decimal commas (7,5) with a point, as the locales that separate by ';' write them.
TO_COMMAS = (
    "python3 -c \"import csv, re, sys; w = csv.writer(sys.stdout); [w.writerow([re.sub(r'^(-?[0-9]+),"
    "([0-9]+)$', r'\\1.\\2', v) for v in row]) for row in csv.reader(sys.stdin, delimiter={delimiter!r})]\" "
    "< {path} > {tmp} && mv {tmp} {path}"
)
TO_UTF8 = "iconv -f {encoding} -t UTF-8 {path} > {tmp} && mv {tmp} {path}"
TO_LF = "tr '\\r' '\\n' < {path} > {tmp} && mv {tmp} {path}"


def remedy(command: str, path: pathlib.Path, **values: str) -> str:
    """A remedy with the file's path (and its hidden temporary twin) quoted for the shell."""
    return command.format(
        path=shlex.quote(str(path)), tmp=shlex.quote(str(path.parent / f".{path.name}.tmp")), **values
    )


def header_names(first_line: str) -> List[str]:
    """The column names in a CSV file's first line, as the csv module reads them, without a byte-order mark."""
    return [name.strip() for name in next(csv.reader([first_line.lstrip(BYTE_ORDER_MARK)]), [])]


class InputDataError(ValueError):
    """The input files can't be read as natality CSV; the message lists each problem found."""


@dataclasses.dataclass
class CsvSummary:
    files: List[pathlib.Path]
    rows: int
    span: Optional[int]  # the span read, when the input is in span-N/ folders
    notes: List[str]  # values that TFDV will see as the wrong type, with their file, line and column


def span_read(data_dir: pathlib.Path, pattern: str, span: int = -1) -> Optional[int]:
    """The span CsvExampleGen will read for a span-{SPAN} pattern: `span` if it is not -1 (input_span), else the
    newest; None for a pattern without spans."""
    if "{SPAN}" not in pattern:
        return None
    folder = re.compile(re.escape(pattern.split("/")[0]).replace(re.escape("{SPAN}"), r"(\d+)") + "$")
    spans = [int(m.group(1)) for p in data_dir.iterdir() if p.is_dir() and (m := folder.match(p.name))]
    if not spans:
        raise InputDataError(
            f"no span folders matching {pattern.split('/')[0]!r} in {data_dir} (name them "
            f"{pattern.split('/')[0].replace('{SPAN}', '1')}, ..., or set input_pattern)"
        )
    if span >= 0 and span not in spans:
        raise InputDataError(
            f"input_span {span}: no folder {pattern.split('/')[0].replace('{SPAN}', str(span))} in {data_dir}"
        )
    return span if span >= 0 else max(spans)


def input_files(data_dir: pathlib.Path, pattern: str, span: int = -1) -> List[pathlib.Path]:
    """The files CsvExampleGen will read: `pattern` under `data_dir` (in the span it reads), as its glob does."""
    if not data_dir.is_dir():
        raise InputDataError(f"input folder {data_dir} does not exist (set it with --data-dir)")
    chosen = span_read(data_dir, pattern, span)
    glob = pattern if chosen is None else pattern.replace("{SPAN}", str(chosen))
    files = sorted(p for p in data_dir.glob(glob) if p.is_file() and not fnmatch.fnmatch(p.name, ".*"))
    if not files:
        raise InputDataError(
            f"no input files match {glob!r} in {data_dir} (point --data-dir at the folder of your "
            "CSV files, or match their names with --set input_pattern=...)"
        )
    return files


def _numeric_types(schema: schema_pb2.Schema) -> Dict[str, type]:
    kinds = {schema_pb2.INT: int, schema_pb2.FLOAT: float}
    return {f.name: kinds[f.type] for f in schema.feature if f.type in kinds}


def check_csv_files(data_dir: pathlib.Path, pattern: str, schema: schema_pb2.Schema, span: int = -1) -> CsvSummary:
    """Raises InputDataError unless CsvExampleGen can read every file (of `span`, -1 the newest); notes values of
    the wrong type."""
    files = input_files(data_dir, pattern, span)
    numeric = _numeric_types(schema)
    problems: List[str] = []
    notes: List[str] = []
    rows = 0
    reference: Optional[Tuple[pathlib.Path, List[str]]] = None  # the first file with a usable header
    for number, path in enumerate(files):
        if len(problems) >= MAX_REPORTED:
            problems.append(f"(stopped after {MAX_REPORTED} problems; {len(files) - number} file(s) not checked)")
            break
        problem = _encoding_problem(path)
        if problem:
            problems.append(problem)
            continue
        checked = _check_file(path, reference, numeric, problems, notes)
        if checked is not None:
            reference = reference or (path, checked[0])
            rows += checked[1]
    if problems:
        raise InputDataError("input data can't be used:\n  " + "\n  ".join(problems[: MAX_REPORTED + 1]))
    return CsvSummary(files, rows, span_read(data_dir, pattern, span), notes[:MAX_REPORTED])


def _encoding_problem(path: pathlib.Path) -> Optional[str]:
    """Text that isn't UTF-8, or lines that end in CR alone (old Macs), with a command that converts the file."""
    raw = path.read_bytes()
    if raw[:2] in UTF16_MARKS or b"\x00" in raw[:4096]:
        return (
            f"{path}: the file is UTF-16 text (Excel's 'Unicode Text'); save it as 'CSV UTF-8 (Comma "
            "delimited)' or convert it: " + remedy(TO_UTF8, path, encoding="UTF-16")
        )
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        return (
            f"{path}, line {line}: byte {raw[error.start : error.start + 1]!r} is not UTF-8 text; save the file "
            "as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)') or convert it, e.g. "
            + remedy(TO_UTF8, path, encoding="WINDOWS-1252")
        )
    if b"\r" in raw and b"\n" not in raw:
        return (
            f"{path}: its lines end in a carriage return alone (as classic Mac OS wrote them), which "
            "CsvExampleGen reads as one line; convert it: " + remedy(TO_LF, path)
        )
    return None


def _check_file(
    path: pathlib.Path,
    reference: Optional[Tuple[pathlib.Path, List[str]]],
    numeric: Dict[str, type],
    problems: List[str],
    notes: List[str],
) -> Optional[Tuple[List[str], int]]:
    """Checks one file, adding to `problems` and `notes`; its header and rows, None if the header is unusable."""
    with path.open(newline="", encoding=ENCODING) as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                problems.append(f"{path}: the file is empty (expected a header line and rows)")
                return None
            header = [name.strip() for name in header]
            header_problem = _header_problem(path, header, next(reader, None))
            if header_problem:
                problems.append(header_problem)
                return None
            if reference is not None and header != reference[1]:
                problems.append(
                    f"{path}: its header differs from {reference[0]}'s (CsvExampleGen reads every file "
                    "of a span with the first file's header); write the same columns, in the same "
                    "order, in every file"
                )
                return None
            rows = _rows_read_by_arrow(path, header, numeric)
            if rows:  # else the scan below says what is wrong, and where
                return header, rows
            handle.seek(0)
            reader = csv.reader(handle)
            next(reader)
            file_rows = 0
            start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1  # a quoted value may span lines
                if len(problems) >= MAX_REPORTED:
                    break
                if not row:
                    continue
                file_rows += 1
                if len(row) != len(header):
                    problems.append(
                        f"{path}, line {line}: {len(row)} fields, expected {len(header)} as in the "
                        'header (a value with a comma needs quotes: "7,5"; or a field is missing '
                        "or extra)"
                    )
                    continue
                if len(notes) < MAX_REPORTED:
                    notes.extend(_type_notes(path, line, header, row, numeric))
        except csv.Error as error:
            problems.append(
                f'{path}, line {reader.line_num}: {error} (an unbalanced quote " makes the rest of '
                "the file one value; quote values that contain quotes, commas or line breaks)"
            )
            return None
        if file_rows == 0 and len(problems) < MAX_REPORTED:
            problems.append(f"{path}: the file has a header but no rows")
        return header, file_rows


def arrow_numbers(values: Any, number_type: type) -> Any:
    """Text values (a pyarrow array without empty ones) as int64 or float64, cast by Arrow where Python's int()
    or float() reads each value as the same number; raises pyarrow.ArrowInvalid where Arrow can't cast one, or
    where Python would refuse one Arrow reads (a hexadecimal integer: '0x1F'; 'nan(1)')."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.compute as pc  # pylint: disable=import-outside-toplevel

    if number_type is int and pc.any(pc.match_substring(values, "x", ignore_case=True)).as_py():
        raise pa.ArrowInvalid("a hexadecimal integer, which Python's int() doesn't read")
    if number_type is float and pc.any(pc.match_substring(values, "(")).as_py():
        raise pa.ArrowInvalid("'nan(...)', which Python's float() doesn't read")
    return pc.cast(values, pa.int64() if number_type is int else pa.float64())


def _rows_read_by_arrow(path: pathlib.Path, header: List[str], numeric: Dict[str, type]) -> Optional[int]:
    """The file's rows, counted by Arrow's CSV reader (many times faster than the scan below), if every row has
    the header's number of fields and every value of a numeric column reads as its type; else None, and the
    scan finds each problem's line. Arrow reads a number only where Python's int() or float() does too."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.compute  # pylint: disable=import-outside-toplevel,unused-import
    from pyarrow import csv as pa_csv  # pylint: disable=import-outside-toplevel

    try:
        table = pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        for name in set(header) & set(numeric):
            values = table.column(name)
            arrow_numbers(values.filter(pa.compute.not_equal(values, "")), numeric[name])
    except pa.ArrowInvalid:
        return None
    return table.num_rows


def _header_problem(path: pathlib.Path, header: List[str], first_row: Optional[List[str]]) -> Optional[str]:
    """What makes a header unusable: another delimiter than a comma, or a column named twice."""
    if len(header) == 1:
        counts = {delimiter: header[0].count(delimiter) for delimiter in OTHER_DELIMITERS}
        delimiter = max(counts, key=counts.get)
        if counts[delimiter]:
            line = ",".join(first_row or [])  # the first row as written, read back with its own delimiter
            decimal_comma = any(re.fullmatch(r"-?\d+,\d+", value.strip()) for value in line.split(delimiter))
            return (
                f"{path}: its header has one field, {_shorten(header[0])!r}: the file looks "
                f"{OTHER_DELIMITERS[delimiter]}-separated ({counts[delimiter] + 1} names split by "
                f"{delimiter!r}), and the pipeline reads comma-separated files. Save it as CSV with commas "
                "(in Excel: 'CSV UTF-8 (Comma delimited)'), or convert it: "
                + remedy(TO_COMMAS, path, delimiter=delimiter)
                + (
                    " (it also writes the decimal commas of its numbers, e.g. 7,5, with a point)"
                    if decimal_comma
                    else ""
                )
            )
    duplicated = [name for name, count in collections.Counter(header).items() if count > 1]
    if duplicated:
        columns = ", ".join(
            f"{name!r} (columns {', '.join(str(i + 1) for i, n in enumerate(header) if n == name)})"
            for name in duplicated
        )
        return (
            f"{path}: its header names {columns} more than once; CsvExampleGen would keep only one of them. "
            "Remove or rename the duplicates"
        )
    return None


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width] + "..."


def _type_notes(
    path: pathlib.Path, line: int, header: List[str], row: List[str], numeric: Dict[str, type]
) -> List[str]:
    notes = []
    for name, value in zip(header, row):
        kind = numeric.get(name)
        if kind and value != "":
            try:
                kind(value)
            except ValueError:
                notes.append(
                    f"{path}, line {line}, column {name}: {value!r} is not "
                    f"{'an integer' if kind is int else 'a number'}"
                )
    return notes
