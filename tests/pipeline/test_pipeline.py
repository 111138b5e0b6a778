"""The pipeline definition: components, their wiring and the settings they get from config."""

import json
import shutil

import pytest

from pipeline import cache
from pipeline import config as config_lib
from pipeline import pipeline as pipeline_lib
from pipeline.components import csv_example_gen


def _components(config):
    return {component.id: component for component in pipeline_lib.create_pipeline(config).components}


def test_one_definition_wires_every_component():
    components = _components(config_lib.load_config())
    assert set(components) == {
        "CsvExampleGen",
        "StatisticsGen",
        "ImportSchemaGen",
        "previous_validated_span",
        "DataValidator",
        "DataGate",
        "training_window",
        "Transform",
        "Trainer",
        "TreeBaseline",
        "latest_blessed_model_resolver",
        "Evaluator",
        "previous_predictions",
        "PredictionMonitor",
        "InfraValidator",
        "Pusher",
        "TFLiteExporter",
    }
    # The Pusher needs both blessings: the Evaluator's, and the InfraValidator's of the same model.
    assert components["Pusher"].inputs["model_blessing"] is components["Evaluator"].outputs["blessing"]
    assert components["Pusher"].inputs["infra_blessing"] is components["InfraValidator"].outputs["blessing"]
    assert components["InfraValidator"].inputs["model"] is components["Pusher"].inputs["model"]
    assert components["InfraValidator"].inputs["model_blessing"] is components["Evaluator"].outputs["blessing"]
    # The TFLite models are made of the model the Pusher pushed, after the push (nothing of them holds it back).
    assert components["TFLiteExporter"].inputs["model"] is components["Pusher"].inputs["model"]
    assert components["TFLiteExporter"].inputs["pushed_model"] is components["Pusher"].outputs["pushed_model"]
    assert "DataGate" in {node.id for node in components["Transform"].upstream_nodes}
    # No analyzer cache: nothing reads one, and writing it cost Transform seconds per span of the window.
    assert "updated_analyzer_cache" not in components["Transform"].outputs
    assert "DataGate" in {node.id for node in components["training_window"].upstream_nodes}
    assert components["Trainer"].inputs["examples"] is components["training_window"].outputs["examples"]
    # The trees learn from the Trainer's rows and are scored on the Evaluator's.
    assert components["TreeBaseline"].inputs["training_examples"] is components["Trainer"].inputs["examples"]
    assert components["TreeBaseline"].inputs["examples"] is components["Evaluator"].inputs["examples"]


def test_config_reaches_the_components():
    config = config_lib.load_config(
        overrides={"train_hash_buckets": "9", "strategy": "mirrored", "output_dir": "/tmp/somewhere"}
    )
    components = _components(config)
    assert '"hash_buckets": 9' in components["CsvExampleGen"].exec_properties["output_config"]
    trainer_config = json.loads(components["Trainer"].exec_properties["custom_config"])
    assert trainer_config["strategy"] == "mirrored"
    assert components["DataValidator"].exec_properties["warning_checks"] == ""
    warned = _components(config_lib.load_config(overrides={"warning_checks": "drift,unexpected"}))
    assert warned["DataValidator"].exec_properties["warning_checks"] == "drift,unexpected"
    assert "/tmp/somewhere/serving_model" in str(components["Pusher"].exec_properties["push_destination"])
    assert components["CsvExampleGen"].executor_spec.executor_class is csv_example_gen.Executor
    assert components["InfraValidator"].exec_properties["max_memory_mb"] == config.infra_max_memory_mb
    tuned = _components(
        config_lib.load_config(
            overrides={"min_imputed_presence": "0.35", "min_drift_rows": "5000", "infra_max_p99_ms": "7"}
        )
    )
    assert tuned["InfraValidator"].exec_properties["max_p99_ms"] == 7
    assert tuned["DataValidator"].exec_properties["min_imputed_presence"] == 0.35
    assert tuned["DataValidator"].exec_properties["min_drift_rows"] == 5000


def _copy_of_the_project(tmp_path):
    for package in cache.PROJECT_PACKAGES:
        shutil.copytree(cache.PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    "edited, changes, keeps",
    [
        (
            "pipeline/components/checks.py",
            ["pipeline.components.validation"],
            ["models.preprocessing", "pipeline.components.csv_example_gen"],
        ),
        ("pipeline/components/csv_check.py", ["pipeline.components.csv_example_gen"], ["models.preprocessing"]),
        ("models/features.py", ["models.preprocessing", "models.model", "pipeline.components.baseline"], []),
        (
            "pipeline/reports/report.py",
            [],
            [
                "pipeline.components.validation",
                "models.model",
                "pipeline.components.monitor",
                "pipeline.components.baseline",
            ],
        ),
        # The monitor records its slices by these names; the report's plots and the history page run no step.
        (
            "pipeline/reports/slices.py",
            ["pipeline.components.monitor"],
            ["models.model", "pipeline.components.validation"],
        ),
        (
            "pipeline/reports/plots.py",
            [],
            ["pipeline.components.monitor", "models.model", "pipeline.components.validation"],
        ),
        # The metadata reader of the commands and the resolvers run no step: the Trainer and validator keep their keys.
        (
            "pipeline/metadata/mlmd.py",
            [],
            ["models.model", "pipeline.components.trainer_executor", "pipeline.components.validation"],
        ),
        (
            "pipeline/components/spans.py",
            [],
            ["models.model", "pipeline.components.trainer_executor", "pipeline.components.validation"],
        ),
        # The search space reruns the Tuner (and through its output the Trainer), not the Trainer's own key.
        ("models/tuning.py", ["models.tuning"], ["models.model", "pipeline.components.trainer_executor"]),
        ("models/model.py", ["models.tuning", "models.model"], ["models.preprocessing"]),
        # The server the InfraValidator starts is part of its key, and of no other step's.
        (
            "serving/core/batching.py",
            ["serving.model_server.app"],
            ["pipeline.components.infra_validator", "models.model", "pipeline.components.monitor"],
        ),
    ],
)
def test_a_code_change_changes_the_fingerprint_of_the_steps_that_run_it(tmp_path, edited, changes, keeps):
    """Modules imported by a step's module count too (pipeline/components/checks.py by
    pipeline/components/validation.py)."""
    root = _copy_of_the_project(tmp_path)
    before = {module: cache.code_fingerprint(module, root=root) for module in changes + keeps}
    assert before == {module: cache.code_fingerprint(module) for module in before}
    (root / edited).write_text((root / edited).read_text() + "\n# a change\n")
    after = {module: cache.code_fingerprint(module, root=root) for module in before}
    assert [m for m in before if before[m] != after[m]] == changes


def test_every_step_running_project_code_has_its_fingerprint():
    components = _components(config_lib.load_config())
    for step, modules in {
        "DataValidator": ["pipeline.components.validation"],
        "DataGate": ["pipeline.components.validation"],
        "TreeBaseline": ["pipeline.components.baseline"],
        "PredictionMonitor": ["pipeline.components.monitor"],
        "InfraValidator": ["pipeline.components.infra_validator", *pipeline_lib.SERVER_MODULES],
        "TFLiteExporter": ["pipeline.components.tflite_export"],
    }.items():
        assert components[step].exec_properties["code_fingerprint"] == cache.code_fingerprint(*modules), step
    # The server's modules are found (a misspelt name would hash nothing of the server).
    hashed = {
        path.relative_to(cache.PROJECT_ROOT).as_posix() for path in cache.project_modules(pipeline_lib.SERVER_MODULES)
    }
    assert {
        "serving/model_server/server.py",
        "serving/model_server/app.py",
        "serving/core/loader.py",
        "serving/core/batching.py",
    } <= hashed
    custom = {step: json.loads(components[step].exec_properties["custom_config"]) for step in ("Transform", "Trainer")}
    example_gen = json.loads(components["CsvExampleGen"].exec_properties["custom_config"])["custom_config"]
    assert example_gen["value"] == cache.code_fingerprint("pipeline.components.csv_example_gen")
    assert custom["Transform"]["code_fingerprint"] == cache.code_fingerprint("models.preprocessing")
    assert custom["Trainer"]["code_fingerprint"] == cache.code_fingerprint(
        "models.model", "pipeline.components.trainer_executor"
    )


def test_the_tuned_profile_tunes_on_the_trainer_s_inputs_and_the_trainer_takes_the_best_values():
    plain = _components(config_lib.load_config())
    assert "Tuner" not in plain and "hyperparameters" not in plain["Trainer"].inputs
    components = _components(config_lib.load_config("tuned", {"tuner_trials": "5"}))
    tuner, trainer = components["Tuner"], components["Trainer"]
    assert trainer.inputs["hyperparameters"] is tuner.outputs["best_hyperparameters"]
    for key in ("examples", "transform_graph", "schema"):
        assert tuner.inputs[key] is trainer.inputs[key], key
    assert tuner.inputs["examples"] is components["training_window"].outputs["examples"]
    assert tuner.exec_properties["tuner_fn"] == pipeline_lib.TUNER_FN
    custom = json.loads(tuner.exec_properties["custom_config"])
    assert custom["tuner_trials"] == 5 and "vizier" not in custom
    assert custom["code_fingerprint"] == cache.code_fingerprint("models.tuning", "pipeline.components.trainer_executor")
    # The trials train as the Trainer does: the same settings, but for the search's own.
    trainer_custom = json.loads(trainer.exec_properties["custom_config"])
    assert {k: v for k, v in custom.items() if k not in ("tuner_trials", "code_fingerprint")} == {
        k: v for k, v in trainer_custom.items() if k != "code_fingerprint"
    }
    assert tuner.executor_spec.executor_class.__name__ == "SpanAwareTunerExecutor"
    with pytest.raises(config_lib.ConfigError, match="parallel trials run on Vertex AI only"):
        config_lib.load_config("tuned", {"tuner_parallel_trials": "2"})
    with pytest.raises(config_lib.ConfigError, match="tuner_trials must be at least 1"):
        config_lib.load_config("tuned", {"tuner_trials": "0"})


def test_the_schema_file_s_contents_are_in_the_cache_key(tmp_path):
    shutil.copy(cache.PROJECT_ROOT / "schema" / "schema.pbtxt", tmp_path / "schema.pbtxt")
    config = config_lib.load_config(overrides={"schema_dir": str(tmp_path)})
    before = _components(config)["ImportSchemaGen"].exec_properties["schema_fingerprint"]
    assert before == cache.file_fingerprint(cache.PROJECT_ROOT / "schema" / "schema.pbtxt")
    (tmp_path / "schema.pbtxt").write_text((tmp_path / "schema.pbtxt").read_text().replace("max: 64", "max: 20"))
    assert _components(config)["ImportSchemaGen"].exec_properties["schema_fingerprint"] != before


@pytest.mark.parametrize("rows, parallel", [(20_000, False), (99_999, False), (100_000, True), (1_000_000, True)])
@pytest.mark.parametrize("engine, steps", [("batched", {"StatisticsGen"}), ("tfma", {"StatisticsGen", "Evaluator"})])
def test_large_inputs_run_statistics_and_tfmas_evaluation_in_worker_processes(rows, parallel, engine, steps):
    config = config_lib.load_config(overrides={"evaluator_engine": engine})
    assert config.beam_parallel_rows == 100_000 and set(config_lib.parallel_steps(config)) == steps
    components = pipeline_lib.create_pipeline(config, input_rows=rows).components
    for component in components:
        modes = [
            arg
            for arg in getattr(component.executor_spec, "beam_pipeline_args", [])
            if arg.startswith("--direct_running_mode=")
        ]
        in_workers = modes[-1:] == ["--direct_running_mode=multi_processing"]  # Beam takes the last one
        assert in_workers == (parallel and component.id in steps), component.id
    assert {c.id for c in components} >= steps
    never = config_lib.load_config(overrides={"beam_parallel_rows": "0"})
    assert config_lib.parallel_beam_args(never, rows) == []
    with pytest.raises(config_lib.ConfigError, match="beam_parallel_rows"):
        config_lib.load_config(overrides={"beam_parallel_rows": "-1"})


def test_input_span_pins_example_gen_to_one_span_with_tfxs_static_range(tmp_path):
    (tmp_path / "span-4").mkdir()
    newest = _components(config_lib.load_config(overrides={"data_dir": str(tmp_path)}))["CsvExampleGen"]
    assert not newest.exec_properties.get("range_config")  # the driver reads the newest span
    pinned = _components(config_lib.load_config(overrides={"data_dir": str(tmp_path), "input_span": "4"}))
    range_config = json.loads(pinned["CsvExampleGen"].exec_properties["range_config"])
    assert range_config == {"static_range": {"start_span_number": 4, "end_span_number": 4}}
