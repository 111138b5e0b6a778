"""Versions on storage other than the local disk: everything goes through tf.io.gfile (gs:// in the cloud).

TensorFlow's in-memory file system (ram://) stands in for Cloud Storage here: no network is needed.
"""

import os
import time

import pytest
import tensorflow as tf

from models import features
from serving.core import manager
from serving.model_server import settings
from tests.serving import toy_model


def _copy(source: str, target: str) -> None:
    for folder, _, files in tf.io.gfile.walk(source):
        relative = os.path.relpath(folder, source)
        destination = target if relative == "." else f"{target}/{relative}"
        tf.io.gfile.makedirs(destination)
        for name in files:
            tf.io.gfile.copy(os.path.join(folder, name), f"{destination}/{name}", overwrite=True)


def test_the_manager_finds_loads_and_serves_versions_from_a_non_local_path(tmp_path):
    base = "ram://babyweight-test/serving_model"
    for version in (4, 5):
        _copy(str(toy_model.save(tmp_path / str(version), float(version))), f"{base}/{version}")
    assert manager.list_versions(base) == {4: f"{base}/4", 5: f"{base}/5"}
    versions = manager.Manager(settings.ServerSettings(model_dir=base), base)
    versions.poll_once()
    handle = versions.resolve()
    assert handle.version == 5 and handle.table.head_size == 2  # the head file read from there too
    row = {"mother_age": 31, "gestation_weeks": 39}
    assert handle.predict_keys([features.instance_key(row)])[0] == pytest.approx(toy_model.expected(row, 5.0))
    # One version's folder given directly, as Vertex's AIP_STORAGE_URI is.
    assert manager.list_versions(f"{base}/4") == {4: f"{base}/4"}


def test_a_folder_that_can_t_be_listed_or_is_gone_keeps_the_loaded_version(tmp_path, monkeypatch):
    """tf.io.gfile.isdir says False on any error: a hiccup must not read as "no versions" and unload them all."""
    models = tmp_path / "models"
    toy_model.save(models / "1", 1.0)
    versions = manager.Manager(settings.ServerSettings(model_dir=str(models)), str(models))
    versions.poll_once()
    assert sorted(versions.available) == [1]

    def denied(path):
        raise tf.errors.PermissionDeniedError(None, None, f"{path}: permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(tf.io.gfile, "listdir", denied)
        with pytest.raises(manager.StorageError, match=r"can't list the model folder .*models: .*permission denied"):
            versions.poll_once()
        assert sorted(versions.available) == [1] and versions.resolve().version == 1
    models.rename(tmp_path / "away")  # a bucket or volume not mounted
    with pytest.raises(manager.StorageError, match=r"no version found under .*models; still serving \[1\]"):
        versions.poll_once()
    (tmp_path / "away").rename(models)
    toy_model.save(models / "2", 2.0)  # storage back, with a new version: it takes over as before
    versions.poll_once()
    assert sorted(versions.available) == [2]


def test_failed_polls_back_off_to_a_bound_and_are_counted(tmp_path, monkeypatch):
    models = tmp_path / "models"
    toy_model.save(models / "1", 1.0)
    failed = []
    versions = manager.Manager(
        settings.ServerSettings(model_dir=str(models), poll_seconds=0.01),
        str(models),
        on_storage_error=lambda: failed.append(1),
    )
    assert [versions.backoff(n) for n in (0, 1, 3)] == [0.01, 0.02, 0.08]
    assert versions.backoff(40) == manager.MAX_BACKOFF_SECONDS
    versions.poll_once()

    def unreachable(path):
        raise tf.errors.UnavailableError(None, None, "storage unreachable")

    monkeypatch.setattr(tf.io.gfile, "listdir", unreachable)
    versions.start()
    try:
        deadline = time.monotonic() + 30
        while len(failed) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(failed) >= 4 and versions.resolve().version == 1
    finally:
        versions.stop()


def test_a_load_that_met_a_storage_error_is_tried_again_without_its_files_changing(tmp_path, monkeypatch):
    """As TF Serving's max_num_load_retries: a bucket's 503 during a load no longer keeps the version out until its
    files change (with two workers, one would serve it and the other never); retries stop after MAX_LOAD_RETRIES."""
    from serving.core import loader

    models = tmp_path / "models"
    toy_model.save(models / "1", 1.0)
    monkeypatch.setattr(manager, "LOAD_RETRY_SECONDS", 0.0)
    real, calls, failed = loader.load, [], []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise loader.LoadError("version 1 at ...: UnavailableError: the bucket answered 503", transient=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "load", flaky)
    versions = manager.Manager(
        settings.ServerSettings(model_dir=str(models)), str(models), on_storage_error=lambda: failed.append(1)
    )
    versions.poll_once()
    assert not versions.available and failed == [1]  # counted as a storage error
    versions.poll_once()  # the same files: tried again
    assert sorted(versions.available) == [1]

    toy_model.save(models / "2", 2.0)
    outcomes = {"2": "storage", "3": "broken"}

    def failing(path, version, *args, **kwargs):
        calls.append(version)
        raise loader.LoadError(f"version {version}: {outcomes[str(version)]}", transient=version == 2)

    monkeypatch.setattr(loader, "load", failing)
    for _ in range(manager.MAX_LOAD_RETRIES + 5):
        versions.poll_once()
    assert calls.count(2) == manager.MAX_LOAD_RETRIES + 1 and sorted(versions.available) == [1]
    assert len(failed) == 1 + manager.MAX_LOAD_RETRIES + 1  # each storage error counted
    toy_model.save(models / "3", 3.0)  # a version whose files are wrong: once, until they change
    for _ in range(3):
        versions.poll_once()
    assert calls.count(3) == 1 and len(failed) == 1 + manager.MAX_LOAD_RETRIES + 1
