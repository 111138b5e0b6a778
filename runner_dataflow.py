"""Compiles the babyweight pipeline for Vertex Pipelines, and submits it with --submit.

    python runner_dataflow.py --set gcp_project=my-project --set gcs_bucket=gs://my-bucket \\
        --set pipeline_image=us-central1-docker.pkg.dev/my-project/babyweight/pipeline:1 --submit --wait

The same `create_pipeline` as the local runner; the vertex profile sends ExampleGen to BigQuery, Beam
components to Dataflow, the Trainer to Vertex AI training and the Pusher to a Vertex AI endpoint.
"""

import argparse
import os
import pathlib
import sys
import warnings
from typing import List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", category=FutureWarning)


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
    args = parser.parse_args(argv)

    from pipeline import config as config_lib

    try:
        config = config_lib.load_config(args.profile, config_lib.parse_overrides(args.set))
        if config.orchestrator != "vertex":
            raise config_lib.ConfigError(
                f"profile {args.profile!r} has orchestrator {config.orchestrator!r}: "
                "runner_dataflow.py needs a vertex profile (runner_local.py runs local ones)"
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
    if not args.submit:
        return 0

    from google.cloud import aiplatform

    aiplatform.init(project=config.gcp_project, location=config.gcp_region)
    job = aiplatform.PipelineJob(
        display_name=config.pipeline_name,
        template_path=str(output),
        pipeline_root=config.pipeline_root,
        enable_caching=config.enable_cache,
    )
    job.submit(service_account=config.service_account or None)
    print(f"submitted: {job.resource_name} (Vertex AI > Pipelines in the console)")
    if args.wait:
        job.wait()
        print(f"finished: {job.state.name}")
        return 0 if job.state.name == "PIPELINE_STATE_SUCCEEDED" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
