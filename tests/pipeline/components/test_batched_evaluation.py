"""The batched Evaluator against TFMA, its oracle: on the real export's eval rows and the model trained on them, both
engines run TFX's Evaluator executor; every metric of every slice, the validation and the blessing must agree."""

import dataclasses
import os
import pathlib
from typing import Dict, Optional

import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from google.protobuf import text_format
from tensorflow_model_analysis.writers import metrics_plots_and_validations_writer

from pipeline.components import evaluator as evaluator_lib
from pipeline.components.evaluation import batched as batched_evaluation
from pipeline.components.evaluation import tfma_metrics


def _shifted(model_dir: str, folder: pathlib.Path, offset: float) -> str:
    """A second model: the trained one's predictions plus `offset` pounds, its transform unchanged."""
    model = tf.saved_model.load(os.path.join(model_dir, "Format-Serving"))

    class Shifted(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def score(self, examples):
            return {"predictions": self.model.signatures["score_examples"](examples=examples)["predictions"] + offset}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def transform(self, examples):
            return self.model.signatures["transform_features"](examples=examples)

    shifted = Shifted()
    tf.saved_model.save(
        shifted,
        str(folder / "Format-Serving"),
        signatures={"score_examples": shifted.score, "transform_features": shifted.transform},
    )
    return str(folder)


@dataclasses.dataclass
class Outcome:
    metrics: Dict  # slice -> {metric key (TFMA's proto, as text): value}
    validation: tfma.ValidationResult
    blessed: bool
    computed_by: str


def _evaluate(engine: str, folder: pathlib.Path, examples: str, model: str, baseline: Optional[str], config) -> Outcome:
    ran = evaluator_lib.evaluate(
        engine,
        examples,
        model,
        baseline,
        evaluator_lib.eval_config(config),
        str(folder),
        ["--direct_running_mode=in_memory"],
    )
    assert tfma.load_eval_result(ran["evaluation"]).slicing_metrics  # what users and TFMA's views read
    metrics = {
        text_format.MessageToString(per_slice.slice_key, as_one_line=True): {
            # Every key whole: model name (candidate, baseline), weighting and diff included.
            text_format.MessageToString(entry.key, as_one_line=True): entry.value.double_value.value
            for entry in per_slice.metric_keys_and_values
        }
        for per_slice in metrics_plots_and_validations_writer.load_and_deserialize_metrics(
            os.path.join(ran["evaluation"], "metrics")
        )
    }
    return Outcome(metrics, tfma.load_validation_result(ran["evaluation"]), ran["blessed"], ran["computed_by"])


def _assert_same(ours: Outcome, tfma_outcome: Outcome) -> None:
    assert (ours.computed_by, tfma_outcome.computed_by) == ("batched", "tfma")  # not TFMA against itself
    assert sorted(ours.metrics) == sorted(tfma_outcome.metrics)
    assert len(tfma_outcome.metrics) >= 12  # overall, is_male, plurality and the gestation buckets
    for slice_key, expected in tfma_outcome.metrics.items():
        found = ours.metrics[slice_key]
        assert sorted(found) == sorted(expected), slice_key
        for key, value in expected.items():
            # A diff is the difference of nearly equal numbers: compared with the tolerance of the numbers it
            # comes from.
            scale = 1.0 if "is_diff: true" in key else abs(value)
            assert abs(found[key] - value) <= 1e-6 * max(scale, 1e-12), (slice_key, key, found[key], value)
    assert ours.blessed == tfma_outcome.blessed
    assert ours.validation.validation_ok == tfma_outcome.validation.validation_ok
    assert _failures(ours.validation) == _failures(tfma_outcome.validation)


def _failures(validation) -> list:
    return sorted(
        (str(per_slice.slice_key), str(failure.metric_key), str(failure.metric_threshold))
        for per_slice in validation.metric_validations_per_slice
        for failure in per_slice.failures
    )


@pytest.fixture(scope="module")
def real_run(real_export_run, tmp_path_factory):
    config, result = real_export_run
    examples = result.steps["CsvExampleGen"].outputs["examples"][0].uri
    model = result.steps["Trainer"].outputs["model"][0].uri
    worse = _shifted(model, tmp_path_factory.mktemp("worse"), 0.5)
    return config, examples, model, worse


@pytest.mark.slow
def test_without_a_baseline_every_metric_and_the_blessing_matches_tfma(real_run, tmp_path):
    config, examples, model, _ = real_run
    ours = _evaluate("batched", tmp_path / "batched", examples, model, None, config)
    theirs = _evaluate("tfma", tmp_path / "tfma", examples, model, None, config)
    _assert_same(ours, theirs)
    assert ours.blessed and ours.validation.validation_ok


@pytest.mark.slow
def test_a_change_threshold_failure_against_a_baseline_matches_tfma(real_run, tmp_path):
    """The candidate 0.5 lb off the trained model, the trained model as the baseline: the RMSE rises by more than
    eval_rmse_max_increase, so it is not blessed; every candidate, baseline and diff metric agrees."""
    config, examples, model, worse = real_run
    ours = _evaluate("batched", tmp_path / "batched", examples, worse, model, config)
    theirs = _evaluate("tfma", tmp_path / "tfma", examples, worse, model, config)
    _assert_same(ours, theirs)
    assert not ours.blessed and any("change_threshold" in failure[2] for failure in _failures(ours.validation))
    assert any("is_diff: true" in key for metrics in ours.metrics.values() for key in metrics)
    assert any('model_name: "baseline"' in key for metrics in ours.metrics.values() for key in metrics)


@pytest.mark.slow
def test_a_value_threshold_failure_matches_tfma_and_a_baseline_that_is_worse_passes(real_run, tmp_path):
    config, examples, model, worse = real_run
    strict = dataclasses.replace(config, eval_rmse_threshold=0.5)
    ours = _evaluate("batched", tmp_path / "batched", examples, model, None, strict)
    theirs = _evaluate("tfma", tmp_path / "tfma", examples, model, None, strict)
    _assert_same(ours, theirs)
    assert not ours.blessed and any("value_threshold" in failure[2] for failure in _failures(ours.validation))
    ours = _evaluate("batched", tmp_path / "better", examples, model, worse, config)
    assert ours.blessed  # against a worse baseline the model passes the change threshold


def test_an_eval_config_it_cannot_compute_is_left_to_tfma_saying_why(tmp_path):
    from pipeline import config as config_lib

    config = evaluator_lib.eval_config(config_lib.load_config())
    assert batched_evaluation.unsupported(config) is None
    other = tfma.EvalConfig()
    other.CopyFrom(config)
    other.metrics_specs[0].metrics.add(class_name="MeanSquaredError")
    assert batched_evaluation.unsupported(other) == "metric MeanSquaredError"
    crossed = tfma.EvalConfig()
    crossed.CopyFrom(config)
    crossed.slicing_specs.add(feature_keys=["is_male", "plurality"])
    assert "one feature or none only" in batched_evaluation.unsupported(crossed)
    unset = tfma.EvalConfig()
    unset.CopyFrom(config)
    unset.options.ClearField("include_default_metrics")  # TFMA then adds the model's own metrics
    assert "default metrics" in batched_evaluation.unsupported(unset)
    weighting = tfma.EvalConfig()
    weighting.CopyFrom(config)
    weighting.metrics_specs[0].example_weights.unweighted = True
    assert "example_weights" in batched_evaluation.unsupported(weighting)
    renamed = tfma.EvalConfig()
    renamed.CopyFrom(config)
    renamed.metrics_specs[0].metrics[2].config = '{"name": "rmse"}'
    assert "under another name" in batched_evaluation.unsupported(renamed)
    assert tfma_metrics.NAMES  # the project's metrics are among those it computes
