"""The one definition of the babyweight pipeline; runners pick an orchestrator and call it."""

import dataclasses
import pathlib
from typing import Any, List

from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from models import features, tuning
from pipeline.artifacts import GATE_ID
from pipeline.cache import CODE_FINGERPRINT, ImportSchemaGen, code_fingerprint, file_fingerprint
from pipeline.components import csv_example_gen, spans, trainer_executor, vertex_pusher
from pipeline.components import evaluator as evaluator_lib
from pipeline.components.baseline import TreeBaseline
from pipeline.components.infra_validator import InfraValidator
from pipeline.components.monitor import PredictionMonitor, PredictionStatistics, PreviousPredictions
from pipeline.components.tflite_export import TFLiteExporter
from pipeline.components.validation import DataGate, DataValidator
from pipeline.config import PROJECT_ROOT, PipelineConfig, parallel_beam_args, parallel_steps

PREPROCESSING_FN = "models.preprocessing.preprocessing_fn"
RUN_FN = "models.model.run_fn"
TUNER_FN = "models.tuning.tuner_fn"
# The project modules the local Trainer runs (pipeline/cache.py hashes them, and what they import, into its key).
TRAINER_MODULES = (RUN_FN.rpartition(".")[0], trainer_executor.__name__)
# The server the InfraValidator starts (`babyweight serve`): its code is part of that step's cache key.
SERVER_MODULES = ("serving.model_server.server", "serving.model_server.app")
# Steps the local runner (pipeline/runner.py) runs with no other beside them: the Tuner and the Trainer seed the
# whole process's random generators (the same data gives the same model), the InfraValidator times the server.
RUN_ALONE = ("Tuner", "Trainer", "InfraValidator")
# Steps it starts only once every step not downstream of them succeeded: a run that fails pushes nothing.
AFTER_ALL = ("Pusher",)


def schema_fingerprint(config: PipelineConfig) -> str:
    """Hash of the schema the run imports: the file itself, or for Vertex (where the path is inside the
    pipeline image, which the Dockerfile builds from this project) the project's copy of it."""
    path = pathlib.Path(config.schema_path)
    if config.orchestrator == "vertex" and not path.is_file():
        path = PROJECT_ROOT / "schema" / path.name
    return file_fingerprint(path)


def bigquery_query(config: PipelineConfig, split: str) -> str:
    """The query of one split: the table's columns, typed as in a CSV export, split by year and month.

    Births of one month all go to the same split (a hash of year and month), so the split is stable
    across runs and no near-duplicate rows of one month straddle train and eval.
    """
    casts = {"int": "SAFE_CAST({0} AS INT64)", "float": "CAST({0} AS FLOAT64)", "string": "CAST({0} AS STRING)"}
    columns = ",\n  ".join(f"{casts[c.dtype].format(c.name)} AS {c.name}" for c in features.COLUMNS)
    buckets = config.train_hash_buckets + config.eval_hash_buckets
    condition = f"< {config.train_hash_buckets}" if split == "train" else f">= {config.train_hash_buckets}"
    limit = f"\nLIMIT {config.bigquery_row_limit}" if config.bigquery_row_limit else ""
    return (
        f"SELECT\n  {columns}\nFROM `{config.bigquery_table}`\n"
        f"WHERE MOD(ABS(FARM_FINGERPRINT(CONCAT(CAST(year AS STRING), '-', CAST(month AS STRING)))), "
        f"{buckets}) {condition}{limit}"
    )


def example_gen_component(config: PipelineConfig) -> tfx.types.BaseNode:
    """Local: the CSV files of config.data_dir, split train/eval by hash. Vertex: BigQuery, split by query."""
    if config.orchestrator == "vertex":
        return tfx.extensions.google_cloud_big_query.BigQueryExampleGen(
            input_config=tfx.proto.Input(
                splits=[
                    tfx.proto.Input.Split(name=split, pattern=bigquery_query(config, split))
                    for split in ("train", "eval")
                ]
            )
        )
    return csv_example_gen.CsvExampleGen(
        input_base=config.data_dir,
        code_fingerprint=code_fingerprint(csv_example_gen.__name__),
        input_config=tfx.proto.Input(splits=[tfx.proto.Input.Split(name="all", pattern=config.input_pattern)]),
        # input_span pins the span (TFX's static range); else the driver reads the newest
        range_config=(
            tfx.proto.RangeConfig(
                static_range=tfx.proto.StaticRange(
                    start_span_number=config.input_span, end_span_number=config.input_span
                )
            )
            if config.input_span >= 0
            else None
        ),
        output_config=tfx.proto.Output(
            split_config=tfx.proto.SplitConfig(
                splits=[
                    tfx.proto.SplitConfig.Split(name="train", hash_buckets=config.train_hash_buckets),
                    tfx.proto.SplitConfig.Split(name="eval", hash_buckets=config.eval_hash_buckets),
                ]
            )
        ),
    )


def _vertex_job_spec(config: PipelineConfig) -> dict:
    """The Vertex AI custom job the Trainer runs as (and each of the Tuner's workers): the pipeline image on the
    trainer machine, a chief plus workers for MultiWorkerMirroredStrategy."""
    machine_spec = {"machine_type": config.trainer_machine_type}
    if config.trainer_accelerator_type:
        machine_spec.update(
            accelerator_type=config.trainer_accelerator_type, accelerator_count=config.trainer_accelerator_count
        )
    pool = {"machine_spec": machine_spec, "replica_count": 1, "container_spec": {"image_uri": config.pipeline_image}}
    job_spec = {"worker_pool_specs": [pool]}
    if config.trainer_replica_count > 1:  # MultiWorkerMirroredStrategy: a chief plus workers
        job_spec["worker_pool_specs"].append(dict(pool, replica_count=config.trainer_replica_count - 1))
    if config.service_account:
        job_spec["service_account"] = config.service_account
    return job_spec


def trainer_component(config: PipelineConfig, **inputs) -> tfx.types.BaseNode:
    """Local: TFX's Trainer in this process, told each file's span. Vertex: a Vertex AI custom job."""
    custom_config = model_config(config)
    if config.orchestrator != "vertex":
        return tfx.components.Trainer(
            run_fn=RUN_FN,
            custom_config=custom_config,
            custom_executor_spec=executor_spec.ExecutorClassSpec(trainer_executor.SpanAwareTrainerExecutor),
            **inputs,
        )
    vertex = tfx.extensions.google_cloud_ai_platform
    custom_config.update(
        {
            vertex.ENABLE_VERTEX_KEY: True,
            vertex.VERTEX_REGION_KEY: config.gcp_region,
            vertex.TRAINING_ARGS_KEY: dict(_vertex_job_spec(config), project=config.gcp_project),
        }
    )
    return vertex.Trainer(run_fn=RUN_FN, custom_config=custom_config, **inputs)


def tuner_component(config: PipelineConfig, **inputs) -> tfx.types.BaseNode:
    """TFX's Tuner with models/tuning.py's search. Local: in this process, one trial at a time, told each file's
    span. Vertex: a Vertex AI custom job of `tuner_parallel_trials` workers, Vertex AI Vizier suggesting trials."""
    custom_config = dict(
        model_config(config),
        **{
            CODE_FINGERPRINT: code_fingerprint(TUNER_FN.rpartition(".")[0], trainer_executor.__name__),
            tuning.TRIALS_KEY: config.tuner_trials,
        },
    )
    if config.orchestrator != "vertex":
        return trainer_executor.SpanAwareTuner(tuner_fn=TUNER_FN, custom_config=custom_config, **inputs).with_id(
            "Tuner"
        )
    vertex = tfx.extensions.google_cloud_ai_platform
    # Each worker of the tuning job runs trials of its own, on its machine's devices.
    job_spec = _vertex_job_spec(dataclasses.replace(config, trainer_replica_count=1))
    if config.strategy == "multi_worker_mirrored":
        custom_config["strategy"] = "mirrored"
    custom_config.update(
        {
            vertex.ENABLE_VERTEX_KEY: True,
            vertex.VERTEX_REGION_KEY: config.gcp_region,
            vertex.experimental.TUNING_ARGS_KEY: {"project": config.gcp_project, "job_spec": job_spec},
            tuning.VIZIER_KEY: {
                "project": config.gcp_project,
                "region": config.gcp_region,
                "study_prefix": f"{config.pipeline_name}_tuner",
            },
        }
    )
    return vertex.Tuner(
        tuner_fn=TUNER_FN,
        custom_config=custom_config,
        tune_args=tfx.proto.TuneArgs(num_parallel_trials=config.tuner_parallel_trials),
        **inputs,
    )


def pusher_component(config: PipelineConfig, **inputs) -> tfx.types.BaseNode:
    """Local: versioned folders under serving_dir. Vertex: a Vertex AI model deployed to an endpoint."""
    if config.orchestrator != "vertex":
        return tfx.components.Pusher(
            push_destination=tfx.proto.PushDestination(
                filesystem=tfx.proto.PushDestination.Filesystem(base_directory=config.serving_dir)
            ),
            **inputs,
        )
    vertex = tfx.extensions.google_cloud_ai_platform
    return vertex_pusher.Pusher(
        custom_config={
            vertex.ENABLE_VERTEX_KEY: True,
            vertex.VERTEX_REGION_KEY: config.gcp_region,
            # This project's server (serving/Dockerfile): it honours Vertex's AIP_* variables.
            vertex.VERTEX_CONTAINER_IMAGE_URI_KEY: config.serving_image,
            vertex.SERVING_ARGS_KEY: {
                "project_id": config.gcp_project,
                "endpoint_name": config.vertex_endpoint_name,
                "machine_type": config.serving_machine_type,
                "min_replica_count": config.serving_min_replicas,  # Vertex autoscales between the two
                "max_replica_count": config.serving_max_replicas,
            },
            vertex_pusher.REQUEST_LOGGING_KEY: {
                "bq_destination_table": vertex_pusher.request_log_table(config),
                "sampling_rate": config.serving_log_sampling_rate,
            },
            # Model Monitoring of the endpoint after the deploy, with the schema's skew and drift thresholds.
            vertex_pusher.MONITORING_KEY: vertex_pusher.monitoring_config(config),
        },
        **inputs,
    )


PREDICTED_COLUMN = "predicted_weight_pounds"  # the feature BulkInferrer adds to each unlabelled example
UNLABELLED_SPLIT = "unlabelled"


def bulk_inference_components(
    config: PipelineConfig, model: Any, blessing: Any, after: tfx.types.BaseNode
) -> List[tfx.types.BaseNode]:
    """The unlabelled rows of bulk_inference_dir, predicted by the run's model if the Evaluator blessed it (TFX's
    BulkInferrer, through its serving_default signature): tf.Examples with a `predicted_weight_pounds` feature,
    so a scheduled run also delivers a batch of predictions. Rows lacking a required feature are left out (the
    model refuses them); reading the rows waits for `after` (the push), so no failure here holds a model back.
    BulkInferrer takes TFX's ModelBlessing only: a model the infra validation refused still predicts the rows."""
    unlabelled = csv_example_gen.UnlabelledCsvExampleGen(
        input_base=config.bulk_inference_dir,
        code_fingerprint=code_fingerprint(csv_example_gen.__name__),
        input_config=tfx.proto.Input(splits=[tfx.proto.Input.Split(name=UNLABELLED_SPLIT, pattern="*.csv")]),
        output_config=tfx.proto.Output(),
    ).with_id("UnlabelledExampleGen")
    inferrer = tfx.components.BulkInferrer(
        examples=unlabelled.outputs["examples"],
        model=model,
        model_blessing=blessing,
        data_spec=tfx.proto.DataSpec(example_splits=[UNLABELLED_SPLIT]),
        model_spec=tfx.proto.ModelSpec(model_signature_name=["serving_default"]),
        output_example_spec=tfx.proto.OutputExampleSpec(
            output_columns_spec=[
                tfx.proto.OutputColumnsSpec(
                    predict_output=tfx.proto.PredictOutput(
                        output_columns=[
                            tfx.proto.PredictOutputCol(output_key="predictions", output_column=PREDICTED_COLUMN)
                        ]
                    )
                )
            ]
        ),
    )
    unlabelled.add_upstream_node(after)  # its input's problems, too, come after the push
    return [unlabelled, inferrer]


def create_pipeline(config: PipelineConfig, input_rows: int = 0) -> tfx.dsl.Pipeline:
    """Wires ExampleGen -> statistics, schema, validation and gate -> Transform -> (Tuner ->) Trainer -> Evaluator ->
    InfraValidator -> Pusher -> TFLiteExporter (and, with bulk_inference_dir, the blessed model's predictions of
    unlabelled rows).

    Each run ingests the newest span. Locally, validation compares it with the previous validated span
    and Transform and Trainer read the last `training_window_spans` validated spans, all resolved from
    ML Metadata; on Vertex (whose compiler takes only TFX's built-in resolvers) they read the new data.
    The orchestrator also picks where ExampleGen reads, where the Trainer runs and where the Pusher pushes.
    `input_rows` (the new span's, from the CSV check) picks how the local Beam steps run (config.parallel_steps).
    """
    local = config.orchestrator != "vertex"
    example_gen = example_gen_component(config)
    schema_importer = ImportSchemaGen(schema_file=config.schema_path, schema_fingerprint=schema_fingerprint(config))
    # With the schema, TFDV describes coded integer categories (is_categorical) by their values.
    statistics_gen = tfx.components.StatisticsGen(
        examples=example_gen.outputs["examples"], schema=schema_importer.outputs["schema"]
    )
    components: List[tfx.types.BaseNode] = [example_gen, schema_importer, statistics_gen]

    baseline = {}
    if local:
        previous = tfx.dsl.Resolver(
            strategy_class=spans.PreviousValidatedSpan,
            config={"pipeline_name": config.pipeline_name, "gate_id": GATE_ID},
            examples=example_gen.outputs["examples"],
            statistics=statistics_gen.outputs["statistics"],
        ).with_id("previous_validated_span")
        components.append(previous)
        baseline = {
            "previous_examples": previous.outputs["examples"],
            "previous_statistics": previous.outputs["statistics"],
        }
    validator = DataValidator(
        examples=example_gen.outputs["examples"],
        statistics=statistics_gen.outputs["statistics"],
        schema=schema_importer.outputs["schema"],
        warning_checks=",".join(config.warning_checks),
        min_imputed_presence=config.min_imputed_presence,
        min_drift_rows=config.min_drift_rows,
        code_fingerprint=code_fingerprint(DataValidator.__module__),
        **baseline,
    )
    gate = DataGate(
        anomalies=validator.outputs["anomalies"],
        statistics=statistics_gen.outputs["statistics"],
        examples=example_gen.outputs["examples"],
        code_fingerprint=code_fingerprint(DataGate.__module__),
    ).with_id(GATE_ID)
    components += [validator, gate]

    if local:
        training_window = tfx.dsl.Resolver(
            strategy_class=spans.ValidatedSpanWindow,
            config={"pipeline_name": config.pipeline_name, "gate_id": GATE_ID, "spans": config.training_window_spans},
            examples=example_gen.outputs["examples"],
        ).with_id("training_window")
        training_window.add_upstream_node(gate)
        components.append(training_window)
        training_examples = training_window.outputs["examples"]
    else:
        training_examples = example_gen.outputs["examples"]

    transform = tfx.components.Transform(
        examples=training_examples,
        schema=schema_importer.outputs["schema"],
        preprocessing_fn=PREPROCESSING_FN,
        custom_config={CODE_FINGERPRINT: code_fingerprint(PREPROCESSING_FN.rpartition(".")[0])},
        # The Trainer applies the transform graph to the raw examples of each span, weighted by the
        # span's age; StatisticsGen already describes the raw data.
        materialize=False,
        disable_statistics=True,
        # TFT's per-span analyzer cache is read by no later run here; writing it made Transform's time grow with
        # the window's spans (22 s for three small spans, 9 s without it).
        disable_analyzer_cache=True,
        force_tf_compat_v1=True,
    )
    transform.add_upstream_node(gate)

    model_inputs = dict(
        examples=training_examples,
        transform_graph=transform.outputs["transform_graph"],
        schema=schema_importer.outputs["schema"],
        train_args=tfx.proto.TrainArgs(splits=["train"]),
        # The Tuner's trials validate on rows held out of the train split (models/tuning.py), never on eval.
        eval_args=tfx.proto.EvalArgs(splits=["eval"]),
    )
    if config.tuning:
        tuner = tuner_component(config, **model_inputs)
        components.append(tuner)
        model_inputs["hyperparameters"] = tuner.outputs["best_hyperparameters"]
    trainer = trainer_component(config, **model_inputs)

    # Gradient-boosted trees and the training mean on the Trainer's rows, scored on the Evaluator's.
    tree_baseline = TreeBaseline(
        training_examples=training_examples,
        examples=example_gen.outputs["examples"],
        recency_half_life_spans=config.recency_half_life_spans,
        code_fingerprint=code_fingerprint(TreeBaseline.__module__),
    )
    tree_baseline.add_upstream_node(gate)

    model_resolver = tfx.dsl.Resolver(
        # Vertex compiles only TFX's own strategies; see spans.LatestBlessedScorableModel for what that misses.
        strategy_class=spans.LatestBlessedScorableModel if local else tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")

    evaluator_class = evaluator_lib.Evaluator if config.evaluator_engine == "batched" else tfx.components.Evaluator
    evaluator = evaluator_class(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=model_resolver.outputs["model"],
        eval_config=evaluator_lib.eval_config(config),
    )

    previous_run = {}
    if local:
        # The previous run's record: resolved before this run's monitor writes its own.
        previous_predictions = tfx.dsl.Resolver(
            strategy_class=PreviousPredictions, predictions=tfx.dsl.Channel(type=PredictionStatistics)
        ).with_id("previous_predictions")
        components.append(previous_predictions)
        previous_run["previous"] = previous_predictions.outputs["predictions"]
    monitor = PredictionMonitor(
        model=trainer.outputs["model"],
        examples=example_gen.outputs["examples"],
        shift_threshold=config.prediction_shift_threshold,
        code_fingerprint=code_fingerprint(PredictionMonitor.__module__),
        **previous_run,
    )

    # The Evaluator-blessed candidate served by the project's own server: it loads, answers, fits the budget.
    infra_validator = InfraValidator(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        examples=example_gen.outputs["examples"],
        schema=schema_importer.outputs["schema"],
        eval_requests=config.infra_eval_requests,
        max_memory_mb=config.infra_max_memory_mb,
        max_p99_ms=config.infra_max_p99_ms,
        load_timeout_seconds=config.infra_load_timeout_seconds,
        code_fingerprint=code_fingerprint(InfraValidator.__module__, *SERVER_MODULES),
    )

    pusher = pusher_component(
        config,
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        infra_blessing=infra_validator.outputs["blessing"],
    )

    # The pushed model for devices: TFLite models beside the SavedModel, checked against it
    # (pipeline/components/tflite_export.py).
    tflite_exporter = TFLiteExporter(
        model=trainer.outputs["model"],
        pushed_model=pusher.outputs["pushed_model"],
        examples=example_gen.outputs["examples"],
        code_fingerprint=code_fingerprint(TFLiteExporter.__module__),
    )

    components += [
        transform,
        trainer,
        tree_baseline,
        model_resolver,
        evaluator,
        monitor,
        infra_validator,
        pusher,
        tflite_exporter,
    ]
    if config.bulk_inference_dir:
        components += bulk_inference_components(
            config, trainer.outputs["model"], evaluator.outputs["blessing"], after=pusher
        )
    parallel = parallel_beam_args(config, input_rows)
    for component in components:
        if parallel and component.id in parallel_steps(config):
            component.with_beam_pipeline_args(parallel)
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=config.pipeline_root,
        components=components,
        enable_cache=config.enable_cache,
        # Vertex Pipelines records runs in Vertex ML Metadata by itself.
        metadata_connection_config=None
        if config.orchestrator == "vertex"
        else tfx.orchestration.metadata.sqlite_metadata_connection_config(config.metadata_path),
        beam_pipeline_args=config.beam_pipeline_args(),
    )


def model_config(config: PipelineConfig) -> dict:
    """Hyperparameters handed to `run_fn` through the Trainer's custom_config, and its code's fingerprint."""
    return {
        CODE_FINGERPRINT: code_fingerprint(*TRAINER_MODULES),
        "seed": config.seed,
        "strategy": config.strategy,
        "tpu_address": config.tpu_address,
        "train_epochs": config.train_epochs,
        "min_train_steps": config.min_train_steps,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "hidden_units": list(config.hidden_units),
        "embedding_dim": config.embedding_dim,
        "mask_rate": config.mask_rate,
        "recency_half_life_spans": config.recency_half_life_spans,
    }
