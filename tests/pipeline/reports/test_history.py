"""The history's verdict of a run, from its validation and the states ML Metadata left its steps in."""

import pytest

from pipeline.components.validation import Finding, Verdict
from pipeline.metadata import mlmd
from pipeline.reports import history


def step(node_id: str, state: str) -> mlmd.StepRecord:
    return mlmd.StepRecord(node_id, state, 1.0, 0.0, 1.0, {}, {})


def finding(check: str, feature: str, blocking: bool) -> Finding:
    return Finding("train", feature, check, "KIND", "what TFDV saw", blocking)


CLEAN = Verdict(2, 1, "uri", [])
WARNED = Verdict(2, 1, "uri", [finding("drift", "mother_age", False)])
BLOCKED = Verdict(
    2,
    1,
    "uri",
    [finding("domain", "is_male", True), finding("missing", "", True), finding("drift", "mother_age", False)],
)


@pytest.mark.parametrize(
    "verdict, status, steps, expected",
    [
        (CLEAN, "complete", [step("Trainer", "complete")], ("passed", [])),
        (WARNED, "complete", [step("Trainer", "cached")], ("passed with warnings", [])),
        (BLOCKED, "failed", [step("DataGate", "failed")], ("BLOCKED", ["domain:is_male", "missing:dataset"])),
        (CLEAN, "failed", [step("Trainer", "complete"), step("Evaluator", "failed")], ("FAILED", ["Evaluator failed"])),
        (
            CLEAN,
            "interrupted",
            [step("Transform", "complete"), step("Trainer", "running")],
            ("INTERRUPTED", ["Trainer interrupted"]),
        ),
        (CLEAN, "running", [step("Trainer", "running")], ("running", ["Trainer running"])),
        (None, "failed", [step("CsvExampleGen", "failed")], ("FAILED", ["CsvExampleGen failed"])),
        (None, "complete", [step("CsvExampleGen", "complete")], ("not validated", [])),
    ],
)
def test_the_verdict_names_what_stopped_a_run(verdict, status, steps, expected):
    assert history.verdict_of(verdict, status, steps) == expected
