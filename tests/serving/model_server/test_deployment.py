"""The server as Vertex AI runs it, with worker processes, and `babyweight predict` against it."""

import csv
import os
import subprocess
import sys
import time

import pytest

from models import features
from serving.core import contract
from serving.model_server import metrics
from tests.serving import toy_model
from tests.serving.conftest import PROJECT_ROOT, call, free_port, running_server
from tests.serving.model_server.test_server import call_text

ROW = {"mother_age": 31, "gestation_weeks": 39}


def test_vertex_ai_custom_container_contract(toy_versions, tmp_path):
    """Vertex sets the port, routes and model folder (the pushed version's copy) in AIP_* variables."""
    port = free_port()
    routes = "/v1/endpoints/123/deployedModels/456"
    env = {
        "AIP_HTTP_PORT": str(port),
        "AIP_HEALTH_ROUTE": routes,
        "AIP_PREDICT_ROUTE": routes + ":predict",
        "AIP_STORAGE_URI": str(toy_versions / "1"),
    }
    with running_server(tmp_path / "ignored", tmp_path / "logs", env=env) as url:
        assert url.endswith(f":{port}")
        status, _, body = call(url + routes)
        assert status == 200 and body["versions"] == [1]
        status, headers, body = call(url + routes + ":predict", {"instances": [ROW], "parameters": {}})
        assert status == 200 and body["predictions"][0][0] == pytest.approx(toy_model.expected(ROW, 1.0))
        assert headers["x-model-version"] == "1"


@pytest.mark.slow
def test_worker_processes_share_the_port_and_the_metrics(toy_versions, tmp_path):
    def answered() -> float:
        return sum(
            float(line.split()[-1])
            for line in call_text(f"{url}/metrics").splitlines()
            if line.startswith('babyweight_requests_total{code="200"')
        )

    with running_server(toy_versions, tmp_path / "logs", "--workers", "2") as url:
        # Each worker loads its own copy: until both have, one may still answer 503.
        streak, deadline = 0, time.monotonic() + 120
        while streak < 20:
            assert time.monotonic() < deadline, "the two workers never answered 20 requests in a row"
            streak = streak + 1 if call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})[0] == 200 else 0
        time.sleep(metrics.FLUSH_SECONDS * 3)  # each process moves its counts to the shared files every flush
        before = answered()
        prefixes = set()
        for number in range(40):
            status, headers, _ = call(
                f"{url}/v1/models/babyweight:predict", {"instances": [{**ROW, "mother_age": 20 + number}]}
            )
            assert status == 200
            prefixes.add(
                headers["x-request-id"].split("-")[0]
            )  # each process numbers its requests after its own prefix
        assert len(prefixes) == 2  # both workers answered
        time.sleep(metrics.FLUSH_SECONDS * 3)
        assert answered() == before + 40  # both processes' counters, added up
        pid = int(
            subprocess.run(
                ["pgrep", "-f", "--", f"--port {url.rsplit(':', 1)[1]}"], capture_output=True, text=True
            ).stdout.split()[0]
        )
        processes = subprocess.run(["pgrep", "-s", str(os.getsid(pid))], capture_output=True, text=True).stdout.split()
        assert len(processes) >= 3  # the supervisor and two workers


def test_predict_command_answers_every_row_of_a_real_export(toy_versions, tmp_path, real_export_csv):
    rows = list(csv.DictReader(real_export_csv.open()))[:300]
    sample = tmp_path / "rows.csv"
    with sample.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    output = tmp_path / "predictions.csv"
    with running_server(toy_versions, tmp_path / "logs") as url:
        done = subprocess.run(
            [sys.executable, "-m", "babyweight_cli", "predict", "--url", url, str(sample), "--output", str(output)],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
        )
    assert output.is_file(), done.stderr
    results = list(csv.DictReader(output.open()))
    assert [int(r["row"]) for r in results] == list(range(1, 301))
    lacking = [
        number
        for number, row in enumerate(rows, start=1)
        if features.missing_required({k: v or None for k, v in row.items()})
    ]
    assert lacking, "the real export's first rows include some without gestation weeks"
    for number, (row, result) in enumerate(zip(rows, results), start=1):
        if number in lacking:
            assert result["prediction"] == "" and f"row {number}: missing required feature" in result["error"]
        else:
            instance = contract.to_instance(row)
            assert float(result["prediction"]) == pytest.approx(toy_model.expected(instance, 2.0), abs=1e-4)
            assert result["model_version"] == "2" and result["error"] == ""
    assert done.returncode == 1 and f"{300 - len(lacking)} of 300 row(s)" in done.stderr


def test_predict_command_says_when_the_server_is_not_there(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"mother_age": 30, "gestation_weeks": 39}\n')
    done = subprocess.run(
        [sys.executable, "-m", "babyweight_cli", "predict", "--url", f"http://127.0.0.1:{free_port()}", str(requests)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "error: can't reach http://127.0.0.1:" in done.stderr


def test_the_readmes_commands_make_serve_then_babyweight_predict(toy_versions, tmp_path):
    """make serve, then the installed `babyweight predict` on the bundled CSV, as docs/serving.md shows them."""
    output = tmp_path / "predictions.csv"
    with running_server(toy_versions, tmp_path / "logs", through_make=True) as url:
        done = subprocess.run(
            [
                str(PROJECT_ROOT / ".venv" / "bin" / "babyweight")
                if (PROJECT_ROOT / ".venv").is_dir()
                else "babyweight",
                "predict",
                "--url",
                url,
                "data/natality/natality.csv",
                "--output",
                str(output),
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
        )
    results = list(csv.DictReader(output.open()))
    assert len(results) == 20_000 and "predicted by version(s) 2" in done.stderr
    assert sum(1 for r in results if r["prediction"]) > 19_000


def test_on_vertex_the_log_lines_are_json_with_severity_and_request_id(toy_versions, tmp_path, capsys):
    """Cloud Logging reads a JSON line's severity and fields: the server writes them where AIP_* variables are set,
    a line about a request with its request_id."""
    import json
    import logging

    from serving.model_server import logs, settings

    port = free_port()
    env = {"AIP_HTTP_PORT": str(port), "AIP_STORAGE_URI": str(toy_versions / "1")}
    with running_server(tmp_path / "ignored", tmp_path / "logs", env=env) as url:
        assert call(url + "/v1/models/babyweight")[0] == 200
    lines = (tmp_path / f"server-{port}.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r["severity"] == "INFO" and "version 1 is available" in r["message"] for r in records), lines
    assert not [line for line in lines if " INFO version " in line], "a text line where JSON was due"
    logs.configure(settings.ServerSettings(log_format="json"))
    logging.getLogger().error("request %s failed", "abc", extra={"request_id": "abc"})
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["severity"] == "ERROR" and record["request_id"] == "abc" and record["message"] == "request abc failed"
