"""Vertex AI Model Monitoring of the endpoint the Pusher deploys to (offline: aiplatform faked, its configs real)."""

import types

import pytest
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from pipeline import config as config_lib
from pipeline.components import vertex_pusher
from pipeline.components.checks import comparator_thresholds

SETTINGS = {
    "gcp_project": "my-project",
    "gcs_bucket": "gs://my-bucket",
    "pipeline_image": "pipeline:7",
    "serving_image": "serving:7",
}
ENDPOINT = "projects/my-project/locations/us-central1/endpoints/42"


def _config(**overrides):
    return config_lib.load_config("vertex", {**SETTINGS, **overrides})


def _schema_thresholds(kind):
    schema = text_format.Parse((config_lib.PROJECT_ROOT / "schema" / "schema.pbtxt").read_text(), schema_pb2.Schema())
    return {name: threshold for name, (_, threshold) in comparator_thresholds(schema, kind).items()}


@pytest.fixture
def vertex(monkeypatch):
    """aiplatform's Endpoint and ModelDeploymentMonitoringJob faked as Vertex behaves: one job per endpoint, whose
    name the endpoint then carries."""
    from google.cloud import aiplatform

    endpoint = types.SimpleNamespace(
        resource_name=ENDPOINT, gca_resource=types.SimpleNamespace(model_deployment_monitoring_job="")
    )
    calls = []

    class Endpoint:
        @staticmethod
        def list(filter):
            calls.append(("list", filter))
            return [endpoint] if filter == 'display_name="babyweight"' else []

    class ModelDeploymentMonitoringJob:
        def __init__(self, name):
            self.resource_name = name

        @classmethod
        def create(cls, **kwargs):
            calls.append(("create", kwargs))
            endpoint.gca_resource.model_deployment_monitoring_job = f"{ENDPOINT}/monitoring/{len(calls)}"
            return cls(endpoint.gca_resource.model_deployment_monitoring_job)

        def update(self, **kwargs):
            calls.append(("update", dict(kwargs, job=self.resource_name)))
            return self

    monkeypatch.setattr(aiplatform, "init", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(aiplatform, "Endpoint", Endpoint)
    monkeypatch.setattr(aiplatform, "ModelDeploymentMonitoringJob", ModelDeploymentMonitoringJob)
    return calls


def test_the_monitoring_job_takes_its_thresholds_from_the_schema(vertex):
    config = _config(vertex_monitoring_emails="ops@example.com", serving_log_sampling_rate="0.25")
    monitoring = vertex_pusher.monitoring_config(config)
    vertex_pusher.ensure_monitoring_job("my-project", "us-central1", "babyweight", monitoring)
    [job] = [kwargs for name, kwargs in vertex if name == "create"]
    assert job["endpoint"].resource_name == ENDPOINT and job["display_name"] == "babyweight-monitoring"
    objective = job["objective_configs"]
    skew, drift = objective.skew_detection_config, objective.drift_detection_config
    assert skew.skew_thresholds == _schema_thresholds("skew")
    assert skew.skew_thresholds["plurality"] == 0.05 and skew.skew_thresholds["gestation_weeks"] == 0.15
    # Drift of every thresholded feature but the label, which requests don't carry.
    assert "weight_pounds" in _schema_thresholds("drift")
    assert drift.drift_thresholds == {k: v for k, v in _schema_thresholds("drift").items() if k != "weight_pounds"}
    assert drift.drift_thresholds["plurality"] == 0.05
    # Skew against the training table the runner writes, the label named so Vertex leaves it out.
    assert skew.data_source == "bq://my-project.babyweight_serving.training_data"
    assert skew.target_field == "weight_pounds"
    proto = objective.as_proto()
    assert proto.training_dataset.bigquery_source.input_uri == "bq://my-project.babyweight_serving.training_data"
    assert proto.training_prediction_skew_detection_config.skew_thresholds["plurality"].value == 0.05
    assert job["logging_sampling_strategy"].sample_rate == 0.25
    assert job["schedule_config"].monitor_interval == 1
    assert job["alert_config"].user_emails == ["ops@example.com"] and job["alert_config"].enable_logging


def test_a_later_push_updates_the_endpoints_job_instead_of_creating_another(vertex):
    first = vertex_pusher.monitoring_config(_config())
    created = vertex_pusher.ensure_monitoring_job("my-project", "us-central1", "babyweight", first)
    later = vertex_pusher.monitoring_config(_config(vertex_monitoring_interval_hours="6"))
    assert vertex_pusher.ensure_monitoring_job("my-project", "us-central1", "babyweight", later) == created
    assert [name for name, _ in vertex if name in ("create", "update")] == ["create", "update"]
    update = vertex[-1][1]
    assert update["job"] == created
    # The objective again, so the job watches the models deployed now, with the settings of the new run.
    assert update["objective_configs"].skew_detection_config.skew_thresholds == _schema_thresholds("skew")
    assert update["schedule_config"].monitor_interval == 6
    assert ("init", {"project": "my-project", "location": "us-central1"}) in vertex


def test_monitoring_without_the_endpoint_says_so(vertex):
    with pytest.raises(RuntimeError, match="endpoint elsewhere not found"):
        vertex_pusher.ensure_monitoring_job("my-project", "us-central1", "elsewhere", {})


def test_an_interval_under_an_hour_is_refused():
    assert _config(vertex_monitoring_interval_hours="1").vertex_monitoring_interval_hours == 1
    with pytest.raises(config_lib.ConfigError, match="vertex_monitoring_interval_hours 0: .* shortest interval is 1 h"):
        _config(vertex_monitoring_interval_hours="0")


@pytest.mark.parametrize("blessed", [True, False])
def test_the_executor_logs_before_the_deploy_and_monitors_after_it(monkeypatch, blessed):
    from tfx.extensions.google_cloud_ai_platform.pusher import executor as tfx_executor
    from tfx.utils import json_utils

    order = []
    monkeypatch.setattr(tfx_executor.Executor, "CheckBlessing", lambda self, input_dict: blessed)
    monkeypatch.setattr(tfx_executor.Executor, "Do", lambda self, *args: order.append("deploy"))
    monkeypatch.setattr(vertex_pusher, "ensure_logging_endpoint", lambda *args: order.append(("logging", args)))
    monkeypatch.setattr(vertex_pusher, "ensure_monitoring_job", lambda *args: order.append(("monitoring", args)))
    custom_config = {
        "ai_platform_serving_args": {"project_id": "my-project", "endpoint_name": "babyweight"},
        "ai_platform_vertex_region": "us-central1",
        vertex_pusher.REQUEST_LOGGING_KEY: {"bq_destination_table": "bq://p.d.t", "sampling_rate": 1.0},
        vertex_pusher.MONITORING_KEY: {"interval_hours": 1},
    }
    vertex_pusher.Executor().Do({}, {}, {"custom_config": json_utils.dumps(custom_config)})
    where = ("my-project", "us-central1", "babyweight")
    if blessed:
        assert order == [
            ("logging", where + (custom_config[vertex_pusher.REQUEST_LOGGING_KEY],)),
            "deploy",
            ("monitoring", where + ({"interval_hours": 1},)),
        ]
    else:
        assert order == ["deploy"]  # TFX's Pusher pushes nothing, and no job watches for it


def test_skew_and_drift_each_read_their_own_comparator(tmp_path):
    """The schema gives both kinds the same values; a schema where they differ tells them apart."""
    text = (config_lib.PROJECT_ROOT / "schema" / "schema.pbtxt").read_text()
    schema = text_format.Parse(text, schema_pb2.Schema())
    plurality = next(feature for feature in schema.feature if feature.name == "plurality")
    plurality.drift_comparator.infinity_norm.threshold = 0.3
    (tmp_path / "schema.pbtxt").write_text(text_format.MessageToString(schema))
    monitoring = vertex_pusher.monitoring_config(_config(schema_dir=str(tmp_path)))
    assert (monitoring["skew_thresholds"]["plurality"], monitoring["drift_thresholds"]["plurality"]) == (0.05, 0.3)
