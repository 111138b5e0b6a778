"""The `babyweight` command as people use it: flags in either place, no TensorFlow where none is needed, nothing
on the console but the answer, every command listed."""
import json
import os
import subprocess
import sys

import pytest

import babyweight_cli
from pipeline import metadata_cli, mlmd

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The installed command's environment: none of the variables the make targets set.
BARE_ENV = {key: value for key, value in os.environ.items()
            if key not in ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS", "PYTHONWARNINGS")}


def babyweight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "babyweight_cli", *args], cwd=PROJECT_ROOT, env=BARE_ENV,
                          capture_output=True, text=True)


@pytest.mark.parametrize("args", [
    ["--store", "S.sqlite", "--json", "runs"],
    ["runs", "--store", "S.sqlite", "--json"],
    ["--json", "runs", "--store", "S.sqlite"],
])
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


def test_the_metadata_command_does_not_load_tensorflow(tmp_path):
    probe = ("import sys, babyweight_cli\n"
             f"babyweight_cli.main(['metadata', 'runs', '--store', {str(tmp_path / 'none.sqlite')!r}])\n"
             "print(sorted(m for m in ('tensorflow', 'tfx', 'apache_beam', 'keras_tuner') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=BARE_ENV, capture_output=True,
                          text=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_a_command_that_loads_tensorflow_keeps_its_start_up_lines_off_the_console():
    done = babyweight("validate-serving", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: babyweight validate-serving")
    assert done.stderr == ""  # without the quiet import: CUDA plugin registrations, a FutureWarning, ...
    probe = ("import sys, babyweight_cli\nbabyweight_cli.quiet_environment()\n"
             "sys.meta_path.insert(0, babyweight_cli.QuietTensorFlowImport())\n"
             "import tensorflow as tf\nprint(tf.__loader__.__class__.__name__, tf.constant(2).numpy())")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=BARE_ENV, capture_output=True,
                          text=True)
    assert done.stdout.split() == ["SourceFileLoader", "2"] and done.stderr == ""


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


def test_every_example_is_a_command_line_its_command_accepts():
    for name, command in babyweight_cli.COMMANDS.items():
        done = babyweight(*command.example.split()[1:2], "--help")
        assert done.returncode == 0 and done.stderr == "", (name, done.stderr)
    # Their arguments parse too (the parsers that don't need a model or data to build).
    metadata_cli.build_parser().parse_args(babyweight_cli.COMMANDS["metadata"].example.split()[2:])


def test_a_run_marked_by_a_process_that_is_gone_reads_as_interrupted(tmp_path):
    store = str(tmp_path / "metadata.sqlite")
    assert mlmd.runner_alive(store) is False  # no marker
    with mlmd.runner_marker(store):
        assert mlmd.runner_alive(store) is True
        marker = json.loads((tmp_path / mlmd.RUNNER_FILE).read_text())
        assert marker["pid"] == os.getpid()
    assert not (tmp_path / mlmd.RUNNER_FILE).exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / mlmd.RUNNER_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host": marker["host"]}))
    assert mlmd.runner_alive(store) is False
    (tmp_path / mlmd.RUNNER_FILE).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    assert mlmd.runner_alive(store) is None  # can't tell


@pytest.mark.slow
def test_make_bench_prints_its_table_alone_and_logs_the_rest():
    done = subprocess.run([sys.executable, "-m", "pipeline.bench", "--rows", "2000"], cwd=PROJECT_ROOT, env=BARE_ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # TensorFlow's start-up lines, the TFLite converter's notes, Beam's warnings: the log
    lines = done.stdout.splitlines()
    assert lines[0] == "generated 2000 rows in " + lines[0].split(" in ")[1] and "run ok: True" in lines[2]
    table = [line.split() for line in lines[4:] if line.split()[1:2] in (["complete"], ["cached"])]
    assert {row[0] for row in table} >= {"CsvExampleGen", "Transform", "Trainer", "Evaluator", "TFLiteExporter"}
    log = lines[-1].removeprefix("log: ")
    assert "TFLite converter" in open(log).read()
