"""`babyweight predict --url`: a server's answers read as the other prediction paths read them (a stub server)."""

import contextlib
import csv
import http.server
import io
import json
import re
import socket
import sys
import threading
import time

import pytest

from serving.clients import client


@contextlib.contextmanager
def answering(predictions):
    """A stub of the prediction server on a free loopback port that answers every :predict with `predictions`
    (a JSON text: Python's json module writes and reads NaN and Infinity, as a careless server might send them)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = ('{"predictions": ' + predictions + "}").encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Model-Version", "4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_null_or_non_finite_prediction_is_a_failed_row_as_predict_batch_and_tflite_report_it(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("mother_age,gestation_weeks\n" + "".join(f"{age},39\n" for age in range(30, 36)))
    with answering('[[7.5], [NaN], [null], [Infinity], [-Infinity], ["7.5"]]') as url:
        code = client.main(["--url", url, str(rows)])
    captured = capsys.readouterr()
    results = list(csv.DictReader(io.StringIO(captured.out)))
    assert code == 1  # some rows failed
    assert [(r["prediction"], r["model_version"]) for r in results] == [("7.5", "4")] + [("", "")] * 5
    assert [r["error"] for r in results] == [
        "",
        "row 2: the model's prediction is not a number: nan",
        "row 3: the model's prediction is not a number: null",
        "row 4: the model's prediction is not a number: inf",
        "row 5: the model's prediction is not a number: -inf",
        "row 6: the model's prediction is not a number: '7.5'",
    ]
    assert "1 of 6 row(s) of" in captured.err and "5 refused (error column)" in captured.err
    # Every answer a number: every row predicted, exit 0.
    with answering(json.dumps([[7.5]] * 6)) as url:
        assert client.main(["--url", url, str(rows)]) == 0


class Scripted:
    """A :predict server on a free loopback port that answers mother_age / 10 for each instance, after playing
    `script` (one step per request: "503", ("429", retry_after), "reset": the request read and answered, then the
    socket closed before the answer goes out). It records each request (its X-Request-Id, its connection, its
    instances, when it came) and its X-Client-Id (`clients`); with `experiment`, it answers 409 for an id it answered
    before, as the real server does while it runs an experiment."""

    def __init__(self, script=(), experiment=False):
        self.script, self.requests, self.answered, self.clients = list(script), [], set(), []
        self.experiment = experiment
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real server

            def do_POST(self):
                instances = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["instances"]
                request_id = self.headers.get("X-Request-Id")
                scripted.requests.append((request_id, self.client_address, instances, time.monotonic()))
                scripted.clients.append(self.headers.get("X-Client-Id"))
                step = scripted.script.pop(0) if scripted.script else None
                if step == "reset":
                    scripted.answered.add(request_id)
                    self.close_connection = True
                    return
                if step == "503":
                    return self.answer(503, {"error": "no version available yet"})
                if isinstance(step, tuple):
                    return self.answer(429, {"error": "too many requests"}, {"Retry-After": step[1]})
                if scripted.experiment and request_id in scripted.answered:
                    message = f"X-Request-Id {request_id!r} was used by an earlier request of this experiment"
                    return self.answer(409, {"error": message})
                young = [n for n, instance in enumerate(instances) if instance["mother_age"] < 14]
                if young:
                    return self.answer(400, {"error": f"instance {young[0]}: feature 'mother_age': too young"})
                scripted.answered.add(request_id)
                self.answer(200, {"predictions": [[instance["mother_age"] / 10] for instance in instances]})

            def answer(self, status, content, headers=None):
                body = json.dumps(content).encode()
                self.send_response(status)
                for name, value in {
                    "X-Model-Version": "4",
                    "Content-Length": str(len(body)),
                    **(headers or {}),
                }.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    @property
    def ids(self):
        return [request[0] for request in self.requests]


@pytest.fixture
def ages(tmp_path):
    """A CSV of rows with these mothers' ages (all 39 weeks of gestation)."""

    def write(*values):
        path = tmp_path / "rows.csv"
        path.write_text("mother_age,gestation_weeks\n" + "".join(f"{age},39\n" for age in values))
        return str(path)

    return write


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(client, "BACKOFF_SECONDS", 0.01)


def predicted(out):
    return [(r["row"], r["prediction"], r["error"]) for r in csv.DictReader(io.StringIO(out))]


def test_a_503_is_retried_with_the_same_request_id_and_each_row_is_written_once(ages, capsys):
    with Scripted(["503"]) as server:
        code = client.main(["--url", server.url, "--batch-size", "2", ages(30, 31, 32)])
    assert code == 0
    assert predicted(capsys.readouterr().out) == [("1", "3.0", ""), ("2", "3.1", ""), ("3", "3.2", "")]
    first, second, third = server.ids
    assert first == second and re.fullmatch(r"[A-Za-z0-9._:/+=-]{1,64}", first)  # the server takes it
    assert third != first  # the next batch: its own id
    assert [len(request[2]) for request in server.requests] == [2, 2, 1]


def test_a_429s_retry_after_is_honoured_up_to_a_bound(ages, capsys, monkeypatch):
    with Scripted([("429", "1")]) as server:
        assert client.main(["--url", server.url, ages(30)]) == 0
    assert server.requests[1][3] - server.requests[0][3] >= 0.9  # the server's second, not the backoff's 0
    assert server.ids[0] == server.ids[1]
    # A Retry-After of an hour: the run waits at most RETRY_AFTER_MAX_SECONDS.
    monkeypatch.setattr(client, "RETRY_AFTER_MAX_SECONDS", 0.2)
    with Scripted([("429", "3600")]) as server:
        assert client.main(["--url", server.url, ages(30)]) == 0
    assert 0.15 <= server.requests[1][3] - server.requests[0][3] < 5


def test_the_client_id_goes_with_every_request_and_only_where_given(ages, capsys):
    with Scripted() as server:
        assert client.main(["--url", server.url, "--batch-size", "1", "--client-id", "ward-4", ages(30, 31)]) == 0
        assert client.main(["--url", server.url, ages(30)]) == 0
    assert server.clients == ["ward-4", "ward-4", None]
    with pytest.raises(SystemExit):  # a REST header: --grpc and --tflite don't send it
        client.main(["--grpc", "127.0.0.1:1", "--client-id", "ward-4", ages(30)])
    assert "--client-id goes with --url's requests" in capsys.readouterr().err


def test_batches_go_over_one_kept_alive_connection(ages, capsys):
    with Scripted() as server:
        assert client.main(["--url", server.url, "--batch-size", "2", ages(30, 31, 32, 33, 34, 35)]) == 0
    assert len(server.requests) == 3
    assert len({request[1] for request in server.requests}) == 1  # one client address: one connection


def test_a_connection_reset_after_the_request_is_retried_with_the_same_id(ages, capsys):
    with Scripted(["reset"]) as server:
        code = client.main(["--url", server.url, ages(30, 31)])
    assert code == 0
    assert predicted(capsys.readouterr().out) == [("1", "3.0", ""), ("2", "3.1", "")]
    assert len(server.ids) == 2 and server.ids[0] == server.ids[1]


def test_an_answer_lost_in_transit_is_an_error_row_not_a_second_answer(ages, capsys):
    # The server answered the first try (an experiment recorded it), the connection broke before the answer came
    # back; the retry's id is refused with 409: those rows get an error naming the id, the next batch its answer.
    with Scripted(["reset"], experiment=True) as server:
        code = client.main(["--url", server.url, "--batch-size", "2", ages(30, 31, 32)])
    captured = capsys.readouterr()
    rows = predicted(captured.out)
    assert code == 1
    assert rows[2] == ("3", "3.2", "")
    lost_id = server.ids[0]
    for number, prediction, error in rows[:2]:
        assert prediction == ""
        assert error.startswith(f"row {number}: the answer was lost in transit: request {lost_id} was answered")
    assert server.ids[:2] == [lost_id, lost_id]


def test_a_refused_instance_is_that_row_alone_and_the_others_go_again_with_a_new_id(ages, capsys):
    with Scripted() as server:
        code = client.main(["--url", server.url, ages(30, 13, 31)])
    assert code == 1
    assert predicted(capsys.readouterr().out) == [
        ("1", "3.0", ""),
        ("2", "", "row 2: feature 'mother_age': too young"),
        ("3", "3.1", ""),
    ]
    assert [len(request[2]) for request in server.requests] == [3, 2]
    assert None not in server.ids and server.ids[0] != server.ids[1]  # new contents, new id


def test_when_retries_run_out_the_command_exits_2_naming_the_server_and_the_tries(ages, capsys, monkeypatch):
    monkeypatch.setattr(client, "RETRIES", 2)
    with Scripted(["503"] * 10) as server:
        code = client.main(["--url", server.url, ages(30)])
    assert code == 2
    assert len(server.requests) == 3
    assert "answered 503 after 3 tries: no version available yet" in capsys.readouterr().err
    # Nobody listening: refused connects are retried too, then the same exit.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert client.main(["--url", f"http://127.0.0.1:{port}", ages(30)]) == 2
    err = capsys.readouterr().err
    assert f"can't reach http://127.0.0.1:{port}/v1/models/babyweight:predict (3 tries)" in err
    assert "Connection refused" in err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_progress_bar_on_a_terminal_and_none_elsewhere(ages, capsys, monkeypatch):
    with Scripted() as server:
        assert client.main(["--url", server.url, "--batch-size", "2", ages(30, 31, 32, 33, 34)]) == 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("5 of 5 row(s)")  # the summary alone: no bar
        monkeypatch.setattr(sys, "stderr", Terminal())
        assert client.main(["--url", server.url, "--batch-size", "2", ages(30, 31, 32, 33, 34)]) == 0
        assert "5/5" in sys.stderr.getvalue() and "\r" in sys.stderr.getvalue()
