"""`babyweight predict --url`: a server's answers read as the other prediction paths read them (a stub server)."""

import contextlib
import csv
import http.server
import io
import json
import threading

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
