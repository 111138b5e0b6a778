"""`babyweight serve`'s start: how many workers by default, and the folder of the workers' counters."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from serving.model_server import server
from serving.model_server import settings as settings_lib


@pytest.fixture(autouse=True)
def server_environment(monkeypatch):
    """server.run sets these for its workers: put back after each test."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "unset")
    monkeypatch.setenv(settings_lib.ENV_SETTINGS, "{}")
    monkeypatch.delenv(settings_lib.FEEDBACK_TOKEN_ENV, raising=False)  # the shell's must not reach the tests


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2: docker run --cpus 1.5
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "300000 100000\n", "a/b/cpu.max": "max 100000\n", "a/cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_s_cpu_quota_is_read_as_a_container_sets_it(tmp_path, monkeypatch, files, quota):
    """The smallest quota from the process's own cgroup (here /a/b) up to the root binds."""
    real_read = pathlib.Path.read_text
    monkeypatch.setattr(
        pathlib.Path,
        "read_text",
        lambda path, *args, **kwargs: (
            "0::/a/b\n" if str(path) == "/proc/self/cgroup" else real_read(path, *args, **kwargs)
        ),
    )
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert settings_lib.cgroup_cpu_quota(str(tmp_path)) == quota


def test_workers_default_to_the_cpus_the_process_may_use_not_the_host_s(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)  # taskset
    assert settings_lib.usable_cpus(str(tmp_path)) == 8
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU container
    assert settings_lib.usable_cpus(str(tmp_path)) == 2
    started = {}
    monkeypatch.setattr(settings_lib, "usable_cpus", lambda: 2)
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: started.update(kwargs))
    server.run(settings_lib.ServerSettings(grpc_port=0))
    assert started["workers"] == 2


def test_the_metrics_dir_given_keeps_what_it_holds(tmp_path, monkeypatch):
    """The workers' counters go to a folder made inside --metrics-dir; only that folder is removed at exit."""
    given = tmp_path / "outputs"
    (given / "serving_model" / "1").mkdir(parents=True)
    (given / "metadata.sqlite").write_text("ML Metadata")
    seen = {}

    def uvicorn_run(*args, **kwargs):
        seen["folder"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        assert os.path.isdir(seen["folder"]) and not os.listdir(seen["folder"])  # fresh: no earlier server's counts
        open(os.path.join(seen["folder"], "counter_1.db"), "w").close()

    monkeypatch.setattr("uvicorn.run", uvicorn_run)
    server.run(settings_lib.ServerSettings(metrics_dir=str(given), workers=1, grpc_port=0))
    assert os.path.dirname(seen["folder"]) == str(given)
    assert not os.path.exists(seen["folder"])
    assert sorted(path.name for path in given.iterdir()) == ["metadata.sqlite", "serving_model"]
    assert (given / "serving_model" / "1").is_dir()


def test_a_killed_servers_metrics_folder_is_removed_at_the_next_start_and_a_live_ones_kept(tmp_path, monkeypatch):
    """A SIGKILLed server leaves its counters' folder: the next start removes it (a live server's stays)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"babyweight-metrics-{dead.pid}-abc123"
    live = tmp_path / f"babyweight-metrics-{os.getppid()}-def456"
    other = tmp_path / "babyweight-metrics-notes"
    absurd = tmp_path / ("babyweight-metrics-" + "9" * 30 + "-x")  # anyone may make one in /tmp: no crash
    for folder in (left, live, other, absurd):
        folder.mkdir()
        (folder / "counter_1.db").write_text("")
    foreign = tmp_path / f"babyweight-metrics-{dead.pid}-def789"  # a dead server of another user: theirs
    foreign.mkdir()
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    server.run(settings_lib.ServerSettings(metrics_dir=str(tmp_path), workers=1, grpc_port=0))
    assert not left.exists() and not absurd.exists() and live.is_dir() and other.is_dir()
    assert foreign.is_dir() or os.geteuid() != 0


def test_the_feedback_token_comes_from_a_file_or_the_environment_never_a_flag(tmp_path):
    token = "s3cret-token-of-32-characters-xx"
    assert settings_lib.feedback_token(settings_lib.ServerSettings(), {}) is None  # feedback off
    environ = {settings_lib.FEEDBACK_TOKEN_ENV: token + "\n"}
    assert settings_lib.feedback_token(settings_lib.ServerSettings(), environ) == token
    (tmp_path / "token").write_text(token + "\n")
    from_file = settings_lib.ServerSettings(feedback_token_file=str(tmp_path / "token"))
    assert (
        settings_lib.feedback_token(from_file, {settings_lib.FEEDBACK_TOKEN_ENV: "another-token-0123456789"}) == token
    )
    assert not [field for field in dataclasses.fields(settings_lib.ServerSettings) if field.name == "feedback_token"]
    with pytest.raises(settings_lib.SettingsError, match=r"--feedback-token-file .*missing: can't read it"):
        settings_lib.feedback_token(settings_lib.ServerSettings(feedback_token_file=str(tmp_path / "missing")), {})
    with pytest.raises(settings_lib.SettingsError, match="BABYWEIGHT_FEEDBACK_TOKEN: the token must be at least 16"):
        settings_lib.feedback_token(settings_lib.ServerSettings(), {settings_lib.FEEDBACK_TOKEN_ENV: "short"})


def test_serve_with_an_unreadable_token_file_stops_before_starting_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: pytest.fail("started"))
    assert server.main(["--feedback-token-file", str(tmp_path / "missing")]) == 2
    assert "babyweight serve: --feedback-token-file" in capsys.readouterr().err


def test_true_false_flags_and_the_grpc_port_and_log_format_are_checked(capsys):
    """--prefer-tflite-model takes true or false (as TF Serving's flags), not any word; a port or log format the
    server can't use stops the start naming it; on Vertex the logs are JSON."""
    assert settings_lib.parse([]).prefer_tflite_model is True and settings_lib.parse([]).grpc_port == 8500
    assert settings_lib.parse(["--prefer-tflite-model", "false"]).prefer_tflite_model is False
    assert settings_lib.parse(["--grpc-port", "0"]).grpc_port == 0
    for argv, message in (
        (["--prefer-tflite-model", "maybe"], "expected true or false, not 'maybe'"),
        (["--grpc-port", "70000"], "--grpc-port must be a port number"),
        (["--log-format", "xml"], "--log-format must be text or json"),
        (["--grpc-port", "8501"], "--grpc-port 8501 is the REST port"),
    ):
        with pytest.raises(SystemExit):
            settings_lib.parse(argv)
        assert message in capsys.readouterr().err
    vertex = settings_lib.with_vertex_environment(settings_lib.ServerSettings(), {"AIP_HTTP_PORT": "8080"})
    assert vertex.log_format == "json" and vertex.port == 8080
