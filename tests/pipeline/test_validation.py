"""Data validation answers each of the six questions: one corruption per question, through TFDV.

Statistics are computed in memory here as CsvExampleGen's output would give them (an empty CSV field is
a feature with no values); tests/test_spans_e2e.py runs the same corruptions through the pipeline.
"""
import pathlib
import shutil

import pytest
import tensorflow_data_validation as tfdv

from data import generator
from pipeline import serving_check
from pipeline.checks import CHECKS, QUESTIONS, check_of
from pipeline.validation import Verdict, csv_presence, findings, validate_split
from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2

SCHEMA_PATH = pathlib.Path(__file__).resolve().parents[2] / "schema" / "schema.pbtxt"
ROWS = 1500

# Each corruption, the check (question) that must catch it, the feature and TFDV's anomaly kind.
EXPECTED = {
    "shift": ("drift", "mother_married", "COMPARATOR_L_INFTY_HIGH"),
    "drop_column": ("missing", "mother_age", "SCHEMA_MISSING_COLUMN"),
    "extra_column": ("unexpected", "hospital_id", "SCHEMA_NEW_COLUMN"),
    "type": ("type", "weight_gain_pounds", "INT_TYPE_NOT_INT_STRING"),
    "presence": ("presence", "mother_age", "FEATURE_TYPE_LOW_FRACTION_PRESENT"),
    "domain": ("domain", "mother_age", "INT_TYPE_BIG_INT"),
}


@pytest.fixture(scope="module")
def schema():
    return tfdv.load_schema_text(str(SCHEMA_PATH))


@pytest.fixture(scope="module")
def spans(tmp_path_factory):
    """Two clean generated spans: span-1 is the previous one, span-2 the new one."""
    return generator.write(ROWS, 5, tmp_path_factory.mktemp("spans"), spans=2)


def _statistics(path: pathlib.Path, schema) -> statistics_pb2.DatasetFeatureStatisticsList:
    return serving_check.statistics_of(serving_check.read_requests(path), schema)


def _findings(current: pathlib.Path, previous: pathlib.Path, schema, warning_checks=()):
    result = validate_split(_statistics(current, schema), schema, _statistics(previous, schema))
    return findings(result, "train", warning_checks)


def test_every_anomaly_kind_belongs_to_one_check_and_the_questions_cover_the_checks():
    assert set(CHECKS) == {check for _, checks in QUESTIONS for check in checks} | {"other"}
    assert len(QUESTIONS) == 6
    assert check_of(anomalies_pb2.AnomalyInfo.SCHEMA_NEW_COLUMN) == "unexpected"
    assert check_of(anomalies_pb2.AnomalyInfo.CUSTOM_VALIDATION) == "other"


def test_a_clean_span_against_the_previous_clean_span_has_no_anomaly(spans, schema):
    assert _findings(spans[1], spans[0], schema) == []


@pytest.mark.parametrize("corruption", sorted(EXPECTED))
def test_each_corruption_is_caught_by_its_question_and_blocks(corruption, spans, schema, tmp_path):
    current = tmp_path / "natality.csv"
    shutil.copy(spans[1], current)
    generator.corrupt(current, corruption, seed=1)
    found = _findings(current, spans[0], schema)
    check, feature, kind = EXPECTED[corruption]
    assert (check, feature, kind) in {(f.check, f.feature, f.kind) for f in found}, found
    assert all(f.blocking for f in found)
    # Only the question at fault answers no; ages in months also shift the age distribution.
    also = {"drift"} if corruption == "domain" else set()
    assert {f.check for f in found} == {check} | also, found


def test_a_multi_valued_feature_breaks_its_value_count(schema, spans):
    requests = serving_check.read_requests(spans[0].with_suffix(".csv"))[:200]
    requests[7]["mother_age"] = [31, 32]
    statistics = serving_check.statistics_of(requests, schema)
    found = findings(validate_split(statistics, schema, None), "train", ())
    assert ("value_count", "mother_age", "FEATURE_TYPE_HIGH_NUMBER_VALUES") in {
        (f.check, f.feature, f.kind) for f in found}, found


def test_warning_checks_are_reported_without_blocking(spans, schema, tmp_path):
    current = tmp_path / "natality.csv"
    shutil.copy(spans[1], current)
    generator.corrupt(current, "extra_column")
    found = _findings(current, spans[0], schema, warning_checks=("unexpected",))
    assert found and not any(f.blocking for f in found)
    verdict = Verdict(2, 1, "", found)
    answers = {a["question"]: a for a in verdict.answers()}
    assert answers["Are any unexpected features present?"]["status"] == "warning"
    assert answers["Are any unexpected features present?"]["features"] == ["hospital_id"]
    assert answers["Are all expected features present?"]["status"] == "ok"
    assert Verdict.from_json(verdict.to_json()) == verdict


def test_drift_is_not_checked_without_a_previous_span():
    answers = Verdict(1, None, "", []).answers()
    assert answers[0]["status"].startswith("not checked") and {a["status"] for a in answers[1:]} == {"ok"}


def test_csv_nulls_count_as_missing_values():
    statistics = statistics_pb2.DatasetFeatureStatisticsList()
    dataset = statistics.datasets.add(num_examples=10)
    feature = dataset.features.add()
    feature.num_stats.common_stats.num_non_missing = 10  # CsvExampleGen: ten examples with the feature...
    feature.num_stats.common_stats.tot_num_values = 3  # ...three of them with a value
    feature.num_stats.common_stats.max_num_values = 1
    common = csv_presence(statistics).datasets[0].features[0].num_stats.common_stats
    assert (common.num_non_missing, common.num_missing, common.min_num_values) == (3, 7, 1)
    assert statistics.datasets[0].features[0].num_stats.common_stats.num_non_missing == 10  # a copy
