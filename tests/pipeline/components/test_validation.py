"""Data validation answers each of the six questions: one corruption per question, through TFDV.

Statistics are computed in memory here as CsvExampleGen's output would give them (an empty CSV field is
a feature with no values); tests/test_spans_e2e.py runs the same corruptions through the pipeline.
"""

import pathlib
import shutil

import pytest
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2

from data import generator
from pipeline import config as config_lib
from pipeline.commands import serving_check
from pipeline.components.checks import CHECKS, QUESTIONS, check_of
from pipeline.components.validation import Verdict, csv_presence, findings, validate_span, validate_split
from pipeline.config import PROJECT_ROOT

SCHEMA_PATH = PROJECT_ROOT / "schema" / "schema.pbtxt"
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
        (f.check, f.feature, f.kind) for f in found
    }, found


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


@pytest.fixture(scope="module")
def real_spans(real_export_csv, schema):
    """The real export as the pipeline's spans would hold it: by year, and its first and last 2,000 rows,
    each split train/eval 4:1 (as ExampleGen's hash buckets), as statistics."""
    rows = serving_check.read_requests(real_export_csv)

    def span(part):
        return {
            "train": serving_check.statistics_of([r for i, r in enumerate(part) if i % 5], schema),
            "eval": serving_check.statistics_of([r for i, r in enumerate(part) if i % 5 == 0], schema),
        }

    years = sorted({row["year"] for row in rows})
    result = {f"year {year}": span([r for r in rows if r["year"] == year]) for year in years}
    result.update({"first 2,000 rows": span(rows[:2000]), "last 2,000 rows": span(rows[-2000:])})
    return result


def _validate(current, schema, previous=None, warning_checks=()):
    config = config_lib.load_config()
    return validate_span(current, schema, previous, warning_checks, config.min_imputed_presence, config.min_drift_rows)[
        1
    ]


def test_every_year_of_the_real_export_and_both_its_ends_pass_validation(real_spans, schema):
    """The share of rows with ever_born (and other columns) changes with the year: 30% in 2004, 96% in 2006."""
    assert len(real_spans) == 8
    for name, span in real_spans.items():
        blocking = [f.line() for f in _validate(span, schema) if f.blocking]
        assert not blocking, (name, blocking)


def test_years_in_order_pass_and_report_drift_on_small_spans(real_spans, schema):
    years = [name for name in real_spans if name.startswith("year")]
    reported = {}
    for previous, current in zip(years, years[1:]):
        found = _validate(real_spans[current], schema, real_spans[previous]["train"])
        assert not [f.line() for f in found if f.blocking], current
        reported[current] = {f.feature for f in found if f.check == "drift"}
    # 2008's rows (411 to train on) all have ever_born 8, 2007's mostly 1: reported, under min_drift_rows.
    assert "ever_born" in reported["year 2008"]
    assert not reported["year 2007"]  # two large years: no distance above its threshold


def test_the_same_drift_between_large_spans_blocks(real_spans, schema):
    """2005 against 2003-2004's rows would be small; 2008's drift against 2007 blocks once both are large."""
    config = config_lib.load_config()
    found = validate_span(
        real_spans["year 2008"],
        schema,
        real_spans["year 2007"]["train"],
        (),
        config.min_imputed_presence,
        min_drift_rows=400,
    )[1]
    assert ("drift", "ever_born", True) in {(f.check, f.feature, f.blocking) for f in found}


def _with_presence(span: dict, schema, feature: str, share: float, split: str = "train"):
    """A span whose `split` has `feature` in `share` of its rows (the others NULL)."""
    requests = serving_check.read_requests(SCHEMA_PATH.parents[1] / "data" / "natality" / "natality.csv")[:1000]
    value = next(request[feature] for request in requests if request[feature] is not None)
    for number, request in enumerate(requests):
        request[feature] = (request[feature] or value) if number < share * len(requests) else None
    return dict(span, **{split: serving_check.statistics_of(requests, schema)})


@pytest.mark.parametrize(
    "feature, share, split, blocks",
    [
        ("ever_born", 0.22, "train", False),  # below the schema's floor (0.25), above min_imputed_presence (0.2)
        ("ever_born", 0.1, "train", True),  # too few training rows: the model would answer worse with it
        ("ever_born", 0.0, "train", True),
        ("ever_born", 0.1, "eval", False),  # the eval split trains nothing
        ("mother_married", 0.9, "train", False),  # always present in the table: reported
        ("gestation_weeks", 0.7, "train", True),  # required by the serving contract: its floor blocks
        ("weight_pounds", 0.7, "eval", True),  # the label
    ],
)
def test_presence_blocks_an_imputed_feature_only_where_the_model_cant_be_trusted(
    real_spans, schema, feature, share, split, blocks
):
    found = [
        f
        for f in _validate(_with_presence(real_spans["year 2006"], schema, feature, share, split), schema)
        if f.check == "presence"
    ]
    assert [(f.feature, f.split) for f in found] == [(feature, split)] * len(found) and found, found
    assert {f.blocking for f in found} == {blocks}, found
    if feature == "ever_born":
        assert f"present in {share:.1%} of {split} rows" in found[0].description


def test_presence_can_be_made_a_warning(real_spans, schema):
    span = _with_presence(real_spans["year 2006"], schema, "ever_born", 0.0)
    assert not [f for f in _validate(span, schema, warning_checks=("presence",)) if f.blocking]


def test_drift_between_random_halves_of_one_year_is_noise_below_min_drift_rows(real_export_csv, schema):
    """Why min_drift_rows (docs/validation-and-spans.md, Presence by year, and small spans): between two random
    halves of the same year, TFDV's distances cross thresholds at 150 rows and stay under them at min_drift_rows."""
    import random

    pool = [r for r in serving_check.read_requests(real_export_csv) if r["year"] == "2006"]
    crossed, limit = {}, config_lib.load_config().min_drift_rows
    for rows in (150, limit):
        crossed[rows] = set()
        for seed in range(4):
            sample = random.Random(seed).sample(pool, 2 * rows)
            found = findings(
                validate_split(
                    serving_check.statistics_of(sample[:rows], schema),
                    schema,
                    serving_check.statistics_of(sample[rows:], schema),
                ),
                "train",
                (),
            )
            crossed[rows] |= {f.feature for f in found if f.check == "drift"}
    assert crossed[150] and not crossed[limit], crossed


def test_drift_thresholds_keep_a_margin_over_consecutive_clean_real_years(real_spans, schema):
    """2005, 2006 and 2007 of the real export (thousands of rows each): every distance TFDV measures between
    consecutive years stays under 1/1.4 of its threshold (the margin the schema's header states)."""
    import copy

    measuring = copy.deepcopy(schema)  # thresholds at ~0: TFDV then reports every distance
    thresholds = {}
    for feature in measuring.feature:
        if feature.HasField("drift_comparator"):
            comparator = feature.drift_comparator
            kind = "jensen_shannon_divergence" if comparator.HasField("jensen_shannon_divergence") else "infinity_norm"
            thresholds[feature.name] = getattr(comparator, kind).threshold
            getattr(comparator, kind).threshold = 1e-9
    for previous, current in (("year 2005", "year 2006"), ("year 2006", "year 2007")):
        found = findings(
            validate_split(real_spans[current]["train"], measuring, real_spans[previous]["train"]), "train", ()
        )
        assert {f.feature for f in found} == set(thresholds), found  # a distance for every compared feature
        for finding in found:
            distance = float(finding.description.split(" is ")[1].split(" ")[0])
            assert distance * 1.4 < thresholds[finding.feature], (current, finding.feature, distance)
