"""`babyweight predict --grpc`: TF Serving's gRPC API, against a stub PredictionService on a free loopback port."""

import concurrent.futures
import contextlib
import csv
import io
import math
import threading

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from models import features
from serving.clients import client


class Stub(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Answers mother_age / 10 per instance from version 7, after failing the first `unavailable` calls with
    UNAVAILABLE; refuses the first instance younger than 14 with INVALID_ARGUMENT ("instance N: ..."), as the server
    does; records each call's request and x-request-id. With `experiment`, it answers ALREADY_EXISTS for an id it
    answered before, as the server does while it runs an experiment (the failed calls were answered first)."""

    def __init__(self, unavailable=0, code=None, experiment=False):
        self.unavailable, self.code, self.experiment, self.calls = unavailable, code, experiment, []
        self.lock = threading.Lock()

    def Predict(self, request, context):
        with self.lock:
            request_id = dict(context.invocation_metadata()).get("x-request-id")
            again = request_id in {call[1] for call in self.calls}
            self.calls.append((request, request_id))
            fail = len(self.calls) <= self.unavailable
        if self.experiment and again:
            message = f"X-Request-Id {request_id!r} was used by an earlier request of this experiment; send a new one"
            context.abort(grpc.StatusCode.ALREADY_EXISTS, message)
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if self.code is not None:
            context.abort(self.code, f"model {request.model_spec.name!r} not found")
        ages = tf.make_ndarray(request.inputs["mother_age"])
        young = [n for n, age in enumerate(ages) if age < 14]
        if young:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {young[0]}: feature 'mother_age': too young")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = 7
        response.outputs["predictions"].CopyFrom(tf.make_tensor_proto(ages.reshape(-1, 1) / 10, tf.float32))
        return response


@contextlib.contextmanager
def serving(stub):
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(timeout=5)


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("mother_age,gestation_weeks,is_male,father_age\n30,39,true,33\n13,38,,\n32,40,false,99\n")
    return str(path)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(client, "BACKOFF_SECONDS", 0.01)


def results(out):
    """(row, prediction to 3 places (float32's), version, error) of the command's CSV."""
    return [
        (r["row"], r["prediction"] and f"{float(r['prediction']):.3}", r["model_version"], r["error"])
        for r in csv.DictReader(io.StringIO(out))
    ]


def test_the_rows_go_as_serving_raw_tensors_and_come_back_with_the_version(rows, capsys):
    stub = Stub()
    with serving(stub) as target:
        code = client.main(["--grpc", target, "--label", "stable", "--batch-size", "2", rows])
    assert code == 1  # row 2 refused
    assert results(capsys.readouterr().out) == [
        ("1", "3.0", "7", ""),
        ("2", "", "", "row 2: feature 'mother_age': too young"),
        ("3", "3.2", "7", ""),
    ]
    request, request_id = stub.calls[0]
    assert request.model_spec.name == client.MODEL_NAME and request.model_spec.version_label == "stable"
    assert request.model_spec.signature_name == "serving_raw"
    assert sorted(request.inputs) == sorted(features.FEATURE_NAMES)  # a map: no order
    assert tf.make_ndarray(request.inputs["is_male"]).tolist() == [b"true", b""]
    father = tf.make_ndarray(request.inputs["father_age"])
    assert father.dtype == "float32" and father[0] == 33 and math.isnan(father[1])
    assert request_id and len({call[1] for call in stub.calls}) == 3  # a batch, the same less row 2, the next


def test_a_version_number_is_asked_as_model_spec_version(rows, capsys):
    stub = Stub()
    with serving(stub) as target:
        client.main(["--grpc", target, "--version", "3", rows])
    assert stub.calls[0][0].model_spec.version.value == 3


def test_unavailable_is_retried_with_the_same_request_id(rows, capsys):
    stub = Stub(unavailable=2)
    with serving(stub) as target:
        assert client.main(["--grpc", target, "--batch-size", "3", rows]) == 1
    assert [row[1] for row in results(capsys.readouterr().out)] == ["3.0", "", "3.2"]
    first, second, third, again = (call[1] for call in stub.calls)
    assert first == second == third != again  # three tries of one batch, then it without row 2


def test_an_answer_lost_in_transit_is_an_error_row_not_a_second_answer(rows, capsys):
    stub = Stub(unavailable=1, experiment=True)
    with serving(stub) as target:
        assert client.main(["--grpc", target, "--batch-size", "1", rows]) == 1
    out = results(capsys.readouterr().out)
    lost = stub.calls[0][1]
    assert out[0][:3] == ("1", "", "")
    assert out[0][3].startswith(f"row 1: the answer was lost in transit: request {lost} was answered")
    assert out[1:] == [("2", "", "", "row 2: feature 'mother_age': too young"), ("3", "3.2", "7", "")]


def test_other_failures_and_retries_run_out_exit_2(rows, capsys, monkeypatch):
    monkeypatch.setattr(client, "RETRIES", 1)
    with serving(Stub(code=grpc.StatusCode.NOT_FOUND)) as target:
        assert client.main(["--grpc", target, rows]) == 2
    assert f"error: {target} answered NOT_FOUND: model 'babyweight' not found" in capsys.readouterr().err
    stub = Stub(unavailable=10)
    with serving(stub) as target:
        assert client.main(["--grpc", target, rows]) == 2
    assert len(stub.calls) == 2
    assert f"error: {target} answered UNAVAILABLE after 2 tries: warming up" in capsys.readouterr().err


def test_a_request_too_large_is_not_retried(rows, capsys, monkeypatch):
    """RESOURCE_EXHAUSTED for too many instances (the server's words) would come again: one try, exit 2."""

    class TooLarge(Stub):
        def Predict(self, request, context):
            self.calls.append((request, None))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "3 instances in one request; the server takes at most 2")

    stub = TooLarge()
    with serving(stub) as target:
        assert client.main(["--grpc", target, rows]) == 2
    assert len(stub.calls) == 1 and "at most 2" in capsys.readouterr().err
