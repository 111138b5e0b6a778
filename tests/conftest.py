"""Shared fixtures: the team's real natality samples, and one sequence of real pipeline runs."""

import dataclasses
import logging
import os
import pathlib
import sys
from typing import Dict, List

import babyweight_cli

# What the make targets and the commands set (Keras 2, TensorFlow's log level), and TensorFlow imported quietly:
# each xdist worker imports it, and its CUDA plugin registration lines would end every run's output.
babyweight_cli.install_quiet_tensorflow()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from data import generator  # noqa: E402
from models import features  # noqa: E402
from pipeline import config as config_lib  # noqa: E402
from pipeline.commands import quality  # noqa: E402
from pipeline.commands import run as run_lib  # noqa: E402
from pipeline.metadata import mlmd  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
# A short training, for the end-to-end runs that check the pipeline's workings rather than the model's quality (that
# is checked on the real export with the profile's own settings: real_export_run, tests/test_model_quality.py).
QUICK_TRAINING = {"train_epochs": "1", "min_train_steps": "100"}
SHARED_NATALITY = quality.SHARED_NATALITY


# The session's expensive runs: the tests that read one share a worker process under pytest-xdist (make test's
# `-n N --dist loadgroup --no-loadscope-reorder`: groups in this order), so each run is made once.
SHARED_RUNS = ("pipeline_runs", "real_export_run")
# The longest groups, started first so that no worker is left with one of them at the end (measured with
# --durations: minutes each).
LONGEST_GROUPS = (
    "tests.test_real_years_e2e",
    "real_export_run",
    "tests.test_spans_e2e",
    "pipeline_runs",
    "tests.test_pipeline_e2e",
    "tests.test_simulate",
    "tests.test_tuning_e2e",
)


@pytest.hookimpl(wrapper=True)  # around every other implementation: pytest-xdist's reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups the tests for pytest-xdist: a test reading a shared run joins that run's group, the others their
    module's (so a module-scoped run is made once); the longest groups go first, then the other slow ones."""
    group_of = {}
    for item in items:
        shared = next((name for name in SHARED_RUNS if name in item.fixturenames), None)
        group_of[item.nodeid] = shared or item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group_of[item.nodeid]))

    def order(item) -> tuple:
        group = group_of[item.nodeid]
        rank = LONGEST_GROUPS.index(group) if group in LONGEST_GROUPS else len(LONGEST_GROUPS)
        return rank, item.get_closest_marker("slow") is None

    items.sort(key=order)  # stable: each module keeps its order
    result = yield
    if getattr(config.option, "loadgroup", False) and items and "@" not in items[0].nodeid:
        # pytest-xdist marks a group in the test's id; a pytest whose ids it can't set (9.1 and later, for xdist
        # 3.8) would spread each group over the workers and make every shared run once per worker.
        raise pytest.UsageError("pytest-xdist did not group the tests: use the pytest pinned in constraints.txt")
    return result


def skip_or_fail_in_ci(reason: str) -> None:
    """Skips a test whose requirement is missing on a developer's machine; in CI (CI=true) fails it instead."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):  # as CI services set it
        pytest.fail(f"{reason}; CI runs every test (CI=true)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_export_csv() -> pathlib.Path:
    """The team's real 31-column BigQuery export (16,000 rows); tests using it skip if it is absent (CI fails)."""
    path = SHARED_NATALITY / "bq_export_31col.csv"
    if not path.is_file():
        skip_or_fail_in_ci(f"real natality export not found at {path} (the team's ../shared beside the project)")
    return path


@pytest.fixture(autouse=True)
def root_log_handlers():
    """Puts back the root logger's handlers and level after a test (run.setup_logging replaces pytest's)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def real_export_run(tmp_path_factory, real_export_csv):
    """One pipeline run on the real export, unchanged, in a folder of its own (the shared one holds other formats)."""
    import shutil

    root = tmp_path_factory.mktemp("real")
    (root / "export").mkdir()
    shutil.copy(real_export_csv, root / "export")
    # Unlabelled births for the BulkInferrer step: real rows without their weight, some lacking a required feature.
    (root / "unlabelled").mkdir()
    (root / "unlabelled" / "births.csv").write_text(_unlabelled_rows(real_export_csv))
    config = config_lib.load_config(
        overrides={
            "data_dir": str(root / "export"),
            "output_dir": str(root / "out"),
            "bulk_inference_dir": str(root / "unlabelled"),
        }
    )
    return config, run_pipeline(config)


def _unlabelled_rows(path: pathlib.Path) -> str:
    """The header and rows 2-301 of a CSV export with weight_pounds emptied, and the first rows after them lacking
    gestation weeks (no value, or the 'unknown' code 99)."""
    import csv
    import io

    rows = list(csv.reader(path.open()))
    header, body = rows[0], rows[1:]
    label, weeks = header.index(features.LABEL.name), header.index("gestation_weeks")
    chosen = body[:300] + [row for row in body[300:] if row[weeks] in ("", "99")][:5]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(row[:label] + [""] + row[label + 1 :] for row in chosen)
    return out.getvalue()


@pytest.fixture(scope="session", autouse=True)
def plain_argv():
    """TFX's Beam executors parse sys.argv with absl flags, where pytest's own -v would take a value."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", sys.argv[:1])
        yield


@dataclasses.dataclass
class Run:
    outcome: run_lib.Outcome
    steps: Dict[str, mlmd.StepRecord]
    pushed_versions: List[str]


def run_pipeline(config: config_lib.PipelineConfig) -> Run:
    """Runs the pipeline locally and reads back what ML Metadata recorded of the run."""
    outcome = run_lib.run_local(config)
    store = mlmd.open_sqlite(config.metadata_path)
    steps = store.steps(store.runs()[-1])
    assert len({s.node_id for s in steps}) == len(steps), "a component ran twice in one run"
    versions = (
        sorted(p.name for p in pathlib.Path(config.serving_dir).glob("*"))
        if pathlib.Path(config.serving_dir).exists()
        else []
    )
    return Run(outcome, {s.node_id: s for s in steps}, versions)


@pytest.fixture(scope="session")
def pipeline_runs(tmp_path_factory):
    """Clean data -> data with a bad value domain -> the clean data again, in one output folder."""
    root = tmp_path_factory.mktemp("e2e")
    clean = generator.write(6_000, 21, root / "clean")[0]
    corrupt = root / "corrupt" / "natality.csv"
    corrupt.parent.mkdir()
    frame = pd.read_csv(clean, dtype=str, keep_default_na=False)
    frame["is_male"] = np.where(frame.is_male == "true", "M", "F")  # a coding change upstream
    frame.to_csv(corrupt, index=False)

    def config(data_dir: pathlib.Path) -> config_lib.PipelineConfig:
        return config_lib.load_config(
            overrides=dict(QUICK_TRAINING, data_dir=str(data_dir), output_dir=str(root / "out"))
        )

    return {
        "first": run_pipeline(config(clean.parent)),
        "corrupt": run_pipeline(config(corrupt.parent)),
        "fixed": run_pipeline(config(clean.parent)),
        "config": config(clean.parent),
    }
