"""New versions under load, versions that fail to load, the version policy and labels that move."""

import concurrent.futures
import gc
import itertools
import shutil
import threading
import time

import pytest

from serving.core import manager
from serving.model_server import service, settings
from tests.serving import toy_model
from tests.serving.conftest import call, running_server
from tests.serving.model_server.test_server import LABELS_CONFIG

ROW = {"mother_age": 31, "gestation_weeks": 39}


def _statuses(url):
    return {
        v["version"]: (v["state"], v["status"]["error_message"])
        for v in call(f"{url}/v1/models/babyweight")[2]["model_version_status"]
    }


def _until(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_pushed_version_takes_over_under_load_without_an_error(tmp_path):
    models = tmp_path / "models"
    toy_model.save(models / "1", 1.0)
    staged = toy_model.save(tmp_path / "staged", 2.0)
    with running_server(models, tmp_path / "logs") as url:
        stop, answers, errors, ages = threading.Event(), [], [], itertools.count(20, 0.001)

        def client():
            while not stop.is_set():
                row = {**ROW, "father_age": float(next(ages))}  # each instance new: the model's path, not the table
                status, headers, body = call(f"{url}/v1/models/babyweight:predict", {"instances": [row]})
                if status != 200:
                    errors.append((status, body))
                    continue
                answers.append((headers["x-model-version"], body["predictions"][0][0], row))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(client)
            _until(lambda: len(answers) > 200)
            # A half-copied version first (the graph without its variables), then the rest of the copy.
            (models / "2").mkdir()
            shutil.copy(staged / "saved_model.pb", models / "2" / "saved_model.pb")
            _until(lambda: _statuses(url).get("2", ("",))[0] == "END")
            assert "can't be loaded" in _statuses(url)["2"][1]
            shutil.copytree(staged / "variables", models / "2" / "variables")
            shutil.copytree(staged / "assets.extra", models / "2" / "assets.extra")
            _until(lambda: any(version == "2" for version, _, _ in answers[-50:]))
            count = len(answers)
            _until(lambda: len(answers) > count + 200)
            stop.set()
        assert errors == []
        # Every answer is its version's own: none came from a half-loaded version or another version's table.
        for version, prediction, row in answers:
            assert prediction == pytest.approx(toy_model.expected(row, float(version)), abs=1e-5), version
        versions = [version for version, _, _ in answers]
        assert versions.index("2") > 0 and "1" not in versions[-100:]
        assert _statuses(url) == {"2": ("AVAILABLE", ""), "1": ("END", "")}  # latest 1: version 1 left


def test_a_corrupt_version_is_refused_and_the_previous_keeps_serving(tmp_path):
    models = tmp_path / "models"
    toy_model.save(models / "1", 1.0)
    with running_server(models, tmp_path / "logs") as url:
        (models / "5").mkdir()
        (models / "5" / "saved_model.pb").write_bytes(b"not a SavedModel")
        _until(lambda: _statuses(url).get("5", ("",))[0] == "END")
        assert "can't be loaded" in _statuses(url)["5"][1]
        status, headers, _ = call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})
        assert status == 200 and headers["x-model-version"] == "1"
        status, _, body = call(f"{url}/v1/models/babyweight/versions/5:predict", {"instances": [ROW]})
        assert status == 503 and "version 5 of 'babyweight' is END" in body["error"]
        shutil.rmtree(models / "5")  # the fix: push it again, whole
        toy_model.save(models / "5", 5.0)
        _until(lambda: _statuses(url).get("5", ("",))[0] == "AVAILABLE")
        assert call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})[1]["x-model-version"] == "5"


def test_nothing_loaded_yet_is_a_503_then_the_first_version_serves(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    with running_server(models, tmp_path / "logs", available=0) as url:
        status, _, body = call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})
        assert status == 503 and "no version of 'babyweight' is available yet" in body["error"]
        toy_model.save(models / "3", 3.0)
        _until(lambda: call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})[0] == 200)


def test_the_policy_and_labels_follow_the_config_file(tmp_path):
    models = tmp_path / "models"
    for version in (1, 2, 3):
        toy_model.save(models / str(version), float(version))
    config = tmp_path / "models.config"
    config.write_text(LABELS_CONFIG.format(base=models, policy="latest { num_versions: 2 }", canary=3))
    with running_server(models, tmp_path / "logs", "--model-config-file", str(config), available=2) as url:
        assert {v: s for v, (s, _) in _statuses(url).items()} == {"3": "AVAILABLE", "2": "AVAILABLE"}
        assert (
            call(f"{url}/v1/models/babyweight/labels/canary:predict", {"instances": [ROW]})[1]["x-model-version"] == "3"
        )
        status, _, body = call(f"{url}/v1/models/babyweight/labels/stable:predict", {"instances": [ROW]})
        assert (
            status == 404 and "label 'stable' points to version 1, which is not served (serving: 3, 2)" in body["error"]
        )
        # The operator moves the labels and pins versions, without a restart.
        config.write_text(LABELS_CONFIG.format(base=models, policy="specific { versions: 1 versions: 2 }", canary=2))
        _until(
            lambda: (
                {v: s for v, (s, _) in _statuses(url).items() if s == "AVAILABLE"}
                == {"2": "AVAILABLE", "1": "AVAILABLE"}
            )
        )
        assert (
            call(f"{url}/v1/models/babyweight/labels/stable:predict", {"instances": [ROW]})[1]["x-model-version"] == "1"
        )
        assert (
            call(f"{url}/v1/models/babyweight/labels/canary:predict", {"instances": [ROW]})[1]["x-model-version"] == "2"
        )


def test_pushed_versions_leave_nothing_frozen_behind(tmp_path):
    """After a poll that loaded or unloaded, the server collects and freezes what is live (service.settle_memory), once
    a push (one full collection's pause, not one for the load and one for the unload). A version that left is
    garbage in reference cycles (its SavedModel's graphs): frozen, it would never be freed (about 2,200 objects a
    push of this toy model, 54 MiB a push of the real one)."""

    models = tmp_path / "models"
    settled = []
    versions = manager.Manager(
        settings.ServerSettings(model_dir=str(models)),
        str(models),
        on_change=lambda: (settled.append(1), service.settle_memory()),
    )
    frozen = []
    try:
        for number in range(1, 6):
            toy_model.save(models / str(number), float(number))
            versions.poll_once()  # the new version loads, the one before it leaves
            assert sorted(versions.available) == [number]
            frozen.append(gc.get_freeze_count())
    finally:
        gc.unfreeze()
    assert frozen[-1] - frozen[0] < 100, frozen
    assert len(settled) == 5
    versions.poll_once()  # nothing changed: no pause
    assert len(settled) == 5


def test_the_model_folder_gone_for_a_while_is_counted_and_the_loaded_version_keeps_serving(tmp_path):
    from tests.serving.model_server.test_server import _metric

    models = tmp_path / "models"
    toy_model.save(models / "1", 1.0)
    with running_server(models, tmp_path / "logs") as url:
        models.rename(tmp_path / "away")  # a volume or bucket not mounted for a while
        _until(lambda: _metric(url, "babyweight_model_storage_errors_total") >= 2)
        status, headers, _ = call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})
        assert status == 200 and headers["x-model-version"] == "1"
        (tmp_path / "away").rename(models)
        toy_model.save(models / "2", 2.0)
        _until(lambda: call(f"{url}/v1/models/babyweight:predict", {"instances": [ROW]})[1]["x-model-version"] == "2")
