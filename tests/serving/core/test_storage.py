"""Versions on storage other than the local disk: everything goes through tf.io.gfile (gs:// in the cloud).

TensorFlow's in-memory file system (ram://) stands in for Cloud Storage here: no network is needed.
"""

import os

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
