"""`babyweight metadata`: read back a real run's store, and a MySQL-compatible server written by TFX."""

import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
from tfx import v1 as tfx

from data import generator
from pipeline import config as config_lib
from pipeline.metadata import metadata_cli
from pipeline.pipeline import example_gen_component
from tests.conftest import skip_or_fail_in_ci

pytestmark = pytest.mark.slow


def _cli(capsys, *args):
    code = metadata_cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(capsys, store, *args):
    code, out, err = _cli(capsys, "--store", store, "--json", *args)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def store(pipeline_runs):
    return pipeline_runs["config"].metadata_path


def test_runs_lists_each_run_with_status_and_cached_steps(capsys, store, pipeline_runs):
    runs = _json(capsys, store, "runs")
    assert [r["status"] for r in runs] == ["complete", "failed", "complete"]
    assert runs[0]["cached"] == 0 and runs[2]["cached"] >= 7
    code, out, _ = _cli(capsys, "--store", store, "runs")
    assert code == 0 and out.splitlines()[0].split() == ["run", "status", "started", "seconds", "steps", "cached"]


def test_run_names_each_step_its_state_and_output_uris(capsys, store):
    steps = {s["step"]: s for s in _json(capsys, store, "run", "-3")}
    assert steps["CsvExampleGen"]["state"] == "complete"
    assert "/pipeline/Trainer/model/" in {o["key"]: o for o in steps["Trainer"]["outputs"]}["model"]["uri"]
    assert "transform_graph" in {o["key"] for o in steps["Transform"]["outputs"]}
    failed = {s["step"]: s["state"] for s in _json(capsys, store, "run", "-2")}
    assert failed["DataGate"] == "failed"


def test_artifacts_filter_by_type_and_run(capsys, store):
    models = _json(capsys, store, "artifacts", "--type", "Model")
    assert len(models) == 1 and models[0]["producer"] == "Trainer"
    pushed = _json(capsys, store, "artifacts", "--type", "PushedModel")
    assert all(p["properties"]["pushed"] == 1 for p in pushed) and pushed
    in_first_run = {a["type"] for a in _json(capsys, store, "artifacts", "--run", "-3")}
    assert {"Examples", "ExampleStatistics", "Schema", "TransformGraph", "Model", "ModelEvaluation"} <= in_first_run


def test_lineage_of_the_pushed_model_reaches_the_examples(capsys, store):
    lineage = _json(capsys, store, "lineage")
    assert lineage["artifact"]["type"] == "PushedModel"
    upstream = {(a["type"], a["producer"]) for a in lineage["upstream"]}
    assert {
        ("Model", "Trainer"),
        ("ModelBlessing", "Evaluator"),
        ("InfraBlessing", "InfraValidator"),
        ("TransformGraph", "Transform"),
        ("Schema", "ImportSchemaGen"),
        ("Examples", "CsvExampleGen"),
        ("ExampleAnomalies", "DataValidator"),
        ("ExampleStatistics", "StatisticsGen"),
    } <= upstream


def test_the_tflite_models_lineage_reaches_the_model_and_its_push_and_show_prints_their_checks(capsys, store):
    exported = [a for a in _json(capsys, store, "artifacts") if a["type"] == "babyweight.TFLiteModel"]
    assert exported and exported[-1]["properties"]["pushed"] == 1
    lineage = _json(capsys, store, "lineage", str(exported[-1]["id"]))
    upstream = {(a["type"], a["producer"]) for a in lineage["upstream"]}
    assert {("Model", "Trainer"), ("PushedModel", "Pusher"), ("Examples", "CsvExampleGen")} <= upstream
    assert metadata_cli.main(["--store", store, "show", str(exported[-1]["id"])]) == 0
    shown = capsys.readouterr().out
    assert "TFLite: babyweight.tflite" in shown and re.search(r"^    float16  ok     RMSE ", shown, re.M), shown


def test_show_summarises_statistics_evaluation_and_anomalies(capsys, store):
    artifacts = _json(capsys, store, "artifacts")
    by_type = {}
    for artifact in artifacts:
        by_type.setdefault(artifact["type"], []).append(artifact["id"])
    statistics = _json(capsys, store, "show", str(by_type["ExampleStatistics"][0]))["content"]
    assert statistics["train"]["examples"] + statistics["eval"]["examples"] == 6_000
    assert 6.5 < statistics["train"]["features"]["weight_pounds"]["mean"] < 8
    assert statistics["train"]["features"]["is_male"]["top"][0] in ("true", "false")
    evaluation = _json(capsys, store, "show", str(by_type["ModelEvaluation"][0]))["content"]
    assert evaluation["validation_ok"] and evaluation["blessed"]
    assert evaluation["metrics"]["overall"]["root_mean_squared_error"] < 1.2
    assert evaluation["thresholds"]["root_mean_squared_error"][0]["value_threshold"]["upper_bound"] == 1.2
    anomalies = [_json(capsys, store, "show", str(i))["content"] for i in by_type["ExampleAnomalies"]]
    assert any(any("is_male" in line for line in found["anomalies"]) for found in anomalies)
    assert {len(found["questions"]) for found in anomalies} == {6}
    predictions = _json(capsys, store, "show", str(by_type["babyweight.PredictionStatistics"][0]))["content"]
    assert 6 < predictions["mean"] < 8.5 and predictions["residuals"]["overall"]["n"] > 0
    infra = _json(capsys, store, "show", str(by_type["InfraBlessing"][0]))["content"]
    assert infra["blessed"] and [c["name"] for c in infra["checks"]] == ["load", "answers", "memory", "latency"]
    assert 0 < infra["figures"]["p99_ms"] < infra["budget"]["max_p99_ms"]
    assert metadata_cli.main(["--store", store, "show", str(by_type["InfraBlessing"][0])]) == 0
    printed = capsys.readouterr().out
    config = config_lib.load_config()
    assert re.search(
        rf"^  memory +ok +peak \d+ MiB resident \(budget {config.infra_max_memory_mb:g} MiB\)$", printed, re.M
    ), printed
    assert (
        f"budget: {config.infra_max_memory_mb:g} MiB, p99 {config.infra_max_p99_ms:g} ms, "
        f"load within {config.infra_load_timeout_seconds:g} s"
    ) in printed


def test_diff_of_a_run_and_its_cached_rerun_reports_the_cached_steps(capsys, store):
    diff = _json(capsys, store, "diff", "-3", "-1")
    states = {s["step"]: (s["a"], s["b"], s["same_outputs"]) for s in diff["steps"]}
    assert states["Trainer"] == ("complete", "cached", True)
    assert states["Transform"] == ("complete", "cached", True)
    assert diff["numbers"]["train examples"]["a"] == diff["numbers"]["train examples"]["b"]
    code, out, _ = _cli(capsys, "--store", store, "diff", "-3", "-1")
    assert code == 0 and "cached" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--store", "/nowhere/metadata.sqlite", "runs"], "no ML Metadata store at /nowhere/metadata.sqlite"),
        (["run", "2020-01-01T00:00:00"], "unknown run '2020-01-01T00:00:00'; runs: "),
        (["show", "99999"], "unknown artifact '99999'; the store has artifacts 1-"),
        (["artifacts", "--type", "Modle"], "no artifacts of type 'Modle'; types: "),
    ],
)
def test_errors_are_one_line_saying_what_exists(capsys, store, args, message):
    if args[0] != "--store":
        args = ["--store", store] + args
    code, out, err = _cli(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1


def test_empty_store_says_so(capsys, tmp_path):
    from ml_metadata import metadata_store

    path = str(tmp_path / "empty.sqlite")
    metadata_store.MetadataStore(tfx.orchestration.metadata.sqlite_metadata_connection_config(path))
    code, _, err = _cli(capsys, "--store", path, "runs")
    assert code == 1 and "has no pipeline runs yet" in err


@pytest.fixture(scope="module")
def mysql_server(tmp_path_factory):
    """A private MariaDB server on a free loopback port (make test installs mariadb-server)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"
    server = shutil.which("mariadbd", path=path) or shutil.which("mysqld", path=path)
    install = shutil.which("mariadb-install-db", path=path)
    if not server or not install:
        skip_or_fail_in_ci("mariadb-server is not installed (make test installs it where apt-get works)")
    root = tmp_path_factory.mktemp("mariadb")
    subprocess.run(
        [install, f"--datadir={root / 'data'}", "--user=root", "--auth-root-authentication-method=normal"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for _ in range(3):  # another process may take the free port between the probe and the server's bind
        process, port = _start_mariadb(server, root)
        if process is not None:
            break
    else:
        pytest.fail(f"MariaDB did not start: {(root / 'error.log').read_text()[-2000:]}")
    yield port
    process.terminate()
    process.wait(timeout=30)


def _start_mariadb(server: str, root) -> tuple:
    """The server process and its port once it accepts connections; (None, port) if it exited."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            server,
            f"--datadir={root / 'data'}",
            f"--socket={root / 'mysqld.sock'}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            "--user=root",
            "--skip-grant-tables",
            f"--pid-file={root / 'mysqld.pid'}",
            f"--log-error={root / 'error.log'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            return None, port
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.5)
    process.kill()
    process.wait(timeout=30)
    pytest.fail(f"MariaDB did not accept connections within 60 s: {(root / 'error.log').read_text()[-2000:]}")


def test_a_pipeline_writes_to_mysql_and_the_command_reads_it_back(capsys, tmp_path, mysql_server):
    generator.write(300, 4, tmp_path / "data")
    config = config_lib.load_config(overrides={"data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path)})
    connection = tfx.orchestration.metadata.mysql_metadata_connection_config(
        host="127.0.0.1", port=mysql_server, database="mlmd", username="root", password=""
    )
    example_gen = example_gen_component(config)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    tfx.orchestration.LocalDagRunner().run(
        tfx.dsl.Pipeline(
            pipeline_name="babyweight-mysql",
            pipeline_root=str(tmp_path / "root"),
            components=[example_gen, statistics_gen],
            metadata_connection_config=connection,
            beam_pipeline_args=config.beam_pipeline_args(),
        )
    )
    # The password as a user gives it, in a file (the test server skips grant checks, so any password opens it).
    (tmp_path / "mysql-password").write_text("not-on-the-command-line\n")
    mysql = [
        "--mysql-host",
        "127.0.0.1",
        "--mysql-port",
        str(mysql_server),
        "--mysql-user",
        "root",
        "--mysql-password-file",
        str(tmp_path / "mysql-password"),
        "--mysql-database",
        "mlmd",
        "--json",
    ]
    code, out, err = _cli(capsys, *mysql, "runs")
    assert code == 0, err
    assert [run["status"] for run in json.loads(out)] == ["complete"]
    code, out, err = _cli(capsys, *mysql, "run", "-1")
    assert code == 0, err
    assert [step["step"] for step in json.loads(out)] == ["CsvExampleGen", "StatisticsGen"]
