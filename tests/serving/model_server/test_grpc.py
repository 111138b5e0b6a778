"""TF Serving's gRPC API, called with TF Serving's own client code (PredictionServiceStub, tf.make_tensor_proto):
the same answers as REST, the same checks, TF Serving's status codes, the request log and the metrics."""

import csv
import json
import subprocess
import sys

import grpc
import numpy
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from models import features
from serving.core import contract
from tests.serving import toy_model
from tests.serving.conftest import PROJECT_ROOT, call, free_port, running_server, wait_for
from tests.serving.model_server.test_server import LABELS_CONFIG, call_text

ROW = {"mother_age": 31, "gestation_weeks": 39, "is_male": "true"}


@pytest.fixture(scope="module")
def servers(toy_versions, tmp_path_factory):
    """One server (toy versions 1 and 2, labels stable -> 1 and canary -> 2) with gRPC on a free port, at most 5
    instances and 4 KiB a request."""
    root = tmp_path_factory.mktemp("grpc")
    config = root / "models.config"
    config.write_text(LABELS_CONFIG.format(base=toy_versions, policy="all {}", canary=2))
    port = free_port()
    flags = ("--grpc-port", str(port), "--max-instances", "5", "--max-body-bytes", "4096")
    flags += ("--model-config-file", str(config))
    with running_server(toy_versions, root / "logs", *flags, available=2) as url:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield {"url": url, "channel": channel, "logs": root / "logs", "port": port}


def predict_request(instances, signature="serving_raw", version=None, label=None):
    """TF Serving's PredictRequest as its users write it: a tensor per feature, made by tf.make_tensor_proto."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "babyweight"
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    keys = [features.instance_key(instance) for instance in instances]
    for name, values in features.raw_columns(keys).items():
        values = values.astype(bytes) if values.dtype == object else values
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    return request


def example(instance) -> tf.train.Example:
    feature = {}
    for name, value in instance.items():
        if isinstance(value, str):
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def refusal(call_, request):
    with pytest.raises(grpc.RpcError) as raised:
        call_(request, timeout=30)
    return raised.value.code(), raised.value.details()


def test_predictions_equal_rest_on_real_export_rows(servers, real_export_csv):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(servers["channel"])
    instances = []
    for row in list(csv.DictReader(real_export_csv.open()))[:400]:
        try:
            instances.append(contract.to_instance(row))
        except ValueError:  # a required feature missing: the contract's, tested elsewhere
            continue
    assert len(instances) > 300
    for start in range(0, len(instances), 5):
        batch = instances[start : start + 5]
        response, call_ = stub.Predict.with_call(predict_request(batch), timeout=30)
        grpc_answers = tf.make_ndarray(response.outputs["predictions"])
        status, _, body = call(servers["url"] + "/v1/models/babyweight:predict", {"instances": batch})
        assert status == 200 and grpc_answers.shape == (len(batch), 1)
        assert grpc_answers[:, 0].tolist() == [answer[0] for answer in body["predictions"]]
        assert response.model_spec.version.value == 2 and response.model_spec.signature_name == "serving_raw"
        assert dict(call_.trailing_metadata())["x-model-version"] == "2"
    # serving_default: serialized tf.Examples, the same answers
    batch = instances[:5]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "babyweight"  # no signature: serving_default, as TF Serving's default
    request.inputs["examples"].CopyFrom(
        tf.make_tensor_proto([example(instance).SerializeToString() for instance in batch])
    )
    by_examples = tf.make_ndarray(stub.Predict(request, timeout=30).outputs["predictions"])[:, 0]
    by_features = tf.make_ndarray(stub.Predict(predict_request(batch), timeout=30).outputs["predictions"])[:, 0]
    assert by_examples.tolist() == by_features.tolist()
    assert by_features[0] == pytest.approx(toy_model.expected(batch[0], 2.0), abs=1e-4)


def test_versions_regress_metadata_and_status(servers):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(servers["channel"])
    for spec in ({"version": 1}, {"label": "stable"}):
        answer = stub.Predict(predict_request([ROW], **spec), timeout=30)
        assert answer.outputs["predictions"].float_val[0] == pytest.approx(toy_model.expected(ROW, 1.0), abs=1e-4)
        assert answer.model_spec.version.value == 1
    code, details = refusal(stub.Predict, predict_request([ROW], label="nightly"))
    assert code == grpc.StatusCode.NOT_FOUND and "nightly" in details
    # Regress: tf.Examples with a context shared by each
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "babyweight"
    listed = request.input.example_list_with_context
    listed.context.CopyFrom(example({"gestation_weeks": 39}))
    for age in (25, 35):
        listed.examples.add().CopyFrom(example({"mother_age": age}))
    regressions = stub.Regress(request, timeout=30).result.regressions
    expected = [toy_model.expected({"mother_age": age, "gestation_weeks": 39}, 2.0) for age in (25, 35)]
    assert [r.value for r in regressions] == pytest.approx(expected, abs=1e-4)
    # Classify: refused as TF Serving refuses it for a regression model
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "babyweight"
    code, details = refusal(stub.Classify, classify)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tensorflow/serving/classify" in details
    # GetModelMetadata: the signatures
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "babyweight"
    answer = stub.GetModelMetadata(metadata, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    answer.metadata["signature_def"].Unpack(signatures)
    assert {"serving_raw", "serving_default"} <= set(signatures.signature_def)
    assert set(signatures.signature_def["serving_raw"].inputs) == set(features.FEATURE_NAMES)
    assert answer.model_spec.version.value == 2
    # GetModelStatus: every version's state
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "babyweight"
    models = model_service_pb2_grpc.ModelServiceStub(servers["channel"])
    states = {
        s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
        for s in models.GetModelStatus(status, timeout=30).model_version_status
    }
    assert states == {1: "AVAILABLE", 2: "AVAILABLE"}


def test_refusals_carry_tf_servings_codes(servers):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(servers["channel"])
    code, details = refusal(stub.Predict, predict_request([ROW, {**ROW, "gestation_weeks": 1e30}]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance 1: feature 'gestation_weeks' is 1.00000001504" in details and "outside its domain" in details
    code, details = refusal(stub.Predict, predict_request([ROW, {"mother_age": 30}]))
    assert (
        code == grpc.StatusCode.INVALID_ARGUMENT and "instance 1: missing required feature 'gestation_weeks'" in details
    )
    request = predict_request([ROW])
    request.inputs["mother_age"].CopyFrom(tf.make_tensor_proto(["thirty"]))
    code, details = refusal(stub.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 'mother_age': DT_STRING" in details
    request = predict_request([ROW])
    request.inputs["mother_age"].dtype = 12345  # no dtype has that number: a refusal naming it, not a 500
    code, details = refusal(stub.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 'mother_age': dtype 12345" in details
    request = predict_request([ROW])
    request.inputs["mother_age"].tensor_shape.dim.add(size=3)  # [1, 3]: one value per instance, or refused
    code, details = refusal(stub.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape [1, 3]" in details
    request = predict_request([ROW])
    request.inputs["shoe_size"].CopyFrom(tf.make_tensor_proto([42.0]))
    assert refusal(stub.Predict, request)[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = refusal(stub.Predict, predict_request([ROW], version=7))
    assert code == grpc.StatusCode.NOT_FOUND and "7" in details
    request = predict_request([ROW])
    request.model_spec.name = "another"
    assert refusal(stub.Predict, request)[0] == grpc.StatusCode.NOT_FOUND
    code, details = refusal(stub.Predict, predict_request([ROW] * 6))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "6 instances" in details
    # More bytes than --max-body-bytes: gRPC's own limit, before anything is read
    request = predict_request([ROW])
    request.inputs["mother_age"].CopyFrom(tf.make_tensor_proto(numpy.full(5000, 30.0, numpy.float32)))
    assert refusal(stub.Predict, request)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A count the shape claims is checked before any value is read
    request = predict_request([ROW])
    for tensor in request.inputs.values():
        tensor.tensor_shape.dim[0].size = 10**12
    assert refusal(stub.Predict, request)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_request_log_metrics_and_request_ids(servers):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(servers["channel"])
    _, call_ = stub.Predict.with_call(
        predict_request([{**ROW, "mother_age": 44}]), metadata=[("x-request-id", "grpc-client-7")], timeout=30
    )
    assert dict(call_.trailing_metadata())["x-request-id"] == "grpc-client-7"
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(predict_request([ROW]), metadata=[("x-request-id", "no spaces please")], timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "X-Request-Id" in raised.value.details()

    def logged():
        return [
            json.loads(line)
            for path in servers["logs"].rglob("*.jsonl")
            for line in path.read_text().splitlines()
            if "grpc-client-7" in line
        ]

    records = wait_for(logged, 10)
    assert records[0]["instance"]["mother_age"] == 44 and records[0]["version"] == 2
    exposition = call_text(servers["url"] + "/metrics")
    assert 'babyweight_requests_total{code="200",route="grpc_predict",version="2"}' in exposition
    assert 'babyweight_requests_total{code="400",route="grpc_predict",version="none"}' in exposition
    assert "babyweight_model_version_state" in exposition and 'state="AVAILABLE"' in exposition
    assert "babyweight_model_load_seconds" in exposition
    assert "babyweight_process_resident_memory_bytes" in exposition


def test_the_client_id_is_logged_absent_is_empty_and_a_bad_one_is_refused_naming_it(servers):
    """x-client-id as REST's X-Client-Id: into each record of the request log, "" when not sent, and refused
    (INVALID_ARGUMENT naming the header, nothing logged) beyond the request id's characters and length."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(servers["channel"])
    sent = {"grpc-client-9": [("x-client-id", "ward-4:tablet/2")], "grpc-anonymous": []}
    for request_id, client in sent.items():
        stub.Predict(predict_request([ROW, ROW]), metadata=[("x-request-id", request_id), *client], timeout=30)
    for number, bad in enumerate(["x" * 129, "no spaces", "<script>"]):
        metadata = [("x-request-id", f"grpc-bad-client-{number}"), ("x-client-id", bad)]
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(predict_request([ROW]), metadata=metadata, timeout=30)
        code, details = raised.value.code(), raised.value.details()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("X-Client-Id: at most 128 letters")
    stub.Predict(predict_request([ROW]), metadata=[("x-request-id", "grpc-after-bad-clients")], timeout=30)

    def logged():
        records = [
            json.loads(line) for path in servers["logs"].rglob("*.jsonl") for line in path.read_text().splitlines()
        ]
        done = any(record["request_id"] == "grpc-after-bad-clients" for record in records)
        return done and {
            (r["request_id"], r["index"]): r["client"] for r in records if r["request_id"].startswith("grpc-")
        }

    clients = wait_for(logged, 10)
    assert clients[("grpc-client-9", 0)] == clients[("grpc-client-9", 1)] == "ward-4:tablet/2"
    assert clients[("grpc-anonymous", 0)] == clients[("grpc-anonymous", 1)] == ""
    assert not [request_id for request_id, _ in clients if request_id.startswith("grpc-bad-client")]


def test_a_port_in_use_stops_the_start(servers, toy_versions, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "babyweight_cli",
            "serve",
            "--model-dir",
            str(toy_versions),
            "--port",
            str(free_port()),
            "--grpc-port",
            str(servers["port"]),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and f"--grpc-port {servers['port']}: can't listen" in done.stderr


def test_the_benchmarks_load_generator_counts_answers_and_refusals(servers):
    """make bench-serving's gRPC load (serving/bench/grpc_load.py) writes HTTP/2 itself: an answer counts, a refusal
    (no message, an error status) is an error, never a request answered."""
    from serving.bench import grpc_load

    good = grpc_load.predict_body(ROW)
    answered = grpc_load.drive("127.0.0.1", servers["port"], [good], 2, 0.5)
    assert answered["requests"] > 10 and answered["non2xx"] == 0 and answered["p50_ms"] > 0
    refused = grpc_load.drive("127.0.0.1", servers["port"], [grpc_load.predict_body({"mother_age": 30})], 1, 0.3)
    assert refused["requests"] > 0 and refused["non2xx"] == refused["requests"]


def test_the_docs_grpc_example_runs_as_written(servers):
    """docs/serving.md's Python example, run against this server (its port for 8500): it prints predictions."""
    text = (PROJECT_ROOT / "docs" / "serving.md").read_text()
    section = text[text.index("### TF Serving's gRPC API") :]
    example = section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]
    done = subprocess.run(
        [sys.executable, "-c", example.replace("localhost:8500", f"127.0.0.1:{servers['port']}")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [float(value) for value in done.stdout.replace("[", " ").replace("]", " ").split()]
    expected = [
        toy_model.expected({"mother_age": 31, "gestation_weeks": 39, "is_male": "true"}, 2.0),
        toy_model.expected({"mother_age": 25, "gestation_weeks": 40}, 2.0),
    ]
    assert printed == pytest.approx(expected, abs=1e-3)
