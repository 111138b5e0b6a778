"""The CSV check names the file, line and column of each problem before the pipeline starts."""
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
    (HEADER.replace(",father_age", "") + "\n", "missing: father_age"),
    (HEADER + ",favourite_colour\n", "unexpected: favourite_colour"),
    (HEADER + "\n" + GOOD_ROW + "\n" + GOOD_ROW + ",7\n", "line 3: 32 fields, expected 31"),
    (HEADER + "\n" + GOOD_ROW.replace(",33,39,", ",thirty,39,") + "\n",
     "line 2, column mother_age: 'thirty' is not an integer"),
    (HEADER + "\n" + GOOD_ROW.replace("7.68751907594", "7,7") + "\n", "line 2: 32 fields"),
    (HEADER + "\n" + GOOD_ROW.replace("7.68751907594", "7.7lb") + "\n",
     "column weight_pounds: '7.7lb' is not a number"),
])
def test_each_problem_names_the_file_and_place(tmp_path, schema, text, message):
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(csv_check.InputDataError) as error:
        csv_check.check_csv_files(tmp_path, "*.csv", schema)
    assert str(path) in str(error.value)
    assert message in str(error.value)


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
    with pytest.raises(csv_check.InputDataError, match="b.csv: columns are in another order"):
        csv_check.check_csv_files(tmp_path, "*.csv", schema)
