"""The course's babyweight files, read as rows of the table's 31 columns."""

from data import course
from models import features
from tests.conftest import SHARED_NATALITY, skip_or_fail_in_ci


def _course_file(name):
    path = SHARED_NATALITY / name
    if not path.is_file():
        skip_or_fail_in_ci(f"course file not found at {path}")
    return path


def test_five_column_file_maps_flags_plurality_and_weeks_and_leaves_other_columns_empty():
    table = course.read_course_file(_course_file("course5col_large_65k.csv"))
    assert list(table.columns) == list(features.COLUMN_NAMES)
    assert len(table) == 65_137
    assert set(table.is_male) == {"true", "false"}
    assert set(table.plurality) <= {"1", "2", "3", "4", "5"} and (table.plurality == "2").any()
    assert table.gestation_weeks.str.fullmatch(r"\d+").all()  # 38.0 in some course files is the integer 38
    assert (table.mother_married == "").all() and (table.father_age == "").all()
    assert (table.mother_race == "").all()  # the course codes race as text or floats, not the table's codes


def test_headerless_ten_column_file_keeps_its_marital_status():
    table = course.read_course_file(_course_file("course10col_2017.csv"))
    assert len(table) == 3_352  # every line is a row: the file has no header
    assert set(table.mother_married) <= {"true", "false", ""} and (table.mother_married == "true").any()
    assert table.weight_pounds.astype(float).between(0.5, 20).all()
