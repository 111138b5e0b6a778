"""The CSV check stops what CsvExampleGen can't read, naming file and line, and locates wrong-type values."""
import pathlib

import pytest

from models import features
from pipeline import config as config_lib
from pipeline import csv_check
from pipeline.run import load_schema

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


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    (HEADER + "\n", "has a header but no rows"),
    (HEADER + "\n" + GOOD_ROW + "\n" + GOOD_ROW + ",7\n", "line 3: 32 fields, expected 31"),
    (HEADER + "\n" + GOOD_ROW.replace("7.68751907594", "7,7") + "\n", "line 2: 32 fields"),
])
def test_each_problem_names_the_file_and_place(tmp_path, schema, text, message):
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(csv_check.InputDataError) as error:
        csv_check.check_csv_files(tmp_path, "*.csv", schema)
    assert str(path) in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize("text, note", [
    (HEADER + "\n" + GOOD_ROW.replace(",33,39,", ",thirty,39,") + "\n",
     "line 2, column mother_age: 'thirty' is not an integer"),
    (HEADER + "\n" + GOOD_ROW.replace("7.68751907594", "7.7lb") + "\n",
     "line 2, column weight_pounds: '7.7lb' is not a number"),
])
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
