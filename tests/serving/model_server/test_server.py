"""The server's REST API, versions, labels, cache, request log and metrics, over toy versions in a subprocess."""

import base64
import json
import re

import pytest
import tensorflow as tf

from models import features
from models import requests as requests_lib
from serving.model_server import request_log
from tests.serving import toy_model
from tests.serving.conftest import call, running_server, wait_for

ROW = {"mother_age": 31, "gestation_weeks": 39, "is_male": True}
LABELS_CONFIG = """model_config_list {{
  config {{
    name: "babyweight"
    base_path: "{base}"
    model_platform: "tensorflow"
    model_version_policy {{ {policy} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: {canary} }}
  }}
}}
"""


@pytest.fixture(scope="module")
def server(toy_versions, tmp_path_factory):
    """Versions 1 and 2 served (all versions), labels stable -> 1 and canary -> 2."""
    folder = tmp_path_factory.mktemp("server")
    config = folder / "models.config"
    config.write_text(LABELS_CONFIG.format(base=toy_versions, policy="all {}", canary=2))
    with running_server(
        toy_versions,
        folder / "logs",
        "--model-config-file",
        str(config),
        "--max-instances",
        "8",
        "--max-body-bytes",
        "4000",
        available=2,
    ) as url:
        yield url, folder / "logs", toy_versions


def test_status_lists_every_version_and_each_route(server):
    url = server[0]
    status, _, body = call(f"{url}/v1/models/babyweight")
    assert status == 200
    assert [(v["version"], v["state"]) for v in body["model_version_status"]] == [
        ("2", "AVAILABLE"),
        ("1", "AVAILABLE"),
    ]
    assert call(f"{url}/v1/models/babyweight/versions/1")[2]["model_version_status"][0]["version"] == "1"
    assert call(f"{url}/v1/models/babyweight/labels/canary")[2]["model_version_status"][0]["version"] == "2"


def test_metadata_names_the_signatures_inputs_and_outputs(server):
    url = server[0]
    status, _, body = call(f"{url}/v1/models/babyweight/versions/1/metadata")
    assert status == 200 and body["model_spec"] == {"name": "babyweight", "signature_name": "", "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert set(signatures["serving_raw"]["inputs"]) == set(features.FEATURE_NAMES)
    assert signatures["serving_raw"]["inputs"]["is_male"]["dtype"] == "DT_STRING"
    assert "predictions" in signatures["serving_default"]["outputs"]
    assert body["limits"] == {"max_instances": 8, "max_body_bytes": 4000}  # the fixture's flags


@pytest.mark.parametrize("path, offset", [("", 2), ("/versions/1", 1), ("/labels/stable", 1), ("/labels/canary", 2)])
def test_predict_answers_with_the_version_asked(server, path, offset):
    url = server[0]
    status, headers, body = call(
        f"{url}/v1/models/babyweight{path}:predict", {"instances": [ROW, {**ROW, "is_male": None}]}
    )
    assert status == 200, body
    assert [p[0] for p in body["predictions"]] == pytest.approx(
        [toy_model.expected(ROW, offset), toy_model.expected({**ROW, "is_male": None}, offset)]
    )
    assert headers["x-model-version"] == str(offset) and headers["x-request-id"]


def test_columnar_regress_and_serialized_examples(server):
    url = server[0]
    status, _, body = call(
        f"{url}/v1/models/babyweight:predict", {"inputs": {"mother_age": [31], "gestation_weeks": [39]}}
    )
    assert status == 200 and body["outputs"][0][0] == pytest.approx(2 + 3.1 + 1.95)
    status, _, body = call(
        f"{url}/v1/models/babyweight/versions/1:regress",
        {"context": {"mother_age": 31}, "examples": [{"gestation_weeks": 39}, {"gestation_weeks": 40}]},
    )
    assert status == 200 and body["results"] == pytest.approx([1 + 3.1 + 1.95, 1 + 3.1 + 2.0])
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                "mother_age": tf.train.Feature(float_list=tf.train.FloatList(value=[31])),
                "gestation_weeks": tf.train.Feature(float_list=tf.train.FloatList(value=[39])),
            }
        )
    )
    b64 = base64.b64encode(example.SerializeToString()).decode()
    status, _, body = call(
        f"{url}/v1/models/babyweight:predict", {"signature_name": "serving_default", "instances": [{"b64": b64}]}
    )
    assert status == 200 and body["predictions"][0][0] == pytest.approx(2 + 3.1 + 1.95)
    no_weeks = tf.train.Example(
        features=tf.train.Features(feature={"mother_age": tf.train.Feature(float_list=tf.train.FloatList(value=[31]))})
    ).SerializeToString()
    status, _, body = call(
        f"{url}/v1/models/babyweight:predict",
        {"instances": [{"b64": b64}, {"b64": base64.b64encode(no_weeks).decode()}]},
    )
    assert status == 400 and "instance 1: missing required feature 'gestation_weeks'" in body["error"]
    # A whole row of the table, as the training data's examples are: the label and other columns are ignored.
    row = tf.train.Example(
        features=tf.train.Features(
            feature={
                "mother_age": tf.train.Feature(int64_list=tf.train.Int64List(value=[31])),
                "gestation_weeks": tf.train.Feature(int64_list=tf.train.Int64List(value=[39])),
                "is_male": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"true"])),
                "weight_pounds": tf.train.Feature(float_list=tf.train.FloatList(value=[7.5])),
            }
        )
    ).SerializeToString()
    status, _, body = call(
        f"{url}/v1/models/babyweight:predict", {"instances": [{"b64": base64.b64encode(row).decode()}]}
    )
    assert status == 200 and body["predictions"][0][0] == pytest.approx(toy_model.expected(ROW, 2))
    status, _, body = call(
        f"{url}/v1/models/babyweight:predict", {"instances": [{"b64": base64.b64encode(b"\xff\xfe garbage").decode()}]}
    )
    assert status == 400 and "instance 0: 'b64' is not a serialized tf.Example" in body["error"]


@pytest.mark.parametrize(
    "path, payload, status, message",
    [
        (
            "/v1/models/babyweight:predict",
            {"instances": [ROW, {"mother_age": 30}]},
            400,
            "instance 1: missing required feature 'gestation_weeks'",
        ),
        (
            "/v1/models/babyweight:predict",
            {"instances": [ROW, {**ROW, "gestation_weeks": 99.5}]},
            400,
            "instance 1: missing required feature 'gestation_weeks'",
        ),  # the model reads 99.5 weeks as 99, unknown
        (
            "/v1/models/babyweight:predict",
            {"instances": [{**ROW, "gestation_weeks": "39"}]},
            400,
            "instance 0: feature 'gestation_weeks' must be a number",
        ),
        (
            "/v1/models/babyweight:predict",
            {"instances": [{**ROW, "colour": "red"}]},
            400,
            "instance 0: unknown feature 'colour'",
        ),
        ("/v1/models/babyweight:predict", {"instances": [ROW] * 9}, 413, "at most 8"),
        ("/v1/models/babyweight:predict", {"instances": [{**ROW, "is_male": "x" * 5000}]}, 413, "at most 4000"),
        ("/v1/models/other:predict", {"instances": [ROW]}, 404, "no model named 'other'"),
        ("/v1/models/babyweight/versions/7:predict", {"instances": [ROW]}, 404, "no version 7"),
        ("/v1/models/babyweight/labels/beta:predict", {"instances": [ROW]}, 404, "no label 'beta'"),
        ("/v1/models/babyweight/versions/abc:predict", {"instances": [ROW]}, 404, "no version 'abc'"),
        ("/v1/models/babyweight/versions/%C2%B2:predict", {"instances": [ROW]}, 404, "no version '\u00b2'"),
    ],
)
def test_bad_requests_get_the_status_and_a_named_reason(server, path, payload, status, message):
    url = server[0]
    got, headers, body = call(url + path, payload)
    assert got == status and message in body["error"], body
    assert headers["x-request-id"]


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/v1/models/babyweight", 200),
        ("GET", "/v1/models/babyweight/versions/1/metadata", 200),
        ("GET", "/v1/models/babyweight/versions/%C2%B2", 404),
        ("GET", "/v1/models/babyweight:predict", 405),
        ("GET", "/nowhere", 404),
        ("DELETE", "/v1/models/babyweight", 405),
        ("PUT", "/metrics", 405),
    ],
)
def test_every_answer_carries_a_request_id_and_a_version_in_the_api_s_form(server, method, path, status):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(server[0] + path, method=method), timeout=30) as response:
            got, headers, body = response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        got, headers, body = error.code, error.headers, json.loads(error.read())
    assert got == status and headers["X-Request-Id"] and headers["X-Model-Version"]
    assert status == 200 or body["error"]
    if path.endswith("/metadata"):
        assert headers["X-Model-Version"] == "1"


def test_malformed_json_is_a_400_and_the_server_keeps_answering(server):
    url = server[0]
    status, _, body = call(f"{url}/v1/models/babyweight:predict", raw=b'{"instances": [{"mother_age": 3')
    assert status == 400 and "not JSON" in body["error"]
    assert call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})[0] == 200


def test_frequent_instances_are_answered_from_the_table_with_the_models_numbers(server):
    url, _, models = server
    before = _metric(url, 'babyweight_cache_lookups_total{result="hit",version="2"}')
    head = json.loads((models / "2" / features.FREQUENT_INSTANCES_FILE).read_text())
    instance = {k: v for k, v in head["instances"][0][1].items() if v is not None}
    status, _, body = call(f"{url}/v1/models/babyweight/versions/2:predict", {"instances": [instance]})
    assert status == 200 and body["predictions"][0][0] == pytest.approx(toy_model.expected(instance, 2), abs=1e-5)
    assert _metric(url, 'babyweight_cache_lookups_total{result="hit",version="2"}') == before + 1
    status, _, body = call(f"{url}/v1/models/babyweight/versions/1:predict", {"instances": [instance]})
    assert body["predictions"][0][0] == pytest.approx(toy_model.expected(instance, 1), abs=1e-5)  # v1's own table


def test_repeated_instances_are_learned_then_answered_from_the_table(server):
    url = server[0]
    rare = {"mother_age": 44, "gestation_weeks": 33, "father_age": 61}
    hits, answers = [], []
    for _ in range(3):
        before = _metric(url, 'babyweight_cache_lookups_total{result="hit",version="1"}')
        answers.append(call(f"{url}/v1/models/babyweight/versions/1:predict", {"instances": [rare]})[2]["predictions"])
        hits.append(_metric(url, 'babyweight_cache_lookups_total{result="hit",version="1"}') - before)
    assert hits == [0, 0, 1]  # answered twice by the model (--cache-admit-after 2), then by the table
    assert answers[0] == answers[1] == answers[2]


def test_a_body_of_40_megabytes_is_a_413_and_the_connection_answers(server):
    """The body is read and dropped before the 413: a client still sending it got a broken pipe, not the answer."""
    status, _, body = call(f"{server[0]}/v1/models/babyweight:predict", raw=b" " * 40_000_000)
    assert status == 413 and body["error"] == "the body has 40000000 bytes; the server takes at most 4000"
    assert call(f"{server[0]}/v1/models/babyweight:predict", {"instances": [ROW]})[0] == 200


def test_what_would_break_an_error_message_or_a_parser_is_a_4xx_in_the_apis_form(server):
    """A value nested a thousand deep (within JSON's limit, past repr's stack), a version of 5,000 digits (past int()'s
    limit) and a 200 KB header were a plain 500 or taken whole."""
    import http.client

    url = server[0]
    nested = b'{"instances": [{"gestation_weeks": 39, "mother_age": ' + b"[" * 1000 + b"]" * 1000 + b"}]}"
    status, _, body = call(f"{url}/v1/models/babyweight/versions/1:predict", raw=nested)
    assert status == 400 and body["error"].startswith("instance 0: feature 'mother_age'")
    assert len(body["error"]) < 300
    for method, path, data in (
        ("GET", "/v1/models/babyweight/versions/" + "9" * 5000, None),
        ("POST", "/v1/models/babyweight/versions/" + "9" * 5000 + ":predict", {"instances": [ROW]}),
    ):
        status, headers, body = call(url + path, data)
        assert status == 404 and "versions are numbers of at most 18 digits" in body["error"], method
        assert len(body["error"]) < 300 and {key.lower() for key in headers} >= {"x-request-id", "x-model-version"}
    host, port = url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/models/babyweight:predict", body=b"{}", headers={"X-Routing-Key": "x" * 200_000})
    answer = connection.getresponse()
    assert answer.status == 431 and json.loads(answer.read())["error"] == "the request head is longer than 65536 bytes"
    connection.close()
    assert call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})[0] == 200


@pytest.mark.slow
def test_a_version_answering_no_number_is_a_500_naming_it_never_cached_and_batches_are_capped(tmp_path):
    """A broken version (NaN for plurality 5) on every request path: said, counted, never kept; and a request larger
    than --max-batch-size takes several model calls."""
    toy_model.save(tmp_path / "models" / "1", 1.0, nonsense_when=("plurality", 5.0))
    broken = {"mother_age": 30, "gestation_weeks": 39, "plurality": 5}
    predict = "/v1/models/babyweight:predict"
    with running_server(tmp_path / "models", tmp_path / "logs", "--max-batch-size", "3") as url:
        answers = [call(url + predict, {"instances": [ROW, broken]}) for _ in range(3)]  # admitted after 2, if kept
        regress = call(url + "/v1/models/babyweight:regress", {"examples": [broken]})
        rows = [{"mother_age": 20 + n, "gestation_weeks": 30 + n} for n in range(7)]
        batches = _metric(url, 'babyweight_batch_instances_count{version="1"}')
        assert call(url + predict, {"instances": rows})[0] == 200
        calls = _metric(url, 'babyweight_batch_instances_count{version="1"}') - batches
        text = call_text(url + "/metrics")
    for status, headers, body in answers + [regress]:
        assert status == 500 and headers["x-model-version"] == "1"
        assert re.fullmatch(r"version 1 answered nan for instance [01], not a weight: nothing served", body["error"])
    assert answers[0][2]["error"].endswith("instance 1, not a weight: nothing served")
    assert 'babyweight_not_a_number_answers_total{version="1"} 4.0' in text
    assert 'babyweight_requests_total{code="500",route="predict",version="1"} 3.0' in text
    # 7 instances with --max-batch-size 3: three calls (3 + 3 + 1), none above 3.
    assert calls == 3
    count = re.search(r'babyweight_batch_instances_count\{version="1"\} (\S+)', text).group(1)
    assert re.search(r'babyweight_batch_instances_bucket\{le="4.0",version="1"\} (\S+)', text).group(1) == count


def test_metrics_count_requests_errors_batches_and_paths(server):
    """Counts what this test asked (not what earlier tests did: it passes run alone)."""
    url = server[0]
    rare = {"mother_age": 43, "gestation_weeks": 33, "is_male": "false"}  # in no table: the model answers
    assert call(f"{url}/v1/models/babyweight:predict", {"instances": [rare]})[0] == 200
    call(f"{url}/v1/models/babyweight:predict", {"instances": [{"mother_age": 30}]})
    text = call_text(f"{url}/metrics")
    for line in (
        'babyweight_requests_total{code="200",route="predict",version="2"}',
        'babyweight_requests_total{code="400",route="predict",version="2"}',
        'babyweight_batch_instances_count{version="2"}',
        'babyweight_request_seconds_bucket{le="0.005",path="model",version="2"}',
    ):
        assert line in text, line


@pytest.mark.parametrize("given", ["x" * 129, "a b", "id\u00e9", "<script>"])
def test_a_client_request_id_beyond_its_limits_is_refused_with_a_new_id(server, given):
    status, headers, body = call(
        f"{server[0]}/v1/models/babyweight:predict",
        {"instances": [ROW]},
        headers={"X-Request-Id": given.encode("utf-8").decode("latin-1")},
    )
    assert status == 400 and body["error"].startswith("X-Request-Id: at most 128 letters, digits and")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{32}", headers["x-request-id"])


def test_the_ids_the_server_makes_are_unguessable(server):
    """128 random bits after the process's prefix: a client can't send the outcome of another's request."""
    ids = [call(f"{server[0]}/v1/models/babyweight:predict", {"instances": [ROW]})[1]["x-request-id"] for _ in range(3)]
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{32}", found) for found in ids) and len(set(ids)) == 3
    suffixes = [int(found.split("-")[1], 16) for found in ids]
    assert max(suffixes) - min(suffixes) > 2**64  # not a counter


def _logged(logs, request_id: str) -> list:
    """The request log's records of one request, once the writer has written them."""
    return wait_for(
        lambda: [
            r
            for f in request_log.log_files(str(logs))
            for r in map(json.loads, f.open())
            if r["request_id"] == request_id
        ]
    )


def test_request_log_has_every_prediction_and_validate_serving_reads_it(server):
    url, logs = server[:2]
    status, headers, body = call(
        f"{url}/v1/models/babyweight/labels/stable:predict",
        {"instances": [ROW, {"mother_age": 22, "gestation_weeks": 41}]},
        headers={"X-Request-Id": "clinic-7-0001", "X-Client-Id": "clinic-7.app:2/b=+_-"},
    )
    assert headers["x-request-id"] == "clinic-7-0001"
    records = _logged(logs, "clinic-7-0001")
    assert [(r["index"], r["version"], r["instance"], r["prediction"], r["client"]) for r in records] == [
        (0, 1, ROW, body["predictions"][0][0], "clinic-7.app:2/b=+_-"),
        (1, 1, {"mother_age": 22, "gestation_weeks": 41}, body["predictions"][1][0], "clinic-7.app:2/b=+_-"),
    ]
    assert records[0]["path"] in ("cache", "model") and records[0]["latency_ms"] > 0
    assert ROW in requests_lib.read_requests(logs)  # what validate-serving reads
    # No X-Client-Id (or an empty one): the record's client is "".
    for number, sent in enumerate(
        ({"X-Request-Id": "anonymous-0"}, {"X-Request-Id": "anonymous-1", "X-Client-Id": ""})
    ):
        assert call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]}, headers=sent)[0] == 200
        assert [r["client"] for r in _logged(logs, f"anonymous-{number}")] == [""]


@pytest.mark.parametrize(
    "number, given", enumerate(["x" * 129, "a b", "id\u00e9", "<script>"]), ids=["long", "space", "accent", "markup"]
)
def test_a_client_id_beyond_the_request_ids_limits_is_refused_naming_the_header_and_not_logged(server, number, given):
    url, logs = server[:2]
    status, headers, body = call(
        f"{url}/v1/models/babyweight:predict",
        {"instances": [ROW]},
        headers={"X-Request-Id": f"bad-client-{number}", "X-Client-Id": given.encode("utf-8").decode("latin-1")},
    )
    assert status == 400 and body["error"].startswith("X-Client-Id: at most 128 letters, digits and")
    assert headers["x-request-id"] == f"bad-client-{number}"  # the request id was good: it is kept
    call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]}, headers={"X-Request-Id": f"after-{number}"})
    _logged(logs, f"after-{number}")  # the log has what came after: the refused request would be in it by now
    logged = [json.loads(line)["request_id"] for f in request_log.log_files(str(logs)) for line in f.open()]
    assert f"bad-client-{number}" not in logged


def call_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def _metric(url: str, name: str) -> float:
    for line in call_text(f"{url}/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
