"""Requests in TF Serving's formats, checked against the serving contract before anything is predicted."""

import base64
import json

import pytest

from models import features
from serving.core import contract

ROW = {"mother_age": 31, "gestation_weeks": 39, "is_male": True, "plurality": 1}


def body(payload) -> bytes:
    return json.dumps(payload).encode()


def test_rows_become_the_models_keys():
    request = contract.parse_predict(body({"instances": [ROW, {"mother_age": 25, "gestation_weeks": [40]}]}), 10)
    assert request.signature == contract.RAW_SIGNATURE and not request.columnar
    assert request.keys[0] == features.instance_key({**ROW, "is_male": "true"})
    assert request.keys[1] == features.instance_key({"mother_age": 25, "gestation_weeks": 40})
    assert request.instances[0] == ROW  # logged as sent


def test_columns_are_read_as_rows_and_answered_as_outputs():
    request = contract.parse_predict(body({"inputs": {"mother_age": [31, 25], "gestation_weeks": [39, 40]}}), 10)
    assert request.columnar and len(request.keys) == 2
    assert json.loads(contract.response(request, [7.5, 8.0])) == {"outputs": [[7.5], [8.0]]}
    row_request = contract.parse_predict(body({"instances": [ROW]}), 10)
    assert json.loads(contract.response(row_request, [7.5])) == {"predictions": [[7.5]]}


def test_regress_merges_the_context_into_each_example():
    request = contract.parse_regress(
        body(
            {
                "context": {"mother_age": 30},
                "examples": [{"gestation_weeks": 39}, {"gestation_weeks": 41, "mother_age": 20}],
            }
        ),
        10,
    )
    assert [key[features.FEATURE_NAMES.index("mother_age")] for key in request.keys] == [30.0, 20.0]


def test_serialized_examples_go_to_serving_default_as_their_features():
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    example.features.feature["mother_age"].int64_list.value.append(31)
    example.features.feature["gestation_weeks"].float_list.value.append(39.0)
    example.features.feature["is_male"].bytes_list.value.append(b"true")
    example.features.feature["weight_pounds"].float_list.value.append(7.5)  # not a feature: ignored
    encoded = base64.b64encode(example.SerializeToString()).decode()
    for instance in ({"b64": encoded}, {"examples": {"b64": encoded}}):
        request = contract.parse_predict(body({"instances": [instance]}), 10)
        assert request.signature == contract.EXAMPLES_SIGNATURE
        assert request.instances == [{"mother_age": [31], "gestation_weeks": [39.0], "is_male": ["true"]}]
        assert request.keys == [features.instance_key({"mother_age": 31, "gestation_weeks": 39, "is_male": "true"})]


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"instances": [ROW, {**ROW, "mother_age": "thirty"}]}, "instance 1: feature 'mother_age' must be a number"),
        ({"instances": [{**ROW, "is_male": 1}]}, "instance 0: feature 'is_male' must be a string"),
        ({"instances": [{**ROW, "apgar_1min": 9}]}, "instance 0: unknown feature 'apgar_1min'"),
        ({"instances": [ROW, ROW, {"mother_age": 30}]}, "instance 2: missing required feature 'gestation_weeks'"),
        ({"instances": [{**ROW, "gestation_weeks": 99}]}, "instance 0: missing required feature 'gestation_weeks'"),
        ({"instances": [{**ROW, "plurality": [1, 2]}]}, "instance 0: feature 'plurality' has 2 values"),
        ({"instances": ["x"]}, "instance 0: expected an object"),
        ({"instances": []}, "non-empty list"),
        ({"instances": [ROW], "inputs": {}}, "exactly one of"),
        ({"inputs": {"mother_age": [30, 31], "gestation_weeks": [39]}}, "one value per instance"),
        ({"instances": [ROW], "signature_name": "score_examples"}, "unknown signature_name 'score_examples'"),
        ({"signature_name": "serving_default", "instances": [ROW]}, "instance 0: serving_default takes serialized"),
        ({"instances": [{"b64": "not base64!"}]}, "instance 0: 'b64' is not base64"),
        (
            {"instances": [{"b64": base64.b64encode(b"\xff\xfe garbage").decode()}]},
            "instance 0: 'b64' is not a serialized",
        ),
        ({"instances": [{"b64": base64.b64encode(b"").decode()}]}, "instance 0: missing required feature 'mother_age'"),
        # The schema's domains: absurd numbers are no birth (1e30 weeks once reached the model as int64's minimum).
        (
            {"instances": [ROW, {**ROW, "gestation_weeks": 1e30}]},
            r"instance 1: feature 'gestation_weeks' is 1e\+30, outside its domain \[17, 99\]",
        ),
        (
            {"instances": [{**ROW, "mother_age": -5}]},
            r"instance 0: feature 'mother_age' is -5, outside its domain \[10, 64\]",
        ),
        ({"instances": [{**ROW, "plurality": [9]}]}, r"feature 'plurality' is 9, outside its domain \[1, 5\]"),
        (
            {"instances": [{**ROW, "is_male": "x" * 65}]},
            "instance 0: feature 'is_male' is a text of 65 characters; at most 64",
        ),
    ],
)
def test_bad_requests_are_refused_naming_the_instance_and_feature(payload, message):
    with pytest.raises(contract.RequestError, match=message) as refused:
        contract.parse_predict(body(payload), 10)
    assert refused.value.status == 400


def test_every_numeric_feature_has_its_domain_from_the_schema_and_its_unknown_codes_are_inside():
    domains = contract.numeric_domains()
    assert {c.name for c in features.FEATURES if c.dtype != "string"} == set(domains)
    for column in features.FEATURES:
        for code in getattr(column, "missing_codes", ()):
            assert domains[column.name][0] <= code <= domains[column.name][1], column.name


def test_columns_are_counted_before_they_become_rows():
    """A 1 MiB body of columns once became ~100 MB of rows before the limit was checked."""
    calls = []
    original = contract.check_count
    contract.check_count = lambda count, limit: (calls.append(count), original(count, limit))
    try:
        with pytest.raises(contract.RequestError, match="100000 instances in one request") as big:
            contract.parse_predict(
                body({"inputs": {"mother_age": [30] * 100_000, "gestation_weeks": [39] * 100_000}}), 10
            )
    finally:
        contract.check_count = original
    assert big.value.status == 413 and calls == [100_000]


def test_malformed_json_and_too_many_instances():
    with pytest.raises(contract.RequestError, match="not JSON") as malformed:
        contract.parse_predict(b'{"instances": [', 10)
    assert malformed.value.status == 400
    with pytest.raises(contract.RequestError, match="11 instances in one request; the server takes at most 10") as big:
        contract.parse_predict(body({"instances": [ROW] * 11}), 10)
    assert big.value.status == 413
