"""The pipeline image matches the pins and puts the schema where the vertex profile reads it."""

import re

from pipeline import config as config_lib

DOCKERFILE = (config_lib.PROJECT_ROOT / "Dockerfile").read_text()


def test_base_image_is_the_pinned_tfx_release():
    pinned = re.search(r"^tfx==(\S+)$", (config_lib.PROJECT_ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TFX_VERSION={pinned}" in DOCKERFILE
    assert "FROM gcr.io/tfx-oss-public/tfx:${TFX_VERSION}" in DOCKERFILE


def test_image_holds_the_code_and_schema_where_the_vertex_profile_looks():
    vertex = config_lib.load_config(
        "vertex", {"gcp_project": "p", "gcs_bucket": "gs://b", "pipeline_image": "i", "serving_image": "s"}
    )
    assert vertex.schema_dir == "/pipeline/schema"
    assert "WORKDIR /pipeline" in DOCKERFILE and "COPY schema/ schema/" in DOCKERFILE
    for package in ("pipeline/", "models/", "serving/"):
        assert f"COPY {package} {package}" in DOCKERFILE
    assert "ENV TF_USE_LEGACY_KERAS=1" in DOCKERFILE


def test_image_holds_every_module_setup_py_installs():
    """`pip install -e .` in the image installs setup.py's py_modules: each must be copied (the server the
    InfraValidator starts imports babyweight_cli)."""
    import ast

    setup = ast.parse((config_lib.PROJECT_ROOT / "setup.py").read_text())
    modules = next(
        ast.literal_eval(keyword.value)
        for node in ast.walk(setup)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "py_modules"
    )
    copied = " ".join(re.findall(r"^COPY (.+) \./$", DOCKERFILE, re.M))
    assert modules and all(f"{module}.py" in copied.split() for module in modules), (modules, copied)


def test_pipeline_image_can_start_the_server_the_infra_validator_runs():
    """The InfraValidator runs `python -m serving.model_server.server` in this image: the serving package (copied,
    above) and the server's pinned dependencies are in it."""
    assert re.search(r"pip install --no-cache-dir -c constraints.txt [^\n]*-r serving/requirements.txt", DOCKERFILE)
    assert re.search(r"pip install --no-cache-dir -c constraints.txt [^\n]*\bpsutil\b", DOCKERFILE)


SERVING_DOCKERFILE = (config_lib.PROJECT_ROOT / "serving" / "Dockerfile").read_text()


def test_serving_image_holds_the_server_and_its_pinned_dependencies_only():
    python = (config_lib.PROJECT_ROOT / ".python-version").read_text().strip()
    assert f"ARG PYTHON_VERSION={python}" in SERVING_DOCKERFILE
    assert "pip install --no-cache-dir -c constraints.txt -r serving/requirements.txt" in SERVING_DOCKERFILE
    for path in ("babyweight_cli.py", "models/", "schema/", "serving/", "constraints.txt", "serving/requirements.txt"):
        assert f"COPY {path}" in SERVING_DOCKERFILE and (config_lib.PROJECT_ROOT / path).exists()
    users = re.findall(r"^USER (\S+)", SERVING_DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0"), "the server runs as an unprivileged user"
    assert "COPY pipeline/" not in SERVING_DOCKERFILE
    # Every module the server imports is in the image: models/ and serving/ import nothing of pipeline/ at the
    # top (serving/model_server/app.py reads the local profile's folders only when --model-dir or --log-dir is not
    # given).
    for package in ("models", "serving"):
        for module in (config_lib.PROJECT_ROOT / package).rglob("*.py"):
            assert not re.search(r"^(from|import) (pipeline|data)\b", module.read_text(), re.M), module
    assert '"serve", "--host", "0.0.0.0"' in SERVING_DOCKERFILE and '"--model-dir", "/models"' in SERVING_DOCKERFILE
    assert '"--log-dir", "/tmp/serving_logs"' in SERVING_DOCKERFILE


def test_cloud_build_config_builds_the_serving_dockerfile():
    build = (config_lib.PROJECT_ROOT / "serving" / "cloudbuild.yaml").read_text()
    assert '"-f", "serving/Dockerfile"' in build and 'images: ["${_IMAGE}"]' in build
    cloud_page = (config_lib.PROJECT_ROOT / "docs" / "cloud.md").read_text()
    assert "gcloud builds submit --config serving/cloudbuild.yaml" in cloud_page
    assert "BABYWEIGHT_SERVING_IMAGE=" in cloud_page


def test_serving_image_serves_tf_servings_two_ports():
    """REST on 8501 and gRPC on 8500, as TF Serving's image: both exposed, both flags in the command."""
    assert re.search(r"^EXPOSE 8500 8501$", SERVING_DOCKERFILE, re.M)
    command = SERVING_DOCKERFILE[SERVING_DOCKERFILE.index("CMD [") :]
    assert '"--port", "8501"' in command and '"--grpc-port", "8500"' in command
