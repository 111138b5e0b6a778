"""The CSV check stops what CsvExampleGen can't read, naming file and line, and locates wrong-type values."""

import pathlib
import subprocess

import pytest

from models import features
from pipeline import config as config_lib
from pipeline.commands.run import load_schema
from pipeline.components import csv_check

HEADER = ",".join(features.COLUMN_NAMES)
GOOD_ROW = "2005,2005,1,,3,,true,,7.68751907594,1,,3,,,33,39,04212004,false,,,,,,34,8,0,2,9,,37,1"


@pytest.fixture(scope="module")
def schema():
    return load_schema(config_lib.load_config())


def _write(folder: pathlib.Path, name: str, text: str) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_bundled_data_passes(schema):
    config = config_lib.load_config()
    checked = csv_check.check_csv_files(pathlib.Path(config.data_dir), "*.csv", schema)
    assert checked.rows == 20_000 and len(checked.files) == 1


def test_real_export_passes_unchanged(schema, real_export_csv):
    checked = csv_check.check_csv_files(real_export_csv.parent, real_export_csv.name, schema)
    assert checked.rows == 16_000


@pytest.mark.parametrize(
    "text, rows, by_arrow",
    [
        (HEADER + "\n" + GOOD_ROW + "\n\n" + GOOD_ROW + "\n", 2, 2),  # a blank line is no row
        (HEADER + "\r\n" + GOOD_ROW.replace("true", '"tr\nue"') + "\r\n", 1, 1),  # a quoted line break
        # Python's int() reads ' 33', Arrow doesn't: the scan counts the rows
        (HEADER + "\n" + GOOD_ROW.replace(",33,39,", ", 33,39,") + "\n", 1, None),
    ],
)
def test_arrow_and_the_line_by_line_scan_count_alike(tmp_path, schema, text, rows, by_arrow):
    path = _write(tmp_path, "a.csv", text)
    header = csv_check.header_names(text.split("\n")[0])
    numeric = csv_check._numeric_types(schema)
    assert csv_check._rows_read_by_arrow(path, header, numeric) == by_arrow
    checked = csv_check.check_csv_files(tmp_path, "*.csv", schema)
    assert (checked.rows, checked.notes) == (rows, [])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the file is empty"),
        (HEADER + "\n", "has a header but no rows"),
        (HEADER + "\n" + GOOD_ROW + "\n" + GOOD_ROW + ",7\n", "line 3: 32 fields, expected 31 as in the header"),
        (HEADER + "\n" + GOOD_ROW.replace("7.68751907594", "7,7") + "\n", "line 2: 32 fields"),
    ],
)
def test_each_problem_names_the_file_and_place(tmp_path, schema, text, message):
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(csv_check.InputDataError) as error:
        csv_check.check_csv_files(tmp_path, "*.csv", schema)
    assert str(path) in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "text, note",
    [
        (
            HEADER + "\n" + GOOD_ROW.replace(",33,39,", ",thirty,39,") + "\n",
            "line 2, column mother_age: 'thirty' is not an integer",
        ),
        (
            HEADER + "\n" + GOOD_ROW.replace("7.68751907594", "7.7lb") + "\n",
            "line 2, column weight_pounds: '7.7lb' is not a number",
        ),
        # Arrow's casts read a hexadecimal integer and 'nan(1)'; Python's int() and float(), and so TFX, don't.
        (
            "\n".join([HEADER, GOOD_ROW, GOOD_ROW.replace(",33,39,", ",0x21,39,")]) + "\n",
            "line 3, column mother_age: '0x21' is not an integer",
        ),
        (
            "\n".join([HEADER, GOOD_ROW, GOOD_ROW.replace("7.68751907594", "nan(1)")]) + "\n",
            "line 3, column weight_pounds: 'nan(1)' is not a number",
        ),
    ],
)
def test_values_of_the_wrong_type_are_located_for_data_validation(tmp_path, schema, text, note):
    path = _write(tmp_path, "typo.csv", text)
    checked = csv_check.check_csv_files(tmp_path, "*.csv", schema)
    assert checked.notes == [f"{path}, {note}"]


def test_missing_and_extra_columns_are_left_to_data_validation(tmp_path, schema):
    names = [n for n in features.COLUMN_NAMES if n != "father_age"] + ["favourite_colour"]
    row = GOOD_ROW.split(",")
    del row[features.COLUMN_NAMES.index("father_age")]
    _write(tmp_path, "a.csv", ",".join(names) + "\n" + ",".join(row + ["blue"]) + "\n")
    assert csv_check.check_csv_files(tmp_path, "*.csv", schema).rows == 1


def test_span_folders_are_read_newest_first(tmp_path, schema):
    _write(tmp_path / "span-2", "a.csv", HEADER + "\n" + GOOD_ROW + "\n")
    _write(tmp_path / "span-10", "a.csv", HEADER + "\n" + GOOD_ROW + "\n" + GOOD_ROW + "\n")
    checked = csv_check.check_csv_files(tmp_path, "span-{SPAN}/*.csv", schema)
    assert (checked.span, checked.rows) == (10, 2)
    with pytest.raises(csv_check.InputDataError, match="no span folders matching 'day-{SPAN}'"):
        csv_check.check_csv_files(tmp_path, "day-{SPAN}/*.csv", schema)


def test_input_span_pins_the_span_checked(tmp_path, schema):
    _write(tmp_path / "span-2", "a.csv", HEADER + "\n" + GOOD_ROW + "\n")
    _write(tmp_path / "span-10", "a.csv", HEADER + "\n" + GOOD_ROW + "\n" + GOOD_ROW + "\n")
    checked = csv_check.check_csv_files(tmp_path, "span-{SPAN}/*.csv", schema, span=2)
    assert (checked.span, checked.rows, checked.files) == (2, 1, [tmp_path / "span-2" / "a.csv"])
    with pytest.raises(csv_check.InputDataError, match="input_span 5: no folder span-5 in"):
        csv_check.check_csv_files(tmp_path, "span-{SPAN}/*.csv", schema, span=5)


def test_missing_folder_and_no_matching_files(tmp_path, schema):
    with pytest.raises(csv_check.InputDataError, match="does not exist"):
        csv_check.check_csv_files(tmp_path / "nowhere", "*.csv", schema)
    _write(tmp_path, "notes.txt", "hello")
    with pytest.raises(csv_check.InputDataError, match=r"no input files match '\*.csv'"):
        csv_check.check_csv_files(tmp_path, "*.csv", schema)


def test_files_with_columns_in_another_order_are_refused(tmp_path, schema):
    _write(tmp_path, "a.csv", HEADER + "\n" + GOOD_ROW + "\n")
    names = list(features.COLUMN_NAMES)
    names[0], names[1] = names[1], names[0]
    _write(tmp_path, "b.csv", ",".join(names) + "\n" + GOOD_ROW + "\n")
    with pytest.raises(csv_check.InputDataError, match="b.csv: its header differs from .*a.csv's"):
        csv_check.check_csv_files(tmp_path, "*.csv", schema)


@pytest.fixture(scope="module")
def real_rows(real_export_csv) -> str:
    """The header and first 200 rows of the real export, as BigQuery wrote them."""
    with real_export_csv.open() as handle:
        return "".join(next(handle) for _ in range(201))


def _remedy(message: str) -> str:
    """The shell command an error message offers as the fix."""
    marker = "convert it: " if "convert it: " in message else "convert it, e.g. "
    return message.split(marker)[-1].split(" (it also writes")[0]


def _refused(folder: pathlib.Path, schema) -> str:
    with pytest.raises(csv_check.InputDataError) as error:
        csv_check.check_csv_files(folder, "*.csv", schema)
    return str(error.value)


def test_byte_order_mark_and_crlf_read_like_the_plain_file(tmp_path, schema, real_rows):
    _write(tmp_path / "plain", "a.csv", real_rows)
    (tmp_path / "excel").mkdir()
    (tmp_path / "excel" / "a.csv").write_bytes(b"\xef\xbb\xbf" + real_rows.replace("\n", "\r\n").encode())
    plain = csv_check.check_csv_files(tmp_path / "plain", "*.csv", schema)
    excel = csv_check.check_csv_files(tmp_path / "excel", "*.csv", schema)
    assert (excel.rows, excel.notes) == (plain.rows, plain.notes) == (200, [])


def test_a_duplicated_column_is_named_with_its_places(tmp_path, schema, real_rows):
    header, rows = real_rows.split("\n", 1)
    path = _write(tmp_path, "a.csv", header.replace("father_age", "mother_age") + "\n" + rows)
    message = _refused(tmp_path, schema)
    assert f"{path}: its header names 'mother_age' (columns 15, 30) more than once" in message
    assert "Remove or rename" in message


def test_a_semicolon_file_is_named_and_its_remedy_works(tmp_path, schema, real_rows):
    """As a European locale's spreadsheet saves it: ';' between fields, decimal commas in numbers."""
    lines = [line.split(",") for line in real_rows.splitlines()]
    european = "\n".join(";".join(value.replace(".", ",") for value in line) for line in lines) + "\n"
    folder = tmp_path / "my data"  # the remedy is a shell command: a space must not break it
    path = _write(folder, "a.csv", european)
    message = _refused(folder, schema)
    assert f"{path}: its header has one field, 'source_year;year;month;" in message
    assert "semicolon-separated (31 names split by ';')" in message
    assert "also writes the decimal commas of its numbers, e.g. 7,5, with a point" in message
    subprocess.run(_remedy(message), shell=True, check=True)
    converted = csv_check.check_csv_files(folder, "*.csv", schema)
    assert (converted.rows, converted.notes) == (200, [])
    assert path.read_text() == real_rows  # exactly what BigQuery wrote
    assert [p.name for p in folder.iterdir()] == ["a.csv"]


@pytest.mark.parametrize(
    "encoding, expected",
    [
        ("windows-1252", "line 4: byte b'\\xe9' is not UTF-8 text"),
        ("utf-16", "the file is UTF-16 text"),
    ],
)
def test_other_encodings_are_named_and_their_remedy_works(tmp_path, schema, real_rows, encoding, expected):
    lines = real_rows.splitlines(keepends=True)
    state = features.COLUMN_NAMES.index("state")
    row = lines[3].split(",")
    row[state] = "Québec"  # a text column, as a spreadsheet user might type it
    lines[3] = ",".join(row)
    path = tmp_path / "a.csv"
    path.write_bytes("".join(lines).encode(encoding))
    message = _refused(tmp_path, schema)
    assert str(path) in message and expected in message
    subprocess.run(_remedy(message), shell=True, check=True)
    assert csv_check.check_csv_files(tmp_path, "*.csv", schema).rows == 200
    assert "Québec" in path.read_text(encoding="utf-8")


def test_lines_ending_in_a_carriage_return_alone_are_named_and_their_remedy_works(tmp_path, schema, real_rows):
    path = tmp_path / "a.csv"
    path.write_bytes(real_rows.replace("\n", "\r").encode())
    message = _refused(tmp_path, schema)
    assert f"{path}: its lines end in a carriage return alone" in message
    subprocess.run(_remedy(message), shell=True, check=True)
    assert csv_check.check_csv_files(tmp_path, "*.csv", schema).rows == 200


def test_an_unbalanced_quote_is_named_with_its_line(tmp_path, schema, real_rows):
    lines = real_rows.splitlines(keepends=True)
    lines[5] = lines[5].replace(",true,", ',"true,', 1)  # the quote is never closed: the rest is one value
    path = _write(tmp_path, "a.csv", "".join(lines) + ",".join(["x" * 140_000] * 2) + "\n")
    message = _refused(tmp_path, schema)
    assert f"{path}, line " in message and "unbalanced quote" in message


def test_files_after_a_bad_header_are_compared_with_the_first_usable_one(tmp_path, schema, real_rows):
    _write(tmp_path, "a.csv", real_rows.replace(",", ";"))
    _write(tmp_path, "b.csv", real_rows)
    header, rows = real_rows.split("\n", 1)
    names = header.split(",")
    names[0], names[1] = names[1], names[0]
    _write(tmp_path, "c.csv", ",".join(names) + "\n" + rows)
    message = _refused(tmp_path, schema)
    assert "c.csv: its header differs from " in message and "b.csv's" in message


def test_the_report_stops_after_ten_problems_and_says_how_many_files_were_left(tmp_path, schema, real_rows):
    for number in range(12):
        (tmp_path / f"{number:02}.csv").write_bytes(real_rows.encode("utf-16"))
    message = _refused(tmp_path, schema)
    assert message.count("the file is UTF-16 text") == 10
    assert "(stopped after 10 problems; 2 file(s) not checked)" in message
