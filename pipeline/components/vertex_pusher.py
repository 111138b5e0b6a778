"""TFX's Vertex AI Pusher, with the endpoint created with request-response logging to BigQuery.

TFX's Pusher deploys each blessed model to the endpoint (creating it if needed) in the serving image the
config names (serving/Dockerfile: this project's server, which honours Vertex's AIP_* variables). It creates
the endpoint without logging; this executor creates it first with Vertex's request-response logging, so every
request and answer lands in a BigQuery table that `babyweight validate-serving` can check (docs/serving.md).
"""

import logging
from typing import Any, Dict, List

from tfx import types
from tfx.dsl.components.base import executor_spec
from tfx.extensions.google_cloud_ai_platform import constants
from tfx.extensions.google_cloud_ai_platform.pusher import component as vertex_pusher
from tfx.extensions.google_cloud_ai_platform.pusher import executor as vertex_executor
from tfx.utils import json_utils

REQUEST_LOGGING_KEY = "request_response_logging"  # {"bq_destination_table": "bq://P.D.T", "sampling_rate": 1.0}


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


class Executor(vertex_executor.Executor):
    def Do(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ) -> None:
        custom_config = json_utils.loads(exec_properties.get("custom_config") or "null") or {}
        logging_config = custom_config.get(REQUEST_LOGGING_KEY)
        if logging_config and self.CheckBlessing(input_dict):
            serving_args = custom_config[constants.SERVING_ARGS_KEY]
            ensure_logging_endpoint(
                serving_args["project_id"],
                custom_config[constants.VERTEX_REGION_KEY],
                serving_args["endpoint_name"],
                logging_config,
            )
        super().Do(input_dict, output_dict, exec_properties)


class Pusher(vertex_pusher.Pusher):
    """TFX's Vertex AI Pusher with the executor above."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
