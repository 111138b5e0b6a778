"""The local runner (pipeline/runner.py) on a small pipeline of its own: independent steps side by side, TFX's
caching and lineage kept, a failure stopping its dependants only."""

import pathlib
import threading
import time

import pytest
from tfx import v1 as tfx
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts

from pipeline import runner
from pipeline.metadata import mlmd

# Steps given the same meeting point wait there for each other: they pass it only if they run at the same time.
MEETINGS = {"side by side": threading.Barrier(2, timeout=20)}


@component
def Source(data: OutputArtifact[standard_artifacts.Examples]):
    (pathlib.Path(data.uri) / "rows").write_text("1\n2\n")


@component
def Step(
    rows: InputArtifact[standard_artifacts.Examples],
    result: OutputArtifact[standard_artifacts.Examples],
    meet: Parameter[str] = "",
    fail: Parameter[int] = 0,
):
    if meet:
        MEETINGS[meet].wait()
        time.sleep(1.0)  # together past the meeting point for a second
    if fail:
        raise RuntimeError("this step was asked to fail")
    text = (pathlib.Path(rows.uri) / "rows").read_text()
    (pathlib.Path(result.uri) / "rows").write_text(text + "3\n")


def _pipeline(root: pathlib.Path, fail: bool = False, meet: str = "side by side") -> tfx.dsl.Pipeline:
    """source -> left -> after_left, and source -> right -> after_right: left and right can run side by side;
    `publish` (after_left's) waits for every step not downstream of it, as the Pusher does."""
    MEETINGS["side by side"].reset()
    source = Source()
    left = Step(rows=source.outputs["data"], meet=meet).with_id("left")
    right = Step(rows=source.outputs["data"], meet=meet, fail=int(fail)).with_id("right")
    after_left = Step(rows=left.outputs["result"]).with_id("after_left")
    after_right = Step(rows=right.outputs["result"]).with_id("after_right")
    publish = Step(rows=after_left.outputs["result"]).with_id("publish")
    return tfx.dsl.Pipeline(
        pipeline_name="runner-test",
        pipeline_root=str(root / "root"),
        components=[source, left, right, after_left, after_right, publish],
        enable_cache=True,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(root / "metadata.sqlite")
        ),
    )


def _steps(root: pathlib.Path):
    store = mlmd.open_sqlite(str(root / "metadata.sqlite"))
    return store, {step.node_id: step for step in store.steps(store.runs()[-1])}


def test_independent_steps_run_side_by_side_with_tfx_caching_and_lineage(tmp_path):
    runner.ParallelDagRunner(2, after_all=["publish"]).run(_pipeline(tmp_path))  # left and right met
    store, steps = _steps(tmp_path)
    assert {node: step.state for node, step in steps.items()} == dict.fromkeys(
        ["Source", "left", "right", "after_left", "after_right", "publish"], "complete"
    )
    pairs = {(first, second) for first, second, _ in mlmd.overlaps(list(steps.values()))}
    assert pairs & {("left", "right"), ("right", "left")}
    assert steps["publish"].started >= max(step.ended for node, step in steps.items() if node != "publish") - 0.01
    # Lineage as TFX records it: each step read the artifact its upstream step wrote.
    for node, upstream, key in (("left", "Source", "data"), ("after_right", "right", "result")):
        assert [a.id for a in steps[node].inputs["rows"]] == [a.id for a in steps[upstream].outputs[key]]
    assert (pathlib.Path(steps["after_right"].outputs["result"][0].uri) / "rows").read_text() == "1\n2\n3\n3\n"

    runner.ParallelDagRunner(2).run(_pipeline(tmp_path))  # again: TFX's cache answers every step
    _, again = _steps(tmp_path)
    assert {step.state for step in again.values()} == {"cached"}
    assert again["after_left"].outputs["result"][0].id == steps["after_left"].outputs["result"][0].id


def test_a_failed_step_stops_its_dependants_and_the_publishing_step_only_and_the_run_raises_it(tmp_path):
    with pytest.raises(RuntimeError, match="this step was asked to fail"):
        runner.ParallelDagRunner(2, after_all=["publish"]).run(_pipeline(tmp_path, fail=True))
    _, steps = _steps(tmp_path)
    assert steps["right"].state == "failed"
    assert "after_right" not in steps and "publish" not in steps  # never started: nothing published
    assert steps["left"].state == steps["after_left"].state == "complete"  # the other branch ran on


def test_a_step_that_runs_alone_has_no_other_beside_it(tmp_path):
    runner.ParallelDagRunner(2, alone=["left", "after_right"]).run(_pipeline(tmp_path, meet=""))
    _, steps = _steps(tmp_path)
    assert all(step.state == "complete" for step in steps.values()) and len(steps) == 6
    for first, second, _ in mlmd.overlaps(list(steps.values()), min_seconds=0.001):
        assert not {first, second} & {"left", "after_right"}, (first, second)


def test_the_pipeline_names_the_steps_the_runner_treats_apart():
    from pipeline import config as config_lib
    from pipeline import pipeline as pipeline_lib

    ids = {c.id for c in pipeline_lib.create_pipeline(config_lib.load_config("tuned")).components}
    assert set(pipeline_lib.RUN_ALONE) | set(pipeline_lib.AFTER_ALL) <= ids


def test_overlaps_are_the_pairs_of_steps_that_ran_at_once():
    def step(node_id, started, ended):
        return mlmd.StepRecord(node_id, "complete", ended - started, started, ended, {}, {})

    steps = [step("a", 0, 10), step("b", 2, 5), step("c", 9.8, 20), step("d", 11, 12)]
    assert mlmd.overlaps(steps) == [("a", "b", 3.0), ("c", "d", 1.0)]  # a and c: 0.2 s, under the half second


@pytest.mark.parametrize("steps_at_once, expected", [("2", "ParallelDagRunner"), ("1", "LocalDagRunner")])
def test_a_local_run_uses_the_runner_its_config_names(tmp_path, monkeypatch, steps_at_once, expected):
    from pipeline import config as config_lib
    from pipeline.commands import run as run_lib

    used = []

    def fake(name):
        class Runner:
            def __init__(self, *args):
                used.append((name, args))

            def run(self, pipeline):
                raise RuntimeError("not run here")

        return Runner

    monkeypatch.setattr(runner, "ParallelDagRunner", fake("ParallelDagRunner"))
    monkeypatch.setattr(tfx.orchestration, "LocalDagRunner", fake("LocalDagRunner"))
    config = config_lib.load_config(overrides={"output_dir": str(tmp_path), "steps_at_once": steps_at_once})
    assert not run_lib.run_local(config).ok
    from pipeline.pipeline import AFTER_ALL, RUN_ALONE

    assert used == [(expected, (2, RUN_ALONE, AFTER_ALL) if expected == "ParallelDagRunner" else ())]
    with pytest.raises(config_lib.ConfigError, match="steps_at_once must be at least 1, not 0"):
        config_lib.load_config(overrides={"steps_at_once": "0"})
