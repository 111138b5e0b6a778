"""The features table agrees with the curated schema and with itself."""

import pathlib

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from models import features
from models.features import Role, Transform

SCHEMA_PATH = pathlib.Path(__file__).resolve().parents[2] / "schema" / "schema.pbtxt"


def _schema() -> schema_pb2.Schema:
    return text_format.Parse(SCHEMA_PATH.read_text(), schema_pb2.Schema())


def test_table_has_the_31_columns_of_the_bigquery_table_once_each():
    assert len(features.COLUMN_NAMES) == 31
    assert len(set(features.COLUMN_NAMES)) == 31
    assert features.COLUMN_NAMES[:3] == ("source_year", "year", "month")
    assert features.COLUMN_NAMES[-1] == "record_weight"


def test_one_label_and_the_features_known_before_birth():
    assert features.LABEL.name == "weight_pounds"
    names = {c.name for c in features.FEATURES}
    assert {"is_male", "mother_age", "plurality", "gestation_weeks"} <= names
    assert not names & {"apgar_1min", "apgar_5min", "weight_pounds"}  # outcomes, not inputs
    assert all(c.transform is not Transform.NONE for c in features.FEATURES)


def test_schema_lists_exactly_the_table_columns():
    assert [f.name for f in _schema().feature] == list(features.COLUMN_NAMES)


def test_schema_serving_environment_holds_only_the_model_features():
    schema = _schema()
    assert set(schema.default_environment) == {"TRAINING", "SERVING"}
    serving = {f.name for f in schema.feature if "SERVING" not in f.not_in_environment}
    assert serving == {c.name for c in features.FEATURES}


def test_unknown_codes_fit_the_schema_domains_so_they_are_not_anomalies():
    by_name = {f.name: f for f in _schema().feature}
    for column in features.COLUMNS:
        domain = by_name[column.name].int_domain
        for code in column.missing_codes:
            assert domain.min <= code <= domain.max, column.name


def test_categorical_id_sizes_cover_every_id_and_crosses_multiply():
    sizes = features.id_sizes()
    assert sizes["plurality"] == 6  # five known counts plus unknown
    assert sizes["gestation_weeks_bucket"] == 6  # four boundaries give five buckets, plus missing
    for first, second in features.CROSSES:
        assert sizes[features.cross_name(first, second)] == sizes[first] * sizes[second]


def test_slices_are_overall_raw_features_and_the_gestation_bucket():
    assert features.slice_keys() == [[], ["is_male"], ["plurality"], ["gestation_weeks_bucket_xf"]]
    assert all(features.BY_NAME[name].role is Role.FEATURE for name in features.SLICE_FEATURES)


def test_schema_types_are_the_table_types():
    kinds = {schema_pb2.INT: "int", schema_pb2.FLOAT: "float", schema_pb2.BYTES: "string"}
    assert {f.name: kinds[f.type] for f in _schema().feature} == {c.name: c.dtype for c in features.COLUMNS}


def test_drift_and_skew_comparators_sit_on_the_model_features_by_kind():
    categorical = (features.Transform.VOCABULARY, features.Transform.CATEGORY)
    by_name = {f.name: f for f in _schema().feature}
    compared = {f.name for f in by_name.values() if f.HasField("drift_comparator")}
    assert compared == {c.name for c in features.FEATURES} | {features.LABEL.name}
    for column in list(features.FEATURES) + [features.LABEL]:
        feature = by_name[column.name]
        comparators = [feature.drift_comparator] + ([feature.skew_comparator] if column in features.FEATURES else [])
        for comparator in comparators:
            kind = "infinity_norm" if column.transform in categorical else "jensen_shannon_divergence"
            assert comparator.HasField(kind), (column.name, kind)
            assert 0 < getattr(comparator, kind).threshold < 1  # both distances are at most 1: 1 never fires
        if column.transform is features.Transform.CATEGORY:  # TFDV then counts its values like strings
            assert feature.int_domain.is_categorical


def test_serving_contract_requires_what_every_caller_knows_before_birth():
    assert {c.name for c in features.REQUIRED_FEATURES} == {"mother_age", "gestation_weeks"}
    assert features.missing_required({"mother_age": 30, "gestation_weeks": 39}) == []
    assert features.missing_required({"mother_age": "30", "gestation_weeks": 99}) == ["gestation_weeks"]
    assert features.missing_required({"gestation_weeks": [39], "mother_age": None}) == ["mother_age"]
    assert features.missing_required({"mother_age": [], "gestation_weeks": ""}) == ["mother_age", "gestation_weeks"]
    # As serving_raw reads an integer column: 99.5 weeks is the integer 99, the 'unknown' code.
    assert features.missing_required({"mother_age": 30, "gestation_weeks": 99.5}) == ["gestation_weeks"]
    assert features.missing_required({"mother_age": 30.7, "gestation_weeks": 38.9}) == []


def test_a_value_of_the_wrong_type_is_not_missing_but_left_to_the_type_check():
    age = features.BY_NAME["mother_age"]
    assert not features.is_missing_value(age, "thirty")
    assert features.is_missing_value(age, float("nan"))
    assert not features.is_missing_value(features.BY_NAME["is_male"], "false")
    assert not features.is_missing_value(features.BY_NAME["gestation_weeks"], True)  # a bool is the type check's
    assert features.is_missing_value(features.BY_NAME["gestation_weeks"], 99.000001)  # 99 in float32, as the graph
    assert features.is_missing_value(features.BY_NAME["is_male"], b"")
