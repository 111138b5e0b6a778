"""The pipeline image matches the pins and puts the schema where the vertex profile reads it."""
import re

from pipeline import config as config_lib

DOCKERFILE = (config_lib.PROJECT_ROOT / "Dockerfile").read_text()


def test_base_image_is_the_pinned_tfx_release():
    pinned = re.search(r"^tfx==(\S+)$", (config_lib.PROJECT_ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TFX_VERSION={pinned}" in DOCKERFILE
    assert "FROM gcr.io/tfx-oss-public/tfx:${TFX_VERSION}" in DOCKERFILE


def test_image_holds_the_code_and_schema_where_the_vertex_profile_looks():
    vertex = config_lib.load_config("vertex", {"gcp_project": "p", "gcs_bucket": "gs://b", "pipeline_image": "i"})
    assert vertex.schema_dir == "/pipeline/schema"
    assert "WORKDIR /pipeline" in DOCKERFILE and "COPY schema/ schema/" in DOCKERFILE
    for package in ("pipeline/", "models/"):
        assert f"COPY {package} {package}" in DOCKERFILE
    assert "ENV TF_USE_LEGACY_KERAS=1" in DOCKERFILE
