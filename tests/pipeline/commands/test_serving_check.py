"""Serving requests are checked against the SERVING environment of the schema and for skew against training."""

import json
import pathlib

import pandas as pd
import pytest
import tensorflow_data_validation as tfdv

from data import generator
from models import features
from pipeline.commands import serving_check
from pipeline.config import PROJECT_ROOT

SCHEMA_PATH = PROJECT_ROOT / "schema" / "schema.pbtxt"


@pytest.fixture(scope="module")
def schema():
    return tfdv.load_schema_text(str(SCHEMA_PATH))


@pytest.fixture(scope="module")
def training(tmp_path_factory, schema):
    path = generator.write(1500, 3, tmp_path_factory.mktemp("train"))[0]
    return serving_check.statistics_of(serving_check.read_requests(path), schema)


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """Logged requests as a client sends them: the model's features only, JSON numbers and strings, and the
    required ones always (rows of the data without them are births the contract would refuse)."""
    path = generator.write(400, 4, tmp_path_factory.mktemp("serve"))[0]
    frame = pd.read_csv(path, dtype={c.name: str for c in features.FEATURES if c.dtype == "string"})
    frame = frame[[c.name for c in features.FEATURES]]
    rows = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]
    return [row for row in rows if not features.missing_required(row)]


def _write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _checks(found):
    return {(f.check, f.feature) for f in found}


def test_clean_requests_without_the_label_pass(requests, schema, training, tmp_path):
    path = _write_jsonl(tmp_path / "requests.jsonl", requests)
    assert serving_check.check_requests(serving_check.read_requests(path), schema, training) == []


def test_each_kind_of_bad_request_is_named(requests, schema, training):
    bad = [dict(row) for row in requests]
    for row in bad:
        row.pop("father_age")  # a client that stopped sending a feature
        row["session_id"] = "abc"  # ...and started sending another
    bad[3]["mother_age"] = [30, 31]  # a list where one value is expected
    found = serving_check.check_requests(bad, schema, training)
    assert {("missing", "father_age"), ("unexpected", "session_id"), ("value_count", "mother_age")} <= _checks(found)


def test_skew_against_the_training_data_is_reported(requests, schema, training):
    skewed = [dict(row, mother_married="false") for row in requests]
    found = serving_check.check_requests(skewed, schema, training)
    assert ("skew", "mother_married") in _checks(found), found


def test_csv_requests_and_unreadable_files(schema, training, tmp_path, requests):
    path = tmp_path / "requests.csv"
    pd.DataFrame(requests).to_csv(path, index=False)
    assert serving_check.check_requests(serving_check.read_requests(path), schema, training) == []
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"is_male": "true"}\n{"is_male": \n')
    with pytest.raises(serving_check.RequestsError, match="broken.jsonl, line 2: not JSON"):
        serving_check.read_requests(broken)


def test_requests_lacking_a_required_feature_are_named_with_their_numbers(requests, schema, training):
    bad = [dict(row) for row in requests]
    bad[4]["gestation_weeks"] = None
    bad[9]["gestation_weeks"] = 99  # the table's 'unknown' code
    bad[9]["mother_age"] = ""
    bad[12]["is_male"] = None  # optional: accepted as missing, though every row of the table has one
    bad[13]["mother_married"] = None
    every = serving_check.check_requests(bad, schema, training)
    assert not [f for f in every if f.check == "presence"], every
    without_ever_born = [{k: v for k, v in row.items() if k != "ever_born"} for row in requests]
    assert _checks(serving_check.check_requests(without_ever_born, schema, training)) == {("missing", "ever_born")}
    found = {f.feature: f for f in every if f.check == "required"}
    assert set(found) == {"gestation_weeks", "mother_age"}
    assert found["gestation_weeks"].description.endswith("request(s) 5, 10")
    assert found["mother_age"].blocking and "1 request(s) lack" in found["mother_age"].description
