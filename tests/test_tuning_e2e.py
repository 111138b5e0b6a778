"""The tuned profile end to end: TFX's Tuner searches, the Trainer trains with the best values, ML Metadata and
the run summary show the trials, and a rerun on the same data and code reuses the search from the cache."""

import html
import json
import pathlib
import re

import pytest
import tensorflow as tf

from data import generator
from models import model
from pipeline import config as config_lib
from pipeline.metadata import metadata_cli
from tests.conftest import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tuned_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    generator.write(3_000, 5, root / "data")
    # A profile learning rate too low to learn anything in its steps: trial 1 (the profile's) loses, so the
    # Trainer's values differ from the profile's, and the tests below see where they came from.
    config = config_lib.load_config(
        "tuned",
        {
            "data_dir": str(root / "data"),
            "output_dir": str(root / "out"),
            "tuner_trials": "2",
            "learning_rate": "0.00001",
        },
    )
    return config, run_pipeline(config), run_pipeline(config)


def _best_values(run):
    best = run.steps["Tuner"].outputs["best_hyperparameters"][0]
    return json.loads((pathlib.Path(best.uri) / "best_hyperparameters.txt").read_text())["values"]


def test_the_trainer_trains_with_the_tuner_s_best_values(tuned_runs):
    _, first, _ = tuned_runs
    assert first.outcome.ok, first.outcome.summary
    best = _best_values(first)
    assert best["learning_rate"] != 0.00001, "the profile's own trial won: the test can't tell where values came from"
    assert set(best) == {
        "hidden_units",
        "embedding_dim",
        "learning_rate",
        "batch_size",
        "train_epochs",
        "min_train_steps",
        "mask_rate",
    }
    trainer = first.steps["Trainer"]
    # What the Trainer read (its ModelRun folder records its settings) ...
    settings = json.loads((pathlib.Path(trainer.outputs["model_run"][0].uri) / model.SETTINGS_FILE).read_text())
    assert {name: settings[name] for name in best} == best
    # ... and what it built: the hidden layers' and the embeddings' sizes in the pushed SavedModel's variables.
    variables = tf.train.list_variables(
        str(pathlib.Path(trainer.outputs["model"][0].uri) / "Format-Serving" / "variables" / "variables")
    )
    layers = sorted(
        (int(name.split("/")[0].rsplit("-", 1)[1]), name.split("/")[1], shape)
        for name, shape in variables
        if name.startswith("layer_with_weights-")
    )
    # Kernels in layer order: the hidden layers', then the wide and deep outputs' (one unit each).
    assert [shape[1] for _, kind, shape in layers if kind == "kernel" and shape[1] > 1] == model.hidden_units(
        best["hidden_units"]
    ), layers
    embeddings = {shape[1] for _, kind, shape in layers if kind == "embeddings"}  # the wide part's are 1 wide
    assert embeddings == {1, best["embedding_dim"]}


def test_ml_metadata_and_the_summary_show_the_trials_and_the_choice(tuned_runs, capsys):
    config, first, _ = tuned_runs
    best = first.steps["Tuner"].outputs["best_hyperparameters"][0]
    assert first.steps["Trainer"].inputs["hyperparameters"][0].id == best.id
    summary = first.outcome.summary
    chosen = "chosen, the Trainer's hyperparameters: hidden_units="
    assert "tuning: 2 trials completed in" in summary and chosen in summary
    rows = re.findall(r"^ +(\d+) ([* ])([p ]) +(\d+\.\d{4})  ", summary.split("tuning: ")[1], re.M)
    assert sorted(int(trial) for trial, *_ in rows) == [1, 2], rows
    best_row, profile_row = rows  # best first: trial 2 (chosen), then the profile's trial 1
    assert best_row[:3] == ("2", "*", " ") and profile_row[:3] == ("1", " ", "p")
    assert 0.3 < float(best_row[3]) < float(profile_row[3])
    report = pathlib.Path(summary.split("report: ")[1].split()[0]).read_text()
    assert "<h2>Tuning: the trials" in report and html.escape(chosen) in report  # Trainer&#x27;s

    assert metadata_cli.main(["--store", config.metadata_path, "show", str(best.id)]) == 0
    shown = capsys.readouterr().out
    assert "tuning: 2 trials completed" in shown
    assert re.search(r"^\s+1 [* ]p\s+\d\.\d{4}  256,128 ", shown, re.M), shown  # trial 1: the profile's settings
    assert (
        metadata_cli.main(
            [
                "--store",
                config.metadata_path,
                "--json",
                "show",
                str(first.steps["Tuner"].outputs["tuner_results"][0].id),
            ]
        )
        == 0
    )
    content = json.loads(capsys.readouterr().out)["content"]
    assert content["chosen"] == _best_values(first)
    assert [trial["values"] for trial in content["trials"]][0] == content["chosen"]  # best first


def test_a_rerun_on_the_same_data_and_code_reuses_the_search(tuned_runs):
    _, first, again = tuned_runs
    assert again.outcome.ok, again.outcome.summary
    assert again.steps["Tuner"].state == "cached" and again.steps["Trainer"].state == "cached"
    assert _best_values(again) == _best_values(first)
    assert "tuning: 2 trials completed (cached: an earlier run's search" in again.outcome.summary
