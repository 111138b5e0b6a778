"""The Tuner's search (models/tuning.py) and its Vertex AI Vizier oracle (models/vizier.py), without the cloud."""

import types

import keras_tuner as kt
import pytest
import tensorflow as tf
from google.cloud import aiplatform_v1

from models import model, tuning, vizier
from pipeline import config as config_lib
from pipeline.pipeline import model_config


def _settings(**overrides):
    return dict(model_config(config_lib.load_config(overrides=overrides)), **{tuning.TRIALS_KEY: 4})


def test_the_space_defaults_to_the_profile_and_names_the_trainer_s_settings():
    settings = _settings()
    space = tuning.search_space(settings)
    assert set(space.values) <= set(settings)  # the Trainer takes the values as they are
    defaults = {hp.name: hp.default for hp in space.space}
    assert defaults == {
        "hidden_units": "256,128",
        "embedding_dim": 8,
        "learning_rate": 0.004,
        "batch_size": 256,
        "train_epochs": 4,
        "min_train_steps": 1500,
        "mask_rate": 0.5,
    }
    # A profile value outside the listed choices is searched too, as the first trial.
    odd = {
        hp.name: hp
        for hp in tuning.search_space(_settings(hidden_units="100,10", mask_rate="0.3", learning_rate="0.05")).space
    }
    assert "100,10" in odd["hidden_units"].values and odd["hidden_units"].default == "100,10"
    assert 0.3 in odd["mask_rate"].values and 0.0 not in space.space[-1].values
    assert tuning.search_space(_settings(mask_rate="0")).space[-1].values == [0.0, 0.25, 0.5, 0.75]  # as asked
    assert odd["learning_rate"].max_value == 0.05


def test_the_first_trial_is_the_profile_then_the_search_moves_the_same_way_each_time(tmp_path):
    def trials(seed):
        space = tuning.search_space(_settings())
        oracle = tuning.ProfileFirstOracle(
            objective=kt.Objective(tuning.OBJECTIVE, "min"), max_trials=3, hyperparameters=space, seed=seed
        )
        oracle._set_project_dir(str(tmp_path / str(len(list(tmp_path.iterdir())))), "p")
        chosen = []
        for score in (1.1, 1.0):
            trial = oracle.create_trial("tuner0")
            chosen.append(dict(trial.hyperparameters.values))
            oracle.update_trial(trial.trial_id, {tuning.OBJECTIVE: score})
            trial.status = "COMPLETED"
            oracle.end_trial(trial)
        return chosen, space

    (first, second), space = trials(1)
    assert first == {hp.name: hp.default for hp in space.space}
    assert second != first
    assert trials(1)[0] == [first, second]
    assert trials(2)[0][1] != second


def test_the_trainer_takes_the_tuner_s_values_in_place_of_the_profile_s():
    settings = _settings()
    fn_args = types.SimpleNamespace(
        custom_config=settings,
        hyperparameters={
            "space": [],
            "values": {"hidden_units": "512,256,128", "learning_rate": 0.002, "mask_rate": 0.25},
        },
    )
    chosen = model.trainer_settings(fn_args)
    assert model.hidden_units(chosen["hidden_units"]) == [512, 256, 128]
    assert (chosen["learning_rate"], chosen["mask_rate"], chosen["batch_size"]) == (0.002, 0.25, 256)
    assert model.trainer_settings(types.SimpleNamespace(custom_config=settings)) == settings  # no Tuner
    fn_args.hyperparameters["values"]["dropout"] = 0.1
    with pytest.raises(ValueError, match="name dropout, which the Trainer's settings"):
        model.trainer_settings(fn_args)


def test_trials_hold_out_one_row_in_five_of_the_train_split_and_train_on_the_rest(tmp_path):
    path = str(tmp_path / "rows.gz")
    rows = [f"row {i}".encode() for i in range(2000)]
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for row in rows:
            writer.write(row)
    held = {bytes(r) for r in model._records([path], holdout=True).as_numpy_iterator()}
    kept = {bytes(r) for r in model._records([path], holdout=False).as_numpy_iterator()}
    assert not held & kept and held | kept == set(rows)
    assert held == set(rows[::5])  # every fifth row, by its place: its bytes may differ between ExampleGen runs
    assert model._count_records([path], holdout=True) == len(held)
    assert model._count_records([path, path], holdout=False) == 2 * len(kept)
    assert model._count_records([path], holdout=None) == len(rows)
    assert held == {bytes(r) for r in model._records([path], holdout=True).as_numpy_iterator()}  # always the same


def test_results_read_tfx_s_tuner_results_best_first():
    rows = tuning.results(
        [{"trial_id": "01", "score": 1.2, "batch_size": 128}, {"trial_id": "00", "score": 1.1, "batch_size": 256}]
    )
    assert rows == [
        {"trial": 1, "val_rmse": 1.1, "values": {"batch_size": 256}},
        {"trial": 2, "val_rmse": 1.2, "values": {"batch_size": 128}},
    ]


class _Operation:
    def __init__(self, response):
        self._response = response

    def result(self):
        return self._response


class FakeVizier:
    """Vertex AI Vizier's service, as the oracle calls it: records the requests, suggests given values."""

    def __init__(self, suggestions):
        self.suggestions = list(suggestions)
        self.studies, self.created, self.completed = [], [], []

    def create_study(self, parent, study):
        self.studies.append((parent, study))
        return aiplatform_v1.Study(name=f"{parent}/studies/1", display_name=study.display_name)

    def create_trial(self, parent, trial):
        self.created.append(trial)
        return aiplatform_v1.Trial(name=f"{parent}/trials/1", parameters=trial.parameters)

    def suggest_trials(self, request):
        trials = []
        if self.suggestions:
            parameters = [
                vizier._parameter(types.SimpleNamespace(name=name), value)
                for name, value in self.suggestions.pop(0).items()
            ]
            trials = [
                aiplatform_v1.Trial(name=f"{request.parent}/trials/{len(self.created) + 2}", parameters=parameters)
            ]
        return _Operation(aiplatform_v1.SuggestTrialsResponse(trials=trials))

    def complete_trial(self, request):
        self.completed.append(request)


def _vizier_oracle(client, tmp_path, max_trials=3):
    oracle = vizier.VizierOracle(
        project="p",
        region="europe-west4",
        study_prefix="babyweight_tuner",
        client=client,
        objective=kt.Objective(tuning.OBJECTIVE, "min"),
        max_trials=max_trials,
        hyperparameters=tuning.search_space(_settings()),
    )
    oracle._set_project_dir(str(tmp_path), "p")
    return oracle


def test_the_search_space_becomes_a_vizier_study_minimizing_validation_rmse():
    spec = vizier.study_spec(tuning.search_space(_settings()), kt.Objective(tuning.OBJECTIVE, "min"))
    assert [(m.metric_id, m.goal) for m in spec.metrics] == [
        ("val_rmse", aiplatform_v1.StudySpec.MetricSpec.GoalType.MINIMIZE)
    ]
    parameters = {p.parameter_id: p for p in spec.parameters}
    assert list(parameters["hidden_units"].categorical_value_spec.values)[:2] == ["128", "128,64"]
    assert parameters["hidden_units"].categorical_value_spec.default_value == "256,128"
    assert list(parameters["batch_size"].discrete_value_spec.values) == [128.0, 256.0, 512.0]
    rate = parameters["learning_rate"]
    assert (rate.double_value_spec.min_value, rate.double_value_spec.max_value) == (0.001, 0.01)
    assert rate.scale_type == aiplatform_v1.StudySpec.ParameterSpec.ScaleType.UNIT_LOG_SCALE
    with pytest.raises(ValueError, match="Vizier takes Choice, Int and Float, not Boolean"):
        vizier.parameter_spec(kt.engine.hyperparameters.Boolean("b"))


def test_vizier_suggests_the_trials_and_learns_their_scores_and_failures(tmp_path):
    client = FakeVizier(
        [
            {
                "hidden_units": "512,256",
                "embedding_dim": 16.0,
                "learning_rate": 0.002,
                "batch_size": 128.0,
                "train_epochs": 2.0,
                "min_train_steps": 3000.0,
                "mask_rate": 0.75,
            }
        ]
    )
    oracle = _vizier_oracle(client, tmp_path)
    assert client.studies == []  # nothing is created until a trial is asked for (workers build an oracle too)
    first = oracle.create_trial("tuner0")
    parent, study = client.studies[0]
    assert parent == "projects/p/locations/europe-west4" and study.display_name.startswith("babyweight_tuner_")
    assert first.hyperparameters.values == {hp.name: hp.default for hp in oracle.hyperparameters.space}
    # In a tuning job a worker runs the trial: the chief's oracle gets it back rebuilt from KerasTuner's gRPC
    # messages, without its score, which only update_trial carried.
    remote = kt.engine.trial.Trial.from_proto(first.to_proto())
    oracle.update_trial(remote.trial_id, {tuning.OBJECTIVE: 1.05})
    remote.status = "COMPLETED"
    oracle.end_trial(kt.engine.trial.Trial.from_proto(remote.to_proto()))
    assert not client.completed[0].trial_infeasible
    assert [(m.metric_id, m.value) for m in client.completed[0].final_measurement.metrics] == [
        ("val_rmse", pytest.approx(1.05))
    ]

    second = oracle.create_trial("tuner1")
    assert second.hyperparameters.values == {
        "hidden_units": "512,256",
        "embedding_dim": 16,
        "learning_rate": 0.002,
        "batch_size": 128,
        "train_epochs": 2,
        "min_train_steps": 3000,
        "mask_rate": 0.75,
    }
    assert isinstance(second.hyperparameters.values["batch_size"], int)
    second.status, second.message = "FAILED", "Traceback...\nFailedTrialError: training diverged (validation RMSE nan)"
    oracle.end_trial(second)
    assert client.completed[1].trial_infeasible
    assert client.completed[1].infeasible_reason == "FailedTrialError: training diverged (validation RMSE nan)"
    assert oracle.create_trial("tuner0").status == "STOPPED"  # Vizier has nothing more to suggest
    assert len(client.studies) == 1


def test_tuner_fn_picks_kerastuner_locally_and_vizier_on_vertex_and_keeps_every_seed(tmp_path):
    fn_args = types.SimpleNamespace(custom_config=_settings(seed="0"), working_dir=str(tmp_path))
    tuner = tuning.tuner_fn(fn_args).tuner
    assert isinstance(tuner.oracle, tuning.ProfileFirstOracle)
    assert (tuner.oracle.max_trials, tuner.oracle.num_initial_points, tuner.oracle.seed) == (4, 2, 1)
    fn_args.custom_config = dict(
        fn_args.custom_config,
        **{tuning.VIZIER_KEY: {"project": "p", "region": "us-central1", "study_prefix": "babyweight_tuner"}},
    )
    assert isinstance(tuning.tuner_fn(fn_args).tuner.oracle, vizier.VizierOracle)


class _Failing(tuning.TrainerTrials):
    def run_trial(self, trial, *args, **kwargs):
        raise RuntimeError(f"out of memory in trial {trial.trial_id}")


def test_a_search_whose_trials_all_failed_is_an_error_not_a_best_value(tmp_path):
    from pipeline.components.trainer_executor import check_completed

    oracle = tuning.ProfileFirstOracle(
        objective=kt.Objective(tuning.OBJECTIVE, "min"),
        max_trials=2,
        hyperparameters=tuning.search_space(_settings()),
        seed=1,
    )
    tuner = _Failing(types.SimpleNamespace(), oracle, directory=str(tmp_path), project_name="p")
    tuner.search()
    # KerasTuner would hand a failed trial's values to the Trainer as the best.
    assert tuner.oracle.get_best_trials()[0].status == "FAILED"
    with pytest.raises(
        RuntimeError,
        match=r"none of the Tuner's 2 trial\(s\) completed: "
        r"RuntimeError: out of memory in trial 0; RuntimeError: out of memory",
    ):
        check_completed(tuner)


def test_a_trial_trains_on_four_fifths_and_is_scored_once_on_the_masked_fifth(monkeypatch):
    calls = []

    def spy(files, weights, transform_output, batch_size, shuffle, **kwargs):
        calls.append(dict(kwargs, shuffle=shuffle))
        return tf.data.Dataset.range(1)

    class Model:
        def fit(self, *args, **kwargs):
            calls.append({"validation_steps": kwargs["validation_steps"], "freq": kwargs["validation_freq"]})
            return types.SimpleNamespace(history={tuning.OBJECTIVE: [1.0]})

    monkeypatch.setattr(model, "_input_fn", spy)
    monkeypatch.setattr(model, "_count_records", lambda files, holdout=None: 1000)
    monkeypatch.setattr(model, "cache_fits", lambda transform_output, rows: True)
    monkeypatch.setattr(model, "build_keras_model", lambda *args, **kwargs: Model())
    settings = dict(_settings(), mask_rate=0.25)
    model.fit(settings, None, ["train"], [], {}, tf.distribute.get_strategy(), holdout=True, validation_mask_rate=0.5)
    train, validation, fitted = calls
    assert (train["holdout"], train["mask_rate"], train["repeat"], train["shuffle"]) == (False, 0.25, True, True)
    assert (validation["holdout"], validation["mask_rate"], validation["repeat"]) == (True, 0.5, False)
    assert train["cache"] and not validation["cache"]  # the trial's held-out rows are read once
    assert validation["seed"] == settings["seed"] and not validation["shuffle"]
    epochs = model.training_schedule(1000, 256, 4, 1500)[1]
    # Each held-out row once (1,000 rows: 3 full batches and a part), after the last epoch only.
    assert fitted == {"validation_steps": 4, "freq": [epochs]} and epochs > 1
    calls.clear()
    model.fit(settings, None, ["train"], ["eval"], {}, tf.distribute.get_strategy())  # the Trainer
    train, validation, fitted = calls
    assert train["holdout"] is None and validation["holdout"] is None and validation["mask_rate"] == 0.0
    assert validation["repeat"] and fitted == {"validation_steps": 4, "freq": model.validation_epochs(epochs)}
    assert train["cache"] and validation["cache"]


def test_a_diverged_trial_fails_with_the_reason(monkeypatch):
    monkeypatch.setattr(model, "fit", lambda *args, **kwargs: (None, {tuning.OBJECTIVE: [float("nan")]}))
    monkeypatch.setattr(tuning.tft, "TFTransformOutput", lambda path: None)
    trials = tuning.TrainerTrials.__new__(tuning.TrainerTrials)
    trials.fn_args = types.SimpleNamespace(custom_config=_settings(), train_files=["train"], transform_graph_path="t")
    trial = types.SimpleNamespace(trial_id="1", hyperparameters=types.SimpleNamespace(values={}))
    with pytest.raises(kt.errors.FailedTrialError, match="training diverged"):
        trials.run_trial(trial)
    monkeypatch.setattr(model, "fit", lambda *args, **kwargs: (None, {}))
    with pytest.raises(kt.errors.FailedTrialError, match="no training row was held out"):
        trials.run_trial(trial)


def test_the_summary_lists_the_trials_best_first_marking_the_choice_and_the_profile():
    from pipeline.reports import summary

    record = {
        "chosen": {"hidden_units": "128", "learning_rate": 0.0016758},
        "trials": tuning.results(
            [
                {"trial_id": "0", "score": 1.0011, "hidden_units": "256,128", "learning_rate": 0.004},
                {"trial_id": "2", "score": 0.99281, "hidden_units": "128", "learning_rate": 0.0016758},
            ]
        ),
    }
    step = types.SimpleNamespace(state="complete", seconds=197.2)
    lines = summary.tuning_lines(record, step)
    assert lines[0].startswith("  tuning: 2 trials completed in 197 s; validation RMSE on rows held out")
    assert lines[2] == "       3 *   0.9928  128           0.001676"
    assert lines[3] == "       1  p  1.0011  256,128       0.004"
    assert lines[-1] == "    chosen, the Trainer's hyperparameters: hidden_units=128, learning_rate=0.001676"
    cached = summary.tuning_lines(record, types.SimpleNamespace(state="cached", seconds=0.0), indent="")
    assert "2 trials completed (cached: an earlier run's search" in cached[0]
