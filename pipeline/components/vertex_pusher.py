"""TFX's Vertex AI Pusher, with request-response logging on the endpoint and Model Monitoring of what it serves.

TFX's Pusher deploys each blessed model to the endpoint (creating it if needed) in the serving image the
config names (serving/Dockerfile: this project's server, which honours Vertex's AIP_* variables). It creates
the endpoint without logging; this executor creates it first with Vertex's request-response logging, so every
request and answer lands in a BigQuery table that `babyweight validate-serving` can check (docs/serving.md).
After the deploy it creates the endpoint's Vertex AI Model Monitoring job, or updates it to watch the models
deployed now: skew against the training data and drift between windows, with the schema's thresholds.

Vertex allows both on one endpoint in this order only: logging first, then monitoring, which shares logging's
BigQuery table; from then on the logging settings can't change (docs/cloud.md, The loop on Google Cloud).
"""

import logging
import pathlib
from typing import Any, Dict, List

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import types
from tfx.dsl.components.base import executor_spec
from tfx.extensions.google_cloud_ai_platform import constants
from tfx.extensions.google_cloud_ai_platform.pusher import component as vertex_pusher
from tfx.extensions.google_cloud_ai_platform.pusher import executor as vertex_executor
from tfx.utils import json_utils

from models import features
from pipeline.components.checks import comparator_thresholds
from pipeline.config import PROJECT_ROOT, PipelineConfig

REQUEST_LOGGING_KEY = "request_response_logging"  # {"bq_destination_table": "bq://P.D.T", "sampling_rate": 1.0}
MONITORING_KEY = "model_monitoring"  # monitoring_config's dict
TRAINING_TABLE = "training_data"  # beside the request log: the training split's features and label


def request_log_table(config: PipelineConfig) -> str:
    """bq://PROJECT.DATASET.TABLE of the endpoint's request-response log: serving_log_table, or a default one."""
    return (
        config.serving_log_table or f"bq://{config.gcp_project}.{config.pipeline_name}_serving.request_response_logging"
    )


def training_table(config: PipelineConfig) -> str:
    """bq://PROJECT.DATASET.training_data, in the request log's dataset: the data Model Monitoring's skew is measured
    against. runner_dataflow.py makes it from the training query (Vertex reads a table, not a query)."""
    return request_log_table(config).rpartition(".")[0] + "." + TRAINING_TABLE


def _schema(config: PipelineConfig) -> schema_pb2.Schema:
    # As pipeline.schema_fingerprint: on Vertex the schema path is inside the pipeline image, built from this copy.
    path = pathlib.Path(config.schema_path)
    if config.orchestrator == "vertex" and not path.is_file():
        path = PROJECT_ROOT / "schema" / path.name
    return text_format.Parse(path.read_text(), schema_pb2.Schema())


def monitoring_config(config: PipelineConfig) -> Dict[str, Any]:
    """Model Monitoring's arguments as plain JSON for the Pusher's custom_config, read from the schema at build time.

    The thresholds are the schema's skew and drift comparators, read by checks.comparator_thresholds; requests
    carry no label, so it is left out of both."""
    schema = _schema(config)
    label = features.LABEL.name

    def thresholds(kind: str) -> Dict[str, float]:
        return {name: value for name, (_, value) in comparator_thresholds(schema, kind).items() if name != label}

    return {
        "training_table": training_table(config),
        "target_field": label,
        "skew_thresholds": thresholds("skew"),
        "drift_thresholds": thresholds("drift"),
        "sampling_rate": config.serving_log_sampling_rate,
        "interval_hours": config.vertex_monitoring_interval_hours,
        "emails": list(config.vertex_monitoring_emails),
    }


def ensure_logging_endpoint(project: str, region: str, endpoint_name: str, logging_config: Dict[str, Any]) -> None:
    """Creates the endpoint with request-response logging unless one of that name exists (then says if it logs)."""
    from google.cloud import aiplatform

    aiplatform.init(project=project, location=region)
    existing = aiplatform.Endpoint.list(filter=f'display_name="{endpoint_name}"')
    if existing:
        if not existing[0].gca_resource.predict_request_response_logging_config.enabled:
            logging.warning(
                "endpoint %s exists without request-response logging: requests are not logged to %s "
                "(delete the endpoint to have it created with logging)",
                endpoint_name,
                logging_config["bq_destination_table"],
            )
        return
    aiplatform.Endpoint.create(
        display_name=endpoint_name,
        enable_request_response_logging=True,
        request_response_logging_sampling_rate=logging_config["sampling_rate"],
        request_response_logging_bq_destination_table=logging_config["bq_destination_table"],
    )


def ensure_monitoring_job(project: str, region: str, endpoint_name: str, monitoring: Dict[str, Any]) -> str:
    """Creates the endpoint's Model Monitoring job for the models deployed on it, or updates the job it has (Vertex
    keeps one per endpoint) to watch the models deployed now; returns the job's resource name."""
    from google.cloud import aiplatform
    from google.cloud.aiplatform import model_monitoring

    aiplatform.init(project=project, location=region)
    endpoints = aiplatform.Endpoint.list(filter=f'display_name="{endpoint_name}"')
    if not endpoints:
        raise RuntimeError(f"endpoint {endpoint_name} not found in {project}/{region}: no model to monitor")
    endpoint = endpoints[0]
    settings = dict(
        # One objective for every model deployed on the endpoint.
        objective_configs=model_monitoring.ObjectiveConfig(
            skew_detection_config=model_monitoring.SkewDetectionConfig(
                data_source=monitoring["training_table"],
                target_field=monitoring["target_field"],
                skew_thresholds=monitoring["skew_thresholds"],
            ),
            drift_detection_config=model_monitoring.DriftDetectionConfig(
                drift_thresholds=monitoring["drift_thresholds"]
            ),
        ),
        logging_sampling_strategy=model_monitoring.RandomSampleConfig(sample_rate=monitoring["sampling_rate"]),
        schedule_config=model_monitoring.ScheduleConfig(monitor_interval=monitoring["interval_hours"]),
        alert_config=model_monitoring.EmailAlertConfig(user_emails=list(monitoring["emails"]), enable_logging=True),
    )
    existing = endpoint.gca_resource.model_deployment_monitoring_job
    if existing:
        aiplatform.ModelDeploymentMonitoringJob(existing).update(**settings)
        logging.info("Model Monitoring job %s of endpoint %s updated", existing, endpoint_name)
        return existing
    job = aiplatform.ModelDeploymentMonitoringJob.create(
        endpoint=endpoint, display_name=f"{endpoint_name}-monitoring", **settings
    )
    logging.info("Model Monitoring job %s of endpoint %s created", job.resource_name, endpoint_name)
    return job.resource_name


class Executor(vertex_executor.Executor):
    def Do(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ) -> None:
        custom_config = json_utils.loads(exec_properties.get("custom_config") or "null") or {}
        serving_args = custom_config.get(constants.SERVING_ARGS_KEY) or {}
        where = (serving_args.get("project_id"), custom_config.get(constants.VERTEX_REGION_KEY))
        endpoint_name = serving_args.get("endpoint_name")
        blessed = self.CheckBlessing(input_dict)
        logging_config = custom_config.get(REQUEST_LOGGING_KEY)
        if logging_config and blessed:
            ensure_logging_endpoint(*where, endpoint_name, logging_config)
        super().Do(input_dict, output_dict, exec_properties)
        monitoring = custom_config.get(MONITORING_KEY)
        # After the deploy: the job watches the models deployed on the endpoint. Its failure fails the step, though
        # the model serves: a run that leaves its model unwatched says so.
        if monitoring and blessed:
            ensure_monitoring_job(*where, endpoint_name, monitoring)


class Pusher(vertex_pusher.Pusher):
    """TFX's Vertex AI Pusher with the executor above."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
