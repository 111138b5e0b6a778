"""The pipeline definition: components, their wiring and the settings they get from config."""
import json
import shutil

from pipeline import config as config_lib
from pipeline import csv_example_gen
from pipeline import pipeline as pipeline_lib


def _components(config):
    return {component.id: component for component in pipeline_lib.create_pipeline(config).components}


def test_one_definition_wires_every_component():
    components = _components(config_lib.load_config())
    assert set(components) == {
        "CsvExampleGen", "StatisticsGen", "ImportSchemaGen", "previous_validated_span", "DataValidator", "DataGate",
        "training_window", "Transform", "Trainer", "TreeBaseline", "latest_blessed_model_resolver", "Evaluator",
        "previous_predictions", "PredictionMonitor", "Pusher"}
    assert "DataGate" in {node.id for node in components["Transform"].upstream_nodes}
    assert "DataGate" in {node.id for node in components["training_window"].upstream_nodes}
    assert components["Trainer"].inputs["examples"] is components["training_window"].outputs["examples"]
    # The trees learn from the Trainer's rows and are scored on the Evaluator's.
    assert components["TreeBaseline"].inputs["training_examples"] is components["Trainer"].inputs["examples"]
    assert components["TreeBaseline"].inputs["examples"] is components["Evaluator"].inputs["examples"]


def test_config_reaches_the_components():
    config = config_lib.load_config(overrides={"train_hash_buckets": "9", "strategy": "mirrored",
                                               "output_dir": "/tmp/somewhere"})
    components = _components(config)
    assert '"hash_buckets": 9' in components["CsvExampleGen"].exec_properties["output_config"]
    trainer_config = json.loads(components["Trainer"].exec_properties["custom_config"])
    assert trainer_config["strategy"] == "mirrored"
    assert components["DataValidator"].exec_properties["warning_checks"] == ""
    warned = _components(config_lib.load_config(overrides={"warning_checks": "drift,unexpected"}))
    assert warned["DataValidator"].exec_properties["warning_checks"] == "drift,unexpected"
    assert "/tmp/somewhere/serving_model" in str(components["Pusher"].exec_properties["push_destination"])
    assert components["CsvExampleGen"].executor_spec.executor_class is csv_example_gen.Executor
    tuned = _components(config_lib.load_config(overrides={"min_imputed_presence": "0.35", "min_drift_rows": "5000"}))
    assert tuned["DataValidator"].exec_properties["min_imputed_presence"] == 0.35
    assert tuned["DataValidator"].exec_properties["min_drift_rows"] == 5000


def test_model_code_changes_change_the_cache_key(tmp_path):
    package = tmp_path / "models"
    shutil.copytree(pipeline_lib.MODELS_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = pipeline_lib.code_fingerprint(package)
    assert before == pipeline_lib.code_fingerprint(pipeline_lib.MODELS_DIR)
    (package / "model.py").write_text((package / "model.py").read_text() + "\n# a change\n")
    assert pipeline_lib.code_fingerprint(package) != before
    components = _components(config_lib.load_config())
    for component_id in ("Transform", "Trainer"):
        assert json.loads(components[component_id].exec_properties["custom_config"])["code_fingerprint"] == before
