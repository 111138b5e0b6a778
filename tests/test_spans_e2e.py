"""Spans through the real pipeline: each of the six questions stops a bad span, clean spans train.

One sequence of runs in one output folder, span by span as data arrives: a clean span, six spans each
corrupted by the generator in one way (a run each, all blocked), a clean span (trains on the validated
spans only) and a span whose anomaly is configured as a warning (trains).
"""

import base64
import pathlib
import re
import shutil

import pytest

from data import generator
from pipeline import config as config_lib
from pipeline.components import spans as spans_lib
from tests.conftest import run_pipeline

pytestmark = pytest.mark.slow

ROWS = 1500
# Span 2..7: the corruption, and the check and feature that must block it.
BLOCKED = {
    2: ("shift", "drift", "mother_married"),
    3: ("drop_column", "missing", "mother_age"),
    4: ("extra_column", "unexpected", "hospital_id"),
    5: ("type", "type", "weight_gain_pounds"),
    6: ("presence", "presence", "mother_age"),
    7: ("domain", "domain", "mother_age"),
}
WINDOW = 2


@pytest.fixture(scope="module")
def span_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spans")
    paths = generator.write(ROWS, 31, root / "generated", spans=9)
    for span, (kind, _, _) in BLOCKED.items():
        generator.corrupt(paths[span - 1], kind, seed=span)
    generator.corrupt(paths[8], "extra_column", seed=9)
    runs = {}
    for span, path in enumerate(paths, start=1):
        shutil.copytree(path.parent, root / "arrivals" / f"span-{span}")
        # The profile's own training: each trained span's model must pass the change threshold against the last.
        overrides = dict(
            data_dir=str(root / "arrivals"),
            output_dir=str(root / "out"),
            training_window_spans=str(WINDOW),
        )
        if span == 9:
            overrides["warning_checks"] = "unexpected"
        runs[span] = run_pipeline(config_lib.load_config(overrides=overrides))
    return runs


def _trained_spans(run):
    return sorted(spans_lib.span_of(a) for a in run.steps["Trainer"].inputs["examples"])


def test_the_first_span_trains_and_pushes_without_a_drift_check(span_runs):
    first = span_runs[1]
    assert first.outcome.ok, first.outcome.summary
    assert "data validation of span 1 (no earlier validated span to compare with)" in first.outcome.summary
    assert _trained_spans(first) == [1]
    assert len(first.pushed_versions) == 1


@pytest.mark.parametrize("span", sorted(BLOCKED))
def test_each_corrupted_span_is_blocked_by_its_question_before_transform(span_runs, span):
    run = span_runs[span]
    kind, check, feature = BLOCKED[span]
    assert not run.outcome.ok, run.outcome.summary
    failure = run.outcome.summary.split("Run FAILED: ")[-1]
    assert failure.startswith(f"span {span} failed data validation"), failure
    assert f"[BLOCKING] {check}: feature '{feature}'" in failure, failure
    assert "What to do (docs/validation-and-spans.md, When a run is blocked)" in failure
    assert f"--set warning_checks={check}," in failure
    question_lines = [line for line in run.outcome.summary.splitlines() if "BLOCKING" in line and ". " in line[:8]]
    assert question_lines and all(feature in line for line in question_lines), run.outcome.summary
    assert "compared with span 1" in run.outcome.summary  # blocked spans are never the baseline
    assert run.steps["DataGate"].state == "failed"
    assert not {"training_window", "Transform", "Trainer", "Evaluator", "Pusher"} & set(run.steps)
    assert run.pushed_versions == span_runs[1].pushed_versions


def test_a_wrong_type_is_also_located_by_file_line_and_column(span_runs):
    summary = span_runs[5].outcome.summary
    assert (
        "span-5/natality.csv, line " in summary and "column weight_gain_pounds: 'unknown' is not an integer" in summary
    )


def test_a_clean_span_after_blocked_ones_trains_on_validated_spans_only_and_pushes(span_runs):
    clean = span_runs[8]
    assert clean.outcome.ok, clean.outcome.summary
    assert "data validation of span 8 (compared with span 1)" in clean.outcome.summary
    assert "1. Is the new distribution close enough to the previous span's?" in clean.outcome.summary
    assert "anomalies: none" in clean.outcome.summary  # drift-free: nothing blocks
    assert _trained_spans(clean) == [1, 8]  # the last 2 validated spans; 2-7 were blocked
    assert len(clean.pushed_versions) == 2


def test_a_warning_is_reported_and_the_run_goes_on_with_a_rolling_window(span_runs):
    warned = span_runs[9]
    assert warned.outcome.ok, warned.outcome.summary
    assert "[warning] unexpected: feature 'hospital_id'" in warned.outcome.summary
    assert "compared with span 8" in warned.outcome.summary
    assert _trained_spans(warned) == [8, 9]
    assert len(warned.pushed_versions) == 3


def test_an_older_span_s_examples_reach_the_loss_with_their_smaller_weight(span_runs):
    """Span 9's run trains on spans 8 and 9 (half-life 2 spans): span 8's examples weigh 2^-1/2."""
    import json

    import tensorflow as tf
    import tensorflow_transform as tft

    from models import model

    trainer = span_runs[9].steps["Trainer"]
    run_dir = trainer.outputs["model_run"][0].uri
    weights = json.loads(pathlib.Path(run_dir, model.WEIGHTS_FILE).read_text())
    by_span = {spans_lib.span_of(a): f"{a.uri}/Split-train/*" for a in trainer.inputs["examples"]}
    assert weights[by_span[9]] == 1.0 and weights[by_span[8]] == pytest.approx(2**-0.5)
    transform = tft.TFTransformOutput(trainer.inputs["transform_graph"][0].uri)
    for span, pattern in by_span.items():
        dataset = model._input_fn([pattern], weights, transform, batch_size=512, shuffle=False)
        sample_weights = tf.concat([weight for _, _, weight in dataset], axis=0).numpy()
        labelled = sample_weights[sample_weights > 0]
        assert len(labelled) > 0.9 * len(sample_weights)  # rows without a label weigh 0
        assert labelled == pytest.approx(weights[pattern]), span


def test_each_run_writes_a_self_contained_html_report(span_runs):
    for span in (1, 2, 8):
        summary = span_runs[span].outcome.summary
        path = pathlib.Path(summary.split("  report: ")[1].splitlines()[0])
        page = path.read_text()
        assert page.startswith("<!DOCTYPE html>") and f"Data validation of span {span}" in page
        assert "Does the expected fraction of examples contain each feature?" in page
    page = pathlib.Path(span_runs[8].outcome.summary.split("  report: ")[1].splitlines()[0]).read_text()
    assert "span 8" in page and "span 1" in page  # statistics of the new span next to the previous one
    assert "Drift: distance to the previous span" in page and "L_INFTY" in page
    assert "Evaluation by slice (TFMA)" in page and "Residuals (label - prediction) by slice" in page
    assert "Infra validation: the candidate served before the push" in page
    assert "TFLite models for devices" in page and "float32  ok     largest difference from the SavedModel" in page
    blocked = pathlib.Path(span_runs[2].outcome.summary.split("  report: ")[1].splitlines()[0]).read_text()
    assert "BLOCKING" in blocked and "Evaluation by slice" not in blocked
    # The columns with 'unknown' codes: their codes a bar of their own, read from the rows of both spans...
    plots = [base64.b64decode(data).decode() for data in re.findall(r"data:image/svg\+xml;base64,([^']+)'", page)]
    assert sum("unknown" in plot and "(99)" in plot for plot in plots) == 4, "gestation, weight gain, ever born, father"
    # ...unless a span's rows can't be read: span 5 holds text in weight_gain_pounds, so both spans are drawn from
    # TFDV's histograms, and the page says so.
    typed = pathlib.Path(span_runs[5].outcome.summary.split("  report: ")[1].splitlines()[0]).read_text()
    assert "drawn from TFDV's histograms (their rows could not be read)" in typed


def test_predictions_are_compared_with_the_previous_run_that_trained(span_runs):
    summary = span_runs[8].outcome.summary
    assert "predictions on span 8 (eval split" in summary
    assert "since the previous run (span 1): mean" in summary  # spans 2-7 trained no model
    assert "residuals (label - prediction) by slice:" in summary and "      boys  " in summary
