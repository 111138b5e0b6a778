"""The local runner (pipeline/runner.py) on a small pipeline of its own: independent steps side by side, TFX's
caching and lineage kept, a failure stopping its dependants only."""

import pathlib
import time

import pytest
from tfx import v1 as tfx
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts

from pipeline import runner
from pipeline.metadata import mlmd

SECONDS = 2.0


@component
def Source(data: OutputArtifact[standard_artifacts.Examples]):
    (pathlib.Path(data.uri) / "rows").write_text("1\n2\n")


@component
def Step(
    rows: InputArtifact[standard_artifacts.Examples],
    result: OutputArtifact[standard_artifacts.Examples],
    seconds: Parameter[float] = 0.0,
    fail: Parameter[int] = 0,
):
    time.sleep(seconds)
    if fail:
        raise RuntimeError("this step was asked to fail")
    text = (pathlib.Path(rows.uri) / "rows").read_text()
    (pathlib.Path(result.uri) / "rows").write_text(text + "3\n")


def _pipeline(root: pathlib.Path, fail: bool = False) -> tfx.dsl.Pipeline:
    """source -> left -> after_left, and source -> right -> after_right: left and right can run side by side."""
    source = Source()
    left = Step(rows=source.outputs["data"], seconds=SECONDS).with_id("left")
    right = Step(rows=source.outputs["data"], seconds=SECONDS, fail=int(fail)).with_id("right")
    after_left = Step(rows=left.outputs["result"]).with_id("after_left")
    after_right = Step(rows=right.outputs["result"]).with_id("after_right")
    return tfx.dsl.Pipeline(
        pipeline_name="runner-test",
        pipeline_root=str(root / "root"),
        components=[source, left, right, after_left, after_right],
        enable_cache=True,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(root / "metadata.sqlite")
        ),
    )


def _steps(root: pathlib.Path):
    store = mlmd.open_sqlite(str(root / "metadata.sqlite"))
    return store, {step.node_id: step for step in store.steps(store.runs()[-1])}


def test_independent_steps_run_side_by_side_with_tfx_caching_and_lineage(tmp_path):
    runner.ParallelDagRunner(2).run(_pipeline(tmp_path))
    store, steps = _steps(tmp_path)
    assert {node: step.state for node, step in steps.items()} == dict.fromkeys(
        ["Source", "left", "right", "after_left", "after_right"], "complete"
    )
    pairs = {(first, second) for first, second, _ in mlmd.overlaps(list(steps.values()), min_seconds=SECONDS / 2)}
    assert pairs & {("left", "right"), ("right", "left")}
    # Lineage as TFX records it: each step read the artifact its upstream step wrote.
    for node, upstream, key in (("left", "Source", "data"), ("after_right", "right", "result")):
        assert [a.id for a in steps[node].inputs["rows"]] == [a.id for a in steps[upstream].outputs[key]]
    assert (pathlib.Path(steps["after_right"].outputs["result"][0].uri) / "rows").read_text() == "1\n2\n3\n3\n"

    runner.ParallelDagRunner(2).run(_pipeline(tmp_path))  # again: TFX's cache answers every step
    _, again = _steps(tmp_path)
    assert {step.state for step in again.values()} == {"cached"}
    assert again["after_left"].outputs["result"][0].id == steps["after_left"].outputs["result"][0].id


def test_a_failed_step_stops_its_dependants_only_and_the_run_raises_it(tmp_path):
    with pytest.raises(RuntimeError, match="this step was asked to fail"):
        runner.ParallelDagRunner(2).run(_pipeline(tmp_path, fail=True))
    _, steps = _steps(tmp_path)
    assert steps["right"].state == "failed"
    assert "after_right" not in steps  # never started
    assert steps["left"].state == steps["after_left"].state == "complete"  # the other branch ran on


def test_overlaps_are_the_pairs_of_steps_that_ran_at_once():
    def step(node_id, started, ended):
        return mlmd.StepRecord(node_id, "complete", ended - started, started, ended, {}, {})

    steps = [step("a", 0, 10), step("b", 2, 5), step("c", 9.8, 20), step("d", 11, 12)]
    assert mlmd.overlaps(steps) == [("a", "b", 3.0), ("c", "d", 1.0)]  # a and c: 0.2 s, under the half second
