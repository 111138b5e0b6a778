"""The hyperparameter search of TFX's Tuner: its space and `tuner_fn`, next to the model they tune (models/model.py).

Each trial trains the model as the Trainer does (`model.fit`: the same input function, the training window's
spans and their recency weights, the same seed), on the train split's rows but one in model.HOLDOUT_BUCKETS,
and scores its RMSE on that one (`val_rmse`, weighted like the Trainer's loss). The held-out rows are masked
as the profile's `mask_rate` says requests lack optional features, the same rows and gaps for every trial: a
trial's own `mask_rate` is judged by the requests it stands for, not pushed to its lowest. The eval split stays
out of the search: the Evaluator's figure for the chosen model is not one the search picked. The first trial
is the profile's own settings, so the chosen values are never worse than them on the held-out rows.

Every hyperparameter is named as the Trainer's setting it replaces (pipeline.pipeline.model_config), so the
Trainer takes the best values as they are (model.trainer_settings).
"""

import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping

import keras_tuner as kt
import tensorflow as tf
import tensorflow_transform as tft
from keras_tuner.src.engine import trial as trial_module
from tfx import v1 as tfx

from models import model
from models.distribution import select_strategy

OBJECTIVE = "val_rmse"
TRIALS_KEY = "tuner_trials"  # custom_config: how many trials the search runs
# A third of the trials (the profile's among them) are random before the Gaussian process picks the rest:
# KerasTuner's default, three per searched setting (21), would leave a search of 12 trials all random.
INITIAL_SHARE = 3
VIZIER_KEY = "vizier"  # custom_config on Vertex: {project, region, study_prefix} of the Vizier study (models/vizier.py)
# Choices of each searched setting; the profile's own value is added to its list. hidden_units are written as
# the profile's text: the units of each layer.
HIDDEN_UNITS = ("128", "256", "512", "128,64", "256,128", "512,256", "256,128,64", "512,256,128")
EMBEDDING_DIMS = (4, 8, 16)
BATCH_SIZES = (128, 256, 512)
TRAIN_EPOCHS = (2, 4, 8)  # passes over the training rows: they decide from about 100,000 rows up...
MIN_TRAIN_STEPS = (750, 1500, 3000)  # ...below that, the floor of training steps does
LEARNING_RATES = (0.001, 0.01)  # sampled on a log scale
MASK_RATES = (0.25, 0.5, 0.75)  # 0 only where the profile's is: requests that lack optional features are answered


def _choice(hp: kt.HyperParameters, name: str, choices: tuple, default: Any) -> None:
    """A Choice among `choices` and the profile's value, which is the default (the first trial's)."""
    values = sorted(set(choices) | {default}, key=lambda value: (str(type(value)), value))
    hp.Choice(name, values, default=default)


def search_space(settings: Mapping[str, Any]) -> kt.HyperParameters:
    """The searched settings, each defaulting to the profile's value (`settings`: the Trainer's custom_config)."""
    hp = kt.HyperParameters()
    _choice(
        hp, "hidden_units", HIDDEN_UNITS, ",".join(str(units) for units in model.hidden_units(settings["hidden_units"]))
    )
    _choice(hp, "embedding_dim", EMBEDDING_DIMS, int(settings["embedding_dim"]))
    low, high = LEARNING_RATES
    hp.Float(
        "learning_rate",
        min(low, settings["learning_rate"]),
        max(high, settings["learning_rate"]),
        sampling="log",
        default=float(settings["learning_rate"]),
    )
    _choice(hp, "batch_size", BATCH_SIZES, int(settings["batch_size"]))
    _choice(hp, "train_epochs", TRAIN_EPOCHS, int(settings["train_epochs"]))
    _choice(hp, "min_train_steps", MIN_TRAIN_STEPS, int(settings["min_train_steps"]))
    _choice(hp, "mask_rate", MASK_RATES, float(settings["mask_rate"]))
    return hp


class ProfileFirstOracle(kt.oracles.BayesianOptimizationOracle):
    """KerasTuner's Bayesian optimization, whose first trial is the space's defaults: the profile's settings."""

    def populate_space(self, trial_id: str) -> Dict[str, Any]:
        if not self.trials:
            values = {hp.name: hp.default for hp in self.hyperparameters.space}
            return {"status": trial_module.TrialStatus.RUNNING, "values": values}
        return super().populate_space(trial_id)


class TrainerTrials(kt.engine.base_tuner.BaseTuner):
    """Runs each trial as the Trainer trains (model.fit on held-out rows); returns its validation RMSE.

    A BaseTuner, not KerasTuner's Keras `Tuner`: that one refuses tf_keras models, which TFX 1.16 trains.
    """

    def __init__(self, fn_args: tfx.components.FnArgs, oracle: kt.Oracle, **kwargs):
        super().__init__(oracle=oracle, **kwargs)
        self.fn_args = fn_args

    def run_trial(self, trial: kt.engine.trial.Trial, *args, **kwargs) -> Dict[str, float]:
        profile = self.fn_args.custom_config
        settings = dict(profile, **trial.hyperparameters.values)
        weights = model.file_weights(
            self.fn_args.train_files, [], settings.get(model.FILE_SPANS_KEY), settings["recency_half_life_spans"]
        )
        started = time.monotonic()
        tf.keras.backend.clear_session()
        _, history = model.fit(
            settings,
            tft.TFTransformOutput(self.fn_args.transform_graph_path),
            self.fn_args.train_files,
            [],
            weights,
            select_strategy(settings["strategy"], settings["tpu_address"]),
            holdout=True,
            validation_mask_rate=profile["mask_rate"],
        )
        if not history.get(OBJECTIVE):
            raise kt.errors.FailedTrialError(
                f"no training row was held out to score the trial on (one in "
                f"{model.HOLDOUT_BUCKETS} is): too few training rows"
            )
        rmse = history[OBJECTIVE][-1]
        logging.info(
            "trial %s: %s -> %s %.4f in %.1f s",
            trial.trial_id,
            trial.hyperparameters.values,
            OBJECTIVE,
            rmse,
            time.monotonic() - started,
        )
        if not math.isfinite(rmse):
            raise kt.errors.FailedTrialError(f"training diverged ({OBJECTIVE} {rmse})")
        return {OBJECTIVE: rmse}


def tuner_fn(fn_args: tfx.components.FnArgs) -> tfx.components.TunerFnResult:
    """TFX Tuner entry point: `tuner_trials` trials over `search_space`, suggested by KerasTuner's Bayesian
    optimization, or by Vertex AI Vizier where custom_config has a `vizier` entry (the vertex profile)."""
    settings = fn_args.custom_config
    # KerasTuner takes a seed of 0 for none (a random one): shifted by one, every seed is kept.
    search = dict(
        objective=kt.Objective(OBJECTIVE, direction="min"),
        max_trials=settings[TRIALS_KEY],
        hyperparameters=search_space(settings),
        seed=settings["seed"] + 1,
    )
    if settings.get(VIZIER_KEY):
        from models.vizier import VizierOracle  # Vertex AI's client: only the vertex profile's Tuner needs it

        oracle = VizierOracle(**settings[VIZIER_KEY], **search)
    else:
        oracle = ProfileFirstOracle(num_initial_points=max(2, settings[TRIALS_KEY] // INITIAL_SHARE), **search)
    # A folder of its own per tuner process: on Vertex the chief's oracle and a worker share a machine.
    tuner = TrainerTrials(
        fn_args,
        oracle,
        directory=fn_args.working_dir,
        overwrite=True,
        project_name=f"babyweight-{os.environ.get('KERASTUNER_TUNER_ID', 'tuner0')}",
    )
    return tfx.components.TunerFnResult(tuner=tuner, fit_kwargs={})


def results(tuner_results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """TFX's tuner_results.json rows ({trial_id, score, values...}) as {trial, val_rmse, values}, best first;
    trials numbered from 1, as KerasTuner's console lines count them ("Search: Running Trial #1")."""
    rows = [
        {
            "trial": int(row["trial_id"]) + 1,
            OBJECTIVE: row["score"],
            "values": {key: value for key, value in row.items() if key not in ("trial_id", "score")},
        }
        for row in tuner_results
    ]
    return sorted(rows, key=lambda row: row[OBJECTIVE])
