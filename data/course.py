"""Reads the babyweight course files (5 or 10 columns, other codings) as rows of the table's 31 columns.

The Google Cloud ML courses published samples of the natality table in their own layout:
`weight_pounds,is_male,mother_age,plurality,gestation_weeks[,...]` with `True`/`False` flags and
plurality as `Single(1)`, `Twins(2)`, ...; and a 10-column file without a header. Columns the table has
and a file lacks are empty (missing), as in a BigQuery export with NULLs.
"""

import pathlib
import re

import numpy as np
import pandas as pd

from models import features

# The headerless 10-column file's columns (the course's 2017 serving example).
TEN_COLUMNS = (
    "weight_pounds",
    "is_male",
    "mother_age",
    "mother_race",
    "plurality",
    "gestation_weeks",
    "mother_married",
    "cigarette_use",
    "alcohol_use",
    "key",
)
_COUNT = re.compile(r"\((\d+)\)$")


def _flag(values: pd.Series) -> pd.Series:
    text = values.fillna("").astype(str).str.strip().str.lower()
    return text.where(text.isin(["true", "false"]), "")


def _integer(values: pd.Series) -> pd.Series:
    """Integers written as 38, 38.0 or Twins(2); anything else missing."""
    text = values.fillna("").astype(str).str.strip()
    counted = text.str.extract(_COUNT, expand=False)
    numbers = pd.to_numeric(counted.fillna(text), errors="coerce")
    return numbers.where(numbers == np.floor(numbers)).astype("Int64")


def read_course_file(path: pathlib.Path) -> pd.DataFrame:
    """The rows of a course file as the table's 31 columns (text; '' where the file has no value)."""
    first_line = path.open().readline()
    header = first_line.startswith("weight_pounds")
    frame = pd.read_csv(
        path,
        header=0 if header else None,
        names=None if header else list(TEN_COLUMNS),
        dtype=str,
        keep_default_na=False,
    )
    table = pd.DataFrame(index=frame.index)
    for column in features.COLUMNS:
        if column.name not in frame or column.name == "mother_race":  # the course codes race as text
            table[column.name] = ""
        elif column.dtype == "string":
            table[column.name] = _flag(frame[column.name])
        elif column.dtype == "int":
            table[column.name] = _integer(frame[column.name]).astype(str).replace("<NA>", "")
        else:
            table[column.name] = frame[column.name]
    return table
