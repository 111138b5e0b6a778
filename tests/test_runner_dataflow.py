"""The vertex profile compiles the same pipeline to a Vertex Pipelines job spec (offline: no cloud calls)."""

import json
import types

import pytest

import runner_dataflow
from models import features
from pipeline import config as config_lib
from pipeline import pipeline as pipeline_lib
from pipeline.components import vertex_pusher

IMAGE = "us-central1-docker.pkg.dev/my-project/babyweight/pipeline:7"
SERVING_IMAGE = "us-central1-docker.pkg.dev/my-project/babyweight/serving:7"
SETTINGS = [
    "gcp_project=my-project",
    "gcs_bucket=gs://my-bucket",
    f"pipeline_image={IMAGE}",
    f"serving_image={SERVING_IMAGE}",
    "service_account=runner@my-project.iam.gserviceaccount.com",
]


def _compile(tmp_path, *extra):
    output = tmp_path / "spec.json"
    args = [arg for setting in SETTINGS + list(extra) for arg in ("--set", setting)]
    assert runner_dataflow.main(args + ["--output", str(output)]) == 0
    spec = json.loads(output.read_text())["pipelineSpec"]
    return spec, spec["root"]["dag"]["tasks"], spec["deploymentSpec"]["executors"]


def _parameters(task):
    constants = {
        name: value["runtimeValue"]["constantValue"] for name, value in task["inputs"].get("parameters", {}).items()
    }
    return {name: constant["stringValue"] for name, constant in constants.items() if "stringValue" in constant}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("vertex"))


def test_same_components_as_the_local_pipeline_less_the_local_resolvers(compiled):
    _, tasks, _ = compiled
    local = {c.id for c in pipeline_lib.create_pipeline(config_lib.load_config()).components}
    # Vertex compiles only TFX's built-in resolver strategies, not the span ones (pipeline/components/spans.py).
    local_only = {"previous_validated_span", "training_window", "previous_predictions"}
    # The vertex profile tunes (Vertex AI Vizier), the local one doesn't (the tuned profile does).
    expected = (local - {"CsvExampleGen", "latest_blessed_model_resolver"} - local_only) | {
        "BigQueryExampleGen",
        "Tuner",
    }
    resolver_tasks = {name for name in tasks if name.startswith("latest_blessed_model_resolver")}
    assert set(tasks) - resolver_tasks == expected
    assert resolver_tasks  # KFP v2 splits the resolver into its model and blessing lookups


def test_example_gen_reads_bigquery_with_a_reproducible_split(compiled):
    _, tasks, _ = compiled
    splits = json.loads(_parameters(tasks["BigQueryExampleGen"])["input_config"])["splits"]
    queries = {split["name"]: split["pattern"] for split in splits}
    assert set(queries) == {"train", "eval"}
    for query in queries.values():
        assert "FROM `bigquery-public-data.samples.natality`" in query
        assert "FARM_FINGERPRINT(CONCAT(CAST(year AS STRING), '-', CAST(month AS STRING)))" in query
        assert "CAST(is_male AS STRING) AS is_male" in query and "LIMIT" not in query
    assert queries["train"].endswith(", 5) < 4") and queries["eval"].endswith(", 5) >= 4")


def test_row_limit_for_trial_runs(tmp_path):
    _, tasks, _ = _compile(tmp_path, "bigquery_row_limit=1000")
    splits = json.loads(_parameters(tasks["BigQueryExampleGen"])["input_config"])["splits"]
    assert all(split["pattern"].endswith("LIMIT 1000") for split in splits)


def test_beam_components_run_on_dataflow_in_the_configured_image(compiled):
    _, _, executors = compiled
    for name in ("BigQueryExampleGen_executor", "StatisticsGen_executor", "Transform_executor", "Evaluator_executor"):
        container = executors[name]["container"]
        args = container["args"]
        assert container["image"] == IMAGE
        for expected in (
            "--runner=DataflowRunner",
            "--project=my-project",
            "--region=us-central1",
            "--temp_location=gs://my-bucket/babyweight/dataflow/tmp",
            f"--sdk_container_image={IMAGE}",
            "--service_account_email=runner@my-project.iam.gserviceaccount.com",
        ):
            assert expected in args, (name, expected)


def test_trainer_is_a_vertex_job_with_the_configured_worker_pool(compiled):
    _, tasks, executors = compiled
    custom_config = json.loads(_parameters(tasks["Trainer"])["custom_config"])
    assert custom_config["ai_platform_enable_vertex"] is True
    assert custom_config["ai_platform_vertex_region"] == "us-central1"
    job = custom_config["ai_platform_training_args"]
    assert job["project"] == "my-project"
    assert job["service_account"] == "runner@my-project.iam.gserviceaccount.com"
    assert job["worker_pool_specs"] == [
        {
            "machine_spec": {
                "machine_type": "n1-standard-8",
                "accelerator_type": "NVIDIA_TESLA_T4",
                "accelerator_count": 1,
            },
            "replica_count": 1,
            "container_spec": {"image_uri": IMAGE},
        }
    ]
    assert custom_config["strategy"] == "mirrored"
    assert "google_cloud_ai_platform" in executors["Trainer_executor"]["container"]["args"][1]


def test_the_tuner_is_a_vertex_job_of_parallel_trials_that_vizier_suggests(compiled):
    _, tasks, executors = compiled
    tuner = tasks["Tuner"]
    custom_config = json.loads(_parameters(tuner)["custom_config"])
    assert custom_config["ai_platform_enable_vertex"] is True
    assert custom_config["ai_platform_vertex_region"] == "us-central1"
    tuning_args = custom_config["ai_platform_tuning_args"]
    assert tuning_args["project"] == "my-project"
    # One pool: TFX's executor adds the workers (tuner_parallel_trials - 1) beside the chief, on the same machine.
    assert tuning_args["job_spec"]["worker_pool_specs"] == [
        {
            "machine_spec": {
                "machine_type": "n1-standard-8",
                "accelerator_type": "NVIDIA_TESLA_T4",
                "accelerator_count": 1,
            },
            "replica_count": 1,
            "container_spec": {"image_uri": IMAGE},
        }
    ]
    assert tuning_args["job_spec"]["service_account"] == "runner@my-project.iam.gserviceaccount.com"
    assert json.loads(_parameters(tuner)["tune_args"]) == {"num_parallel_trials": 4}
    assert custom_config["vizier"] == {
        "project": "my-project",
        "region": "us-central1",
        "study_prefix": "babyweight_tuner",
    }
    assert custom_config["tuner_trials"] == 24 and custom_config["seed"] == 1
    assert _parameters(tuner)["tuner_fn"] == "models.tuning.tuner_fn"
    assert "google_cloud_ai_platform.tuner.executor.Executor" in json.dumps(executors["Tuner_executor"])
    # The Tuner searches on the Trainer's data and transform; the Trainer trains with its best values.
    inputs = {name: a["taskOutputArtifact"]["producerTask"] for name, a in tuner["inputs"]["artifacts"].items()}
    assert inputs == {"examples": "BigQueryExampleGen", "transform_graph": "Transform", "schema": "ImportSchemaGen"}
    trainer = tasks["Trainer"]["inputs"]["artifacts"]["hyperparameters"]["taskOutputArtifact"]
    assert trainer == {"producerTask": "Tuner", "outputArtifactKey": "best_hyperparameters"}


def test_tuning_trials_of_a_multi_worker_trainer_run_one_per_worker(tmp_path):
    _, tasks, _ = _compile(tmp_path, "strategy=multi_worker_mirrored", "trainer_replica_count=3")
    tuner = json.loads(_parameters(tasks["Tuner"])["custom_config"])
    assert tuner["strategy"] == "mirrored"  # each worker its own trials, not one cluster
    assert [pool["replica_count"] for pool in tuner["ai_platform_tuning_args"]["job_spec"]["worker_pool_specs"]] == [1]
    assert json.loads(_parameters(tasks["Trainer"])["custom_config"])["strategy"] == "multi_worker_mirrored"


def test_a_vertex_run_without_tuning_trains_with_the_profile(tmp_path):
    _, tasks, _ = _compile(tmp_path, "tuning=false")
    assert "Tuner" not in tasks and "hyperparameters" not in tasks["Trainer"]["inputs"]["artifacts"]


def test_tpu_and_multi_worker_pools(tmp_path):
    _, tasks, _ = _compile(
        tmp_path,
        "strategy=tpu",
        "trainer_machine_type=cloud-tpu",
        "trainer_accelerator_type=TPU_V3",
        "trainer_accelerator_count=8",
    )
    custom_config = json.loads(_parameters(tasks["Trainer"])["custom_config"])
    assert custom_config["strategy"] == "tpu"
    assert custom_config["ai_platform_training_args"]["worker_pool_specs"][0]["machine_spec"] == {
        "machine_type": "cloud-tpu",
        "accelerator_type": "TPU_V3",
        "accelerator_count": 8,
    }
    _, tasks, _ = _compile(tmp_path, "strategy=multi_worker_mirrored", "trainer_replica_count=3")
    pools = json.loads(_parameters(tasks["Trainer"])["custom_config"])["ai_platform_training_args"]["worker_pool_specs"]
    assert [pool["replica_count"] for pool in pools] == [1, 2]


def test_pusher_deploys_to_the_configured_vertex_endpoint(compiled):
    _, tasks, _ = compiled
    custom_config = json.loads(_parameters(tasks["Pusher"])["custom_config"])
    assert custom_config["ai_platform_enable_vertex"] is True
    assert custom_config["ai_platform_serving_args"] == {
        "project_id": "my-project",
        "endpoint_name": "babyweight",
        "machine_type": "n1-standard-2",
        "min_replica_count": 1,
        "max_replica_count": 3,
    }
    # This project's server, which honours Vertex's AIP_* variables (tests/serving/model_server/test_deployment.py).
    assert custom_config["ai_platform_vertex_container_image_uri"] == SERVING_IMAGE
    assert custom_config["request_response_logging"] == {
        "bq_destination_table": "bq://my-project.babyweight_serving.request_response_logging",
        "sampling_rate": 1.0,
    }
    # Model Monitoring's arguments, read from the schema when the pipeline is built (tests/pipeline/components/
    # test_vertex_monitoring.py checks them against it).
    monitoring = custom_config["model_monitoring"]
    assert monitoring["training_table"] == "bq://my-project.babyweight_serving.training_data"
    assert monitoring["skew_thresholds"]["plurality"] == monitoring["drift_thresholds"]["plurality"] == 0.05
    assert (monitoring["interval_hours"], monitoring["sampling_rate"], monitoring["emails"]) == (1, 1.0, [])
    assert any(
        "pipeline.components.vertex_pusher.Executor" in json.dumps(executor) for executor in compiled[2].values()
    )


def test_infra_validator_serves_the_candidate_before_the_pusher_in_the_pipeline_image(compiled):
    """The same step as locally, run in the pipeline image (which holds the server: tests/test_dockerfile.py)."""
    spec, tasks, executors = compiled
    infra = tasks["InfraValidator"]
    assert {(name, a["taskOutputArtifact"]["producerTask"]) for name, a in infra["inputs"]["artifacts"].items()} == {
        ("model", "Trainer"),
        ("model_blessing", "Evaluator"),
        ("examples", "BigQueryExampleGen"),
        ("schema", "ImportSchemaGen"),
    }
    config = config_lib.load_config("vertex", config_lib.parse_overrides(SETTINGS))
    constants = {name: value["runtimeValue"]["constantValue"] for name, value in infra["inputs"]["parameters"].items()}
    assert constants["max_memory_mb"]["doubleValue"] == config.infra_max_memory_mb
    assert constants["max_p99_ms"]["doubleValue"] == config.infra_max_p99_ms
    assert constants["eval_requests"]["intValue"] == str(config.infra_eval_requests)
    pusher_inputs = tasks["Pusher"]["inputs"]["artifacts"]
    assert pusher_inputs["infra_blessing"]["taskOutputArtifact"] == {
        "producerTask": "InfraValidator",
        "outputArtifactKey": "blessing",
    }
    assert pusher_inputs["model_blessing"]["taskOutputArtifact"]["producerTask"] == "Evaluator"
    executor = json.dumps(executors[spec["components"][infra["componentRef"]["name"]]["executorLabel"]])
    assert "pipeline.components.infra_validator.InfraValidator" in executor and IMAGE in executor


def test_the_tflite_models_are_made_of_the_pushed_model_after_the_push_in_the_pipeline_image(compiled):
    spec, tasks, executors = compiled
    exporter = tasks["TFLiteExporter"]
    assert {(name, a["taskOutputArtifact"]["producerTask"]) for name, a in exporter["inputs"]["artifacts"].items()} == {
        ("model", "Trainer"),
        ("pushed_model", "Pusher"),
        ("examples", "BigQueryExampleGen"),
    }
    executor = json.dumps(executors[spec["components"][exporter["componentRef"]["name"]]["executorLabel"]])
    assert "pipeline.components.tflite_export.TFLiteExporter" in executor and IMAGE in executor


def test_every_step_runs_the_configured_image(compiled):
    _, _, executors = compiled
    images = {executor["container"]["image"] for executor in executors.values() if "container" in executor}
    assert images == {IMAGE}


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            ["gcs_bucket=gs://b", f"pipeline_image={IMAGE}", "serving_image=s"],
            "needs gcp_project: set BABYWEIGHT_GCP_PROJECT",
        ),
        (
            ["gcp_project=p", f"pipeline_image={IMAGE}", "serving_image=s"],
            "needs gcs_bucket: set BABYWEIGHT_GCS_BUCKET",
        ),
        (
            ["gcp_project=p", "gcs_bucket=gs://b", f"pipeline_image={IMAGE}"],
            "needs serving_image: set BABYWEIGHT_SERVING_IMAGE",
        ),
        (
            ["gcp_project=p", "gcs_bucket=gs://b", f"pipeline_image={IMAGE}", "serving_image=s", "gcp_region="],
            "needs gcp_region",
        ),
        (
            ["gcp_project=p", "gcs_bucket=my-bucket", f"pipeline_image={IMAGE}", "serving_image=s"],
            "must be a Cloud Storage path like gs://",
        ),
    ],
)
def test_missing_or_wrong_cloud_settings_fail_before_any_network_call(tmp_path, capsys, monkeypatch, settings, message):
    for name in ("GCP_PROJECT", "GCS_BUCKET", "GCP_REGION", "PIPELINE_IMAGE", "SERVING_IMAGE"):
        monkeypatch.delenv(f"BABYWEIGHT_{name}", raising=False)
    args = [arg for setting in settings for arg in ("--set", setting)]
    assert runner_dataflow.main(args + ["--output", str(tmp_path / "spec.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "spec.json").exists()


def test_unknown_profile_and_local_profile_are_refused(capsys):
    assert runner_dataflow.main(["--profile", "gke"]) == 2
    assert "unknown profile 'gke'" in capsys.readouterr().err
    assert runner_dataflow.main(["--profile", "local"]) == 2
    assert "needs a vertex profile" in capsys.readouterr().err


def test_environment_variables_fill_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("BABYWEIGHT_GCP_PROJECT", "env-project")
    monkeypatch.setenv("BABYWEIGHT_GCS_BUCKET", "gs://env-bucket")
    monkeypatch.setenv("BABYWEIGHT_PIPELINE_IMAGE", IMAGE)
    monkeypatch.setenv("BABYWEIGHT_SERVING_IMAGE", SERVING_IMAGE)
    config = config_lib.load_config("vertex")
    assert (config.gcp_project, config.gcs_bucket) == ("env-project", "gs://env-bucket")
    assert config.pipeline_root == "gs://env-bucket/babyweight/pipeline_root"
    assert config_lib.load_config("vertex", {"gcp_project": "flag-project"}).gcp_project == "flag-project"


@pytest.fixture
def cloud(monkeypatch):
    """Vertex AI and BigQuery faked: what the runner asks of them, in order. Schedules are listed by display name, as
    Vertex's filter does, and each one created is listed from then on."""
    from google.cloud import aiplatform, bigquery

    calls, schedules = [], []

    class FakeState:
        name = "PIPELINE_STATE_SUCCEEDED"

    class FakeSchedule:
        def __init__(self, display_name):
            self.display_name = display_name
            self.resource_name = f"projects/my-project/locations/us-central1/schedules/{len(schedules) + 1}"

        def update(self, **kwargs):
            calls.append(("update_schedule", dict(kwargs, schedule=self.resource_name)))

    class FakePipelineJob:
        resource_name = "projects/my-project/locations/us-central1/pipelineJobs/babyweight-1"
        state = FakeState()

        def __init__(self, **kwargs):
            calls.append(("job", kwargs))

        def submit(self, service_account=None):
            calls.append(("submit", service_account))

        def wait(self):
            calls.append(("wait", None))

        def create_schedule(self, **kwargs):
            calls.append(("create_schedule", kwargs))
            schedules.append(FakeSchedule(kwargs["display_name"]))
            return schedules[-1]

    class FakePipelineJobSchedule:
        @staticmethod
        def list(filter):
            return [schedule for schedule in schedules if filter == f'display_name="{schedule.display_name}"']

    class FakeClient:
        def __init__(self, project):
            calls.append(("bigquery", project))

        def query(self, statement):
            calls.append(("query", statement))
            return types.SimpleNamespace(result=lambda: None)

    monkeypatch.setattr(aiplatform, "init", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(aiplatform, "PipelineJob", FakePipelineJob)
    monkeypatch.setattr(aiplatform, "PipelineJobSchedule", FakePipelineJobSchedule)
    monkeypatch.setattr(bigquery, "Client", FakeClient)
    return calls


def _called(calls, name):
    return [kwargs for called, kwargs in calls if called == name]


def test_submit_hands_the_spec_to_vertex_pipelines_and_waits(tmp_path, cloud, capsys):
    output = tmp_path / "spec.json"
    args = [arg for setting in SETTINGS for arg in ("--set", setting)]
    assert runner_dataflow.main(args + ["--output", str(output), "--submit", "--wait"]) == 0
    assert _called(cloud, "init") == [{"project": "my-project", "location": "us-central1"}]
    [job] = _called(cloud, "job")
    assert job["template_path"] == str(output) and output.is_file()
    assert job["pipeline_root"] == "gs://my-bucket/babyweight/pipeline_root"
    assert _called(cloud, "submit") == ["runner@my-project.iam.gserviceaccount.com"]
    assert _called(cloud, "wait") and "PIPELINE_STATE_SUCCEEDED" in capsys.readouterr().out
    assert not _called(cloud, "create_schedule")


def test_the_run_writes_the_training_table_that_model_monitoring_measures_skew_against(tmp_path, cloud):
    args = [arg for setting in SETTINGS + ["bigquery_row_limit=1000"] for arg in ("--set", setting)]
    assert runner_dataflow.main(args + ["--output", str(tmp_path / "spec.json"), "--submit"]) == 0
    assert _called(cloud, "bigquery") == ["my-project"]
    [statement] = _called(cloud, "query")
    config = config_lib.load_config("vertex", config_lib.parse_overrides(SETTINGS + ["bigquery_row_limit=1000"]))
    # The table the Pusher points Model Monitoring at, made of the Trainer's rows: the train split's query.
    monitored = vertex_pusher.monitoring_config(config)["training_table"]
    assert statement.startswith(f"CREATE OR REPLACE TABLE `{monitored.removeprefix('bq://')}` AS")
    assert pipeline_lib.bigquery_query(config, "train") in statement
    selected = statement.split("SELECT ", 1)[1].split(" FROM", 1)[0].split(", ")
    assert selected == list(features.FEATURE_NAMES) + ["weight_pounds"]
    # Before the run that deploys, so the job can read it.
    assert [name for name, _ in cloud].index("query") < [name for name, _ in cloud].index("submit")


def test_schedule_runs_one_at_a_time_and_queues_and_a_second_updates_it(tmp_path, cloud, capsys):
    args = [arg for setting in SETTINGS for arg in ("--set", setting)] + ["--output", str(tmp_path / "spec.json")]
    assert runner_dataflow.main(args + ["--set", "vertex_schedule_cron=0 3 * * 1", "--schedule"]) == 0
    [schedule] = _called(cloud, "create_schedule")
    assert schedule == {
        "cron": "0 3 * * 1",
        "display_name": "babyweight-schedule",
        "allow_queueing": True,
        "max_concurrent_run_count": 1,
        "service_account": "runner@my-project.iam.gserviceaccount.com",
    }
    assert _called(cloud, "job")[0]["template_path"] == str(tmp_path / "spec.json")
    assert not _called(cloud, "submit")  # scheduling runs nothing now
    assert "scheduled: projects/my-project/locations/us-central1/schedules/1" in capsys.readouterr().out

    assert runner_dataflow.main(args + ["--set", "vertex_schedule_cron=0 4 * * *", "--schedule"]) == 0
    assert len(_called(cloud, "create_schedule")) == 1  # no second schedule
    assert _called(cloud, "update_schedule") == [
        {
            "cron": "0 4 * * *",
            "allow_queueing": True,
            "max_concurrent_run_count": 1,
            "schedule": "projects/my-project/locations/us-central1/schedules/1",
        }
    ]
    assert "the job spec it was created with" in capsys.readouterr().out


def test_schedule_without_a_cron_stops_before_compiling_naming_the_setting(tmp_path, cloud, capsys):
    args = [arg for setting in SETTINGS for arg in ("--set", setting)]
    assert runner_dataflow.main(args + ["--output", str(tmp_path / "spec.json"), "--schedule"]) == 2
    error = capsys.readouterr().err
    assert "--schedule needs vertex_schedule_cron" in error and "BABYWEIGHT_VERTEX_SCHEDULE_CRON" in error
    assert not (tmp_path / "spec.json").exists() and cloud == []


def test_the_pusher_creates_the_endpoint_with_request_response_logging(monkeypatch, caplog):
    """Offline: what the Vertex Pusher's executor asks of Vertex AI before TFX deploys the model."""
    from google.cloud import aiplatform

    from pipeline.components import vertex_pusher

    calls, existing = [], []

    class Endpoint:
        @staticmethod
        def list(filter):
            calls.append(("list", filter))
            return existing

        @staticmethod
        def create(**kwargs):
            calls.append(("create", kwargs))

    monkeypatch.setattr(aiplatform, "init", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(aiplatform, "Endpoint", Endpoint)
    logging_config = {"bq_destination_table": "bq://p.d.t", "sampling_rate": 0.5}
    vertex_pusher.ensure_logging_endpoint("p", "us-central1", "babyweight", logging_config)
    assert calls == [
        ("init", {"project": "p", "location": "us-central1"}),
        ("list", 'display_name="babyweight"'),
        (
            "create",
            {
                "display_name": "babyweight",
                "enable_request_response_logging": True,
                "request_response_logging_sampling_rate": 0.5,
                "request_response_logging_bq_destination_table": "bq://p.d.t",
            },
        ),
    ]
    # An endpoint that already exists without logging is kept, and the run says so.
    existing.append(
        types.SimpleNamespace(
            gca_resource=types.SimpleNamespace(
                predict_request_response_logging_config=types.SimpleNamespace(enabled=False)
            )
        )
    )
    calls.clear()
    vertex_pusher.ensure_logging_endpoint("p", "us-central1", "babyweight", logging_config)
    assert [name for name, _ in calls] == ["init", "list"]
    assert "exists without request-response logging" in caplog.text


def test_bulk_inference_predicts_unlabelled_rows_on_dataflow_after_the_push(tmp_path):
    """With bulk_inference_dir (a gs:// folder of CSV files), the run also predicts them with TFX's BulkInferrer."""
    spec, tasks, executors = _compile(tmp_path, "bulk_inference_dir=gs://my-bucket/unlabelled")
    assert _parameters(tasks["UnlabelledExampleGen"])["input_base"] == "gs://my-bucket/unlabelled"
    inferrer = tasks["BulkInferrer"]
    assert {(name, a["taskOutputArtifact"]["producerTask"]) for name, a in inferrer["inputs"]["artifacts"].items()} == {
        ("examples", "UnlabelledExampleGen"),
        ("model", "Trainer"),
        ("model_blessing", "Evaluator"),
    }
    assert "Pusher" in tasks["UnlabelledExampleGen"]["dependentTasks"]  # nothing of it can hold back the push
    executor = json.dumps(executors[spec["components"][inferrer["componentRef"]["name"]]["executorLabel"]])
    assert "--runner=DataflowRunner" in executor and IMAGE in executor
    assert "BulkInferrer" not in _compile(tmp_path)[1]  # off by default
