"""Slices named for people: TFMA's keys and the monitor's rows give one name per slice."""

import numpy as np
import pandas as pd
import pytest

from models import features
from pipeline.reports import slices

WEEKS = features.transformed_name(features.bucket_name(features.BY_NAME["gestation_weeks"]))


@pytest.mark.parametrize(
    "feature, value, expected",
    [
        (WEEKS, "0", "gestation under 28 weeks"),
        (WEEKS, "1", "gestation 28-31 weeks"),
        (WEEKS, "2", "gestation 32-36 weeks"),
        (WEEKS, "3", "gestation 37-41 weeks"),
        (WEEKS, "4", "gestation 42 weeks or more"),
        (WEEKS, "5", "gestation unknown"),
        (WEEKS, "9", "gestation bucket 9"),
        ("plurality", "1", "singletons"),
        ("plurality", "2", "twins"),
        ("plurality", "3", "triplets"),
        ("plurality", "9", "plurality 9"),
        ("is_male", "true", "boys"),
        ("is_male", "false", "girls"),
        ("is_male", "", "sex unknown"),
    ],
)
def test_each_slice_has_a_name_people_use(feature, value, expected):
    assert slices.name(feature, value) == expected


def test_tfma_keys_are_named_whatever_type_their_values_have():
    assert slices.name_of_key(()) == "overall"
    assert slices.name_of_key(((WEEKS, 3),)) == "gestation 37-41 weeks"
    assert slices.name_of_key((("is_male", b"true"),)) == "boys"
    assert slices.name_of_key((("plurality", 2.0),)) == "twins"


def test_every_evaluation_slice_feature_has_a_title_and_every_known_value_a_name():
    for key in features.slice_keys():
        for feature in key:
            column = slices.BUCKETED.get(feature) or features.BY_NAME[feature]
            assert column.name in slices.TITLES, f"{column.name} slices the evaluation but has no name for people"
            if column.categories:
                assert set(slices.VALUE_NAMES[column.name]) == {str(c) for c in column.categories}


def test_the_monitor_takes_raw_slice_values_from_the_rows_and_bucket_ids_from_the_transform():
    rows = pd.DataFrame({"is_male": ["true", "false", np.nan, None], "plurality": [1.0, 2.0, np.nan, 3.0]})
    found = slices.values_by_slice(rows, {WEEKS: np.array([[3], [0], [5], [4]])})
    assert list(found["is_male"]) == ["true", "false", "", ""]
    assert list(found["plurality"]) == ["1", "2", "", "3"]
    assert [slices.name(WEEKS, value) for value in found[WEEKS]] == [
        "gestation 37-41 weeks",
        "gestation under 28 weeks",
        "gestation unknown",
        "gestation 42 weeks or more",
    ]
    assert slices.name_of_key((("is_male", None),)) == "sex unknown"


def test_slices_come_in_order_overall_first_then_by_feature_and_value():
    keyed = {
        ((WEEKS, "10"),): 0,
        ((WEEKS, "2"),): 0,
        (("plurality", "2"),): 0,
        (): 0,
        (("is_male", "true"),): 0,
        (("is_male", "false"),): 0,
    }
    names = [name for name, _ in slices.ordered(keyed)]
    assert names == ["overall", "girls", "boys", "twins", "gestation 32-36 weeks", "gestation bucket 10"]
