"""The `babyweight` command as people use it: flags in either place, no TensorFlow where none is needed, nothing
on the console but the answer, every command listed."""

import json
import os
import subprocess
import sys

import pytest

import babyweight_cli
from pipeline.metadata import metadata_cli, mlmd

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The installed command's environment: none of the variables the make targets set.
BARE_ENV = {
    key: value
    for key, value in os.environ.items()
    if key not in ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS", "PYTHONWARNINGS")
}


def babyweight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "babyweight_cli", *args], cwd=PROJECT_ROOT, env=BARE_ENV, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--store", "S.sqlite", "--json", "runs"],
        ["runs", "--store", "S.sqlite", "--json"],
        ["--json", "runs", "--store", "S.sqlite"],
        ["--store", "other.sqlite", "runs", "--store", "S.sqlite", "--json"],  # the later one counts
    ],
)
def test_the_store_and_output_flags_go_before_or_after_the_subcommand(args):
    parsed = metadata_cli.build_parser().parse_args(args)
    assert (parsed.command, parsed.store, parsed.json, parsed.mysql_port) == ("runs", "S.sqlite", True, 3306)


def test_a_flag_after_the_subcommand_is_the_one_used(tmp_path):
    missing = tmp_path / "elsewhere.sqlite"
    done = babyweight("metadata", "runs", "--store", str(missing))
    assert done.returncode == 1
    # One line: the answer, naming the store given after the subcommand; no library's start-up lines.
    assert done.stderr == f"error: no ML Metadata store at {missing} (make run writes one; or pass --store PATH)\n"
    assert done.stdout == ""


def test_the_mysql_password_comes_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch, capsys):
    """A flag's value shows in `ps` to every user of the machine: the password is read from a file or from
    BABYWEIGHT_MYSQL_PASSWORD, and a --mysql-password is refused without repeating it."""
    passwords = []

    def store(config):
        passwords.append(config.mysql.password)
        raise RuntimeError("no server here")

    monkeypatch.setattr(metadata_cli.metadata_store, "MetadataStore", store)
    monkeypatch.delenv("BABYWEIGHT_MYSQL_PASSWORD", raising=False)
    secret = tmp_path / "mysql-password"
    secret.write_text("s3cret word\n")  # the line end an editor adds is no part of it
    host = ["--mysql-host", "127.0.0.1"]
    assert metadata_cli.main(host + ["runs", "--mysql-password-file", str(secret)]) == 1
    assert "can't open the ML Metadata store at MySQL 127.0.0.1:3306/mlmd" in capsys.readouterr().err
    monkeypatch.setenv("BABYWEIGHT_MYSQL_PASSWORD", "from the environment")
    assert metadata_cli.main(host + ["runs"]) == 1
    assert metadata_cli.main(host + ["--mysql-password-file", str(secret), "runs"]) == 1  # the file wins
    assert passwords == ["s3cret word", "from the environment", "s3cret word"]
    capsys.readouterr()
    for unreadable, why in ((tmp_path / "missing", "No such file or directory"), (tmp_path, "Is a directory")):
        assert metadata_cli.main(host + ["--mysql-password-file", str(unreadable), "runs"]) == 1
        assert capsys.readouterr().err == f"error: --mysql-password-file {unreadable}: can't read it: {why}\n"
    (tmp_path / "empty").write_text("\n")
    assert metadata_cli.main(host + ["--mysql-password-file", str(tmp_path / "empty"), "runs"]) == 1
    assert capsys.readouterr().err == f"error: --mysql-password-file {tmp_path / 'empty'}: the file is empty\n"
    assert len(passwords) == 3  # none of these connected
    for given in (["--mysql-password", "hunter2"], ["--mysql-password=hunter2"]):
        assert metadata_cli.main(host + given + ["runs"]) == 2
        err = capsys.readouterr().err
        assert "--mysql-password-file" in err and "BABYWEIGHT_MYSQL_PASSWORD" in err and "hunter2" not in err
    assert "--mysql-password " not in metadata_cli.build_parser().format_help()
    with pytest.raises(SystemExit):  # no abbreviation of --mysql-password-file takes a password either
        metadata_cli.build_parser().parse_args(["--mysql-pass", "hunter2", "runs"])


def _store_with_a_run(path) -> str:
    """An ML Metadata store as TFX leaves a run killed in its Trainer: one run, its Trainer RUNNING."""
    from ml_metadata import metadata_store
    from ml_metadata.proto import metadata_store_pb2 as pb

    connection = pb.ConnectionConfig()
    connection.sqlite.filename_uri = str(path)
    connection.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    store = metadata_store.MetadataStore(connection)
    run_type = store.put_context_type(pb.ContextType(name="pipeline_run"))
    node_type = store.put_context_type(pb.ContextType(name="node"))
    trainer_type = store.put_execution_type(pb.ExecutionType(name="tfx.components.trainer.component.Trainer"))
    [run, node] = store.put_contexts(
        [
            pb.Context(type_id=run_type, name="2026-11-29T20:00:00.000000"),
            pb.Context(type_id=node_type, name="babyweight.Trainer"),
        ]
    )
    [execution] = store.put_executions([pb.Execution(type_id=trainer_type, last_known_state=pb.Execution.RUNNING)])
    store.put_attributions_and_associations(
        [],
        [
            pb.Association(context_id=run, execution_id=execution),
            pb.Association(context_id=node, execution_id=execution),
        ],
    )
    return str(path)


def test_the_metadata_command_does_not_load_tensorflow_and_prints_only_its_answer(tmp_path):
    store = _store_with_a_run(tmp_path / "metadata.sqlite")
    probe = (
        "import sys, babyweight_cli\n"
        "for args in (['runs'], ['run', '-1'], ['artifacts'], ['runs', '--json']):\n"
        f"    babyweight_cli.main(['metadata', *args, '--store', {store!r}])\n"
        "print(sorted(m for m in ('tensorflow', 'tfx', 'apache_beam', 'keras_tuner') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=BARE_ENV, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    assert lines[-1] == "[]" and done.stderr == "", done.stdout + done.stderr
    assert lines[0].split() == ["run", "status", "started", "seconds", "steps", "cached"]
    assert lines[1].split()[:2] == ["2026-11-29T20:00:00.000000", "interrupted"]  # no process runs it
    assert any(line.startswith("interrupted in Trainer: no process is running this run") for line in lines)


@pytest.mark.slow
def test_a_command_that_loads_tensorflow_keeps_its_start_up_lines_off_the_console():
    done = babyweight("validate-serving", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: babyweight validate-serving")
    assert done.stderr == ""  # without the quiet import: CUDA plugin registrations, a FutureWarning, ...
    probe = (
        "import sys, babyweight_cli\nbabyweight_cli.quiet_environment()\n"
        "sys.meta_path.insert(0, babyweight_cli.QuietTensorFlowImport())\n"
        "import tensorflow as tf\nprint(tf.__loader__.__class__.__name__, tf.constant(2).numpy())"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=BARE_ENV, capture_output=True, text=True)
    assert done.stdout.split() == ["SourceFileLoader", "2"] and done.stderr == ""


@pytest.mark.slow
def test_runner_local_as_the_design_card_runs_it_keeps_tensorflow_s_start_up_lines_off_the_console(tmp_path):
    """`python runner_local.py` without the make targets' variables: TensorFlow is imported (the run's modules), and
    only the summary of a run stopped by its input reaches the console."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "births.csv").write_text("mother_age,gestation_weeks\n")
    done = subprocess.run(
        [
            sys.executable,
            "runner_local.py",
            "--data-dir",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        cwd=PROJECT_ROOT,
        env=BARE_ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "the file has a header but no rows" in done.stdout, done.stdout
    assert done.stderr == "", done.stderr  # without the quiet import: "Unable to register cuDNN factory", ...


def test_help_lists_every_command_with_an_example_and_version_names_tfx(capsys):
    for args in ([], ["--help"]):
        assert babyweight_cli.main(args) == 0
        listing = capsys.readouterr().out
        for name, command in babyweight_cli.COMMANDS.items():
            assert f"  {name:<17} {command.summary}" in listing
            assert f"e.g. {command.example}" in listing and command.example.startswith(f"babyweight {name} ")
    assert babyweight_cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
    assert babyweight_cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("babyweight 0.1.0 (TFX 1.16.0, TensorFlow 2.16")


@pytest.mark.slow
def test_every_example_is_a_command_line_its_command_accepts():
    for name, command in babyweight_cli.COMMANDS.items():
        done = babyweight(*command.example.split()[1:2], "--help")
        assert done.returncode == 0 and done.stderr == "", (name, done.stderr)
    # Their arguments parse too (the parsers that don't need a model or data to build).
    metadata_cli.build_parser().parse_args(babyweight_cli.COMMANDS["metadata"].example.split()[2:])


def test_a_run_is_alive_while_a_process_holds_the_store_s_runner_lock(tmp_path):
    store = str(tmp_path / "metadata.sqlite")
    assert mlmd.runner_alive(store) is False  # no run ever marked it
    with mlmd.runner_marker(store), mlmd.runner_marker(store):  # two runs at once share the lock
        assert mlmd.runner_alive(store) is True
    assert mlmd.runner_alive(store) is False
    # A process holding it, then killed outright: the system drops its lock.
    hold = (
        f"import time\nfrom pipeline.metadata import mlmd\nwith mlmd.runner_marker({store!r}):\n"
        "    print('held', flush=True)\n    time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert mlmd.runner_alive(store) is True
    finally:
        holder.kill()
        holder.wait()
    assert mlmd.runner_alive(store) is False


@pytest.mark.slow
def test_make_bench_prints_its_table_alone_and_logs_the_rest(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.commands.bench", "--rows", "2000"],
        cwd=PROJECT_ROOT,
        env=dict(BARE_ENV, BABYWEIGHT_OUTPUT_DIR=str(tmp_path)),  # its log and figures, not the project's outputs/
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # TensorFlow's start-up lines, the TFLite converter's notes, Beam's warnings: the log
    lines = done.stdout.splitlines()
    assert lines[0] == "generated 2000 rows in " + lines[0].split(" in ")[1] and "run ok: True" in lines[2]
    table = [line.split() for line in lines[4:] if line.split()[1:2] in (["complete"], ["cached"])]
    assert {row[0] for row in table} >= {"CsvExampleGen", "Transform", "Trainer", "Evaluator", "TFLiteExporter"}
    assert lines[-1] == f"log: {tmp_path / 'bench.log'}"
    log = lines[-1].removeprefix("log: ")
    assert "TFLite converter" in open(log).read()
    record = json.loads(open(lines[-2].removeprefix("written: ")).read())  # the same figures, as JSON
    steps = {step["step"]: step for step in record["steps"]}
    assert steps["CsvExampleGen"]["rows"] == 2000 and steps["CsvExampleGen"]["rows_per_second"] > 0
    assert steps["Evaluator"]["rows"] == record["rows_per_split"]["eval"] > 0
    assert record["trainer_fit"]["examples"] >= 1500 * 256  # min_train_steps batches of batch_size
    assert f"{steps['Trainer']['seconds']:8.1f}" in "\n".join(lines)


@pytest.mark.slow
def test_the_server_s_worker_processes_keep_tensorflow_s_start_up_lines_off_the_console(tmp_path):
    from tests.serving import toy_model
    from tests.serving.conftest import running_server

    toy_model.save(tmp_path / "models" / "1", 1.0)
    with running_server(tmp_path / "models", tmp_path / "logs", "--workers", "2"):
        pass
    [console] = tmp_path.glob("server-*.log")
    text = console.read_text()
    assert "Unable to register" not in text and "FutureWarning" not in text and "cpu_feature_guard" not in text, text
