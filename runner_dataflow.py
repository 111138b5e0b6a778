"""Compiles the babyweight pipeline for Vertex Pipelines, submits it with --submit, schedules it with --schedule.

    python runner_dataflow.py --set gcp_project=my-project --set gcs_bucket=gs://my-bucket \\
        --set pipeline_image=us-central1-docker.pkg.dev/my-project/babyweight/pipeline:1 --submit --wait

The same `create_pipeline` as the local runner; the vertex profile sends ExampleGen to BigQuery, Beam
components to Dataflow, the Trainer to Vertex AI training and the Pusher to a Vertex AI endpoint, which it
then watches with Vertex AI Model Monitoring. --schedule runs it on vertex_schedule_cron, one run at a time.
"""

import argparse
import os
import pathlib
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=FutureWarning)

if TYPE_CHECKING:  # the project's modules are imported in main, after the arguments are read
    from pipeline.config import PipelineConfig


def main(argv: Optional[List[str]] = None) -> int:
    """Builds the config, compiles the job spec JSON and optionally submits it; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="vertex", help="config profile in pipeline/profiles/ (default: vertex)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile setting (repeatable); BABYWEIGHT_<KEY> variables work too",
    )
    parser.add_argument("--output", type=pathlib.Path, help="job spec path (default: outputs/vertex/<name>.json)")
    parser.add_argument("--submit", action="store_true", help="submit the compiled job to Vertex Pipelines")
    parser.add_argument("--wait", action="store_true", help="with --submit: stream the job's state until it ends")
    parser.add_argument(
        "--schedule",
        action="store_true",
        help="create (or update) the Vertex Pipelines schedule that runs the compiled job on vertex_schedule_cron",
    )
    args = parser.parse_args(argv)

    from pipeline import config as config_lib

    try:
        config = config_lib.load_config(args.profile, config_lib.parse_overrides(args.set))
        if config.orchestrator != "vertex":
            raise config_lib.ConfigError(
                f"profile {args.profile!r} has orchestrator {config.orchestrator!r}: "
                "runner_dataflow.py needs a vertex profile (runner_local.py runs local ones)"
            )
        if args.schedule and not config.vertex_schedule_cron:
            raise config_lib.ConfigError(
                "--schedule needs vertex_schedule_cron, a cron line in UTC such as '0 3 * * 1' (Mondays 03:00): "
                "set BABYWEIGHT_VERTEX_SCHEDULE_CRON, pass --set vertex_schedule_cron=..., or write it in "
                f"pipeline/profiles/{args.profile}.yaml"
            )
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from tfx import v1 as tfx

    from pipeline.pipeline import create_pipeline

    output = (args.output or pathlib.Path(config.output_dir) / "vertex" / f"{config.pipeline_name}.json").resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(default_image=config.pipeline_image),
        output_dir=str(output.parent),
        output_filename=output.name,
    )
    runner.run(create_pipeline(config), write_out=True)
    print(f"job spec: {output}")
    if not (args.submit or args.schedule):
        return 0

    from google.cloud import aiplatform

    aiplatform.init(project=config.gcp_project, location=config.gcp_region)
    print(f"training data for Model Monitoring: {create_training_table(config)}")
    if args.schedule:
        schedule(aiplatform, config, output)
    if not args.submit:
        return 0
    job = _pipeline_job(aiplatform, config, output)
    job.submit(service_account=config.service_account or None)
    print(f"submitted: {job.resource_name} (Vertex AI > Pipelines in the console)")
    if args.wait:
        job.wait()
        print(f"finished: {job.state.name}")
        return 0 if job.state.name == "PIPELINE_STATE_SUCCEEDED" else 1
    return 0


def _pipeline_job(aiplatform: types.ModuleType, config: "PipelineConfig", template: pathlib.Path) -> Any:
    """A Vertex Pipelines job of the compiled spec."""
    return aiplatform.PipelineJob(
        display_name=config.pipeline_name,
        template_path=str(template),
        pipeline_root=config.pipeline_root,
        enable_caching=config.enable_cache,
    )


def create_training_table(config: "PipelineConfig") -> str:
    """Writes the training query's features and label to vertex_pusher.training_table (replacing it): Model
    Monitoring measures skew against a BigQuery table, not a query. Returns its bq:// path."""
    from google.cloud import bigquery

    from models import features
    from pipeline.components import vertex_pusher
    from pipeline.pipeline import bigquery_query

    table = vertex_pusher.training_table(config)
    columns = ", ".join([column.name for column in features.FEATURES] + [features.LABEL.name])
    statement = (
        f"CREATE OR REPLACE TABLE `{table.removeprefix('bq://')}` AS\n"
        f"SELECT {columns} FROM (\n{bigquery_query(config, 'train')}\n)"
    )
    bigquery.Client(project=config.gcp_project).query(statement).result()
    return table


def schedule(aiplatform: types.ModuleType, config: "PipelineConfig", template: pathlib.Path) -> None:
    """Creates the schedule of the compiled job, or updates the one of its name: one run at a time, a run due while
    another runs waits in the queue."""
    display_name = f"{config.pipeline_name}-schedule"
    existing = aiplatform.PipelineJobSchedule.list(filter=f'display_name="{display_name}"')
    if not existing:
        created = _pipeline_job(aiplatform, config, template).create_schedule(
            cron=config.vertex_schedule_cron,
            display_name=display_name,
            allow_queueing=True,
            max_concurrent_run_count=1,
            service_account=config.service_account or None,
        )
        print(f"scheduled: {created.resource_name} runs on '{config.vertex_schedule_cron}' (UTC)")
        return
    if len(existing) > 1:
        print(f"warning: {len(existing)} schedules are named {display_name}; updating the first", file=sys.stderr)
    existing[0].update(cron=config.vertex_schedule_cron, allow_queueing=True, max_concurrent_run_count=1)
    # Vertex updates a schedule's timing, not the job it runs.
    print(
        f"schedule updated: {existing[0].resource_name} runs on '{config.vertex_schedule_cron}' (UTC) the job spec "
        "it was created with; to schedule a changed pipeline, delete it (Vertex AI > Pipelines > Schedules) and "
        "run --schedule again"
    )


if __name__ == "__main__":
    sys.exit(main())
