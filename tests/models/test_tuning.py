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
    assert defaults == {"hidden_units": "256,128", "embedding_dim": 8, "learning_rate": 0.004, "batch_size": 256,
                        "train_epochs": 4, "min_train_steps": 1500, "mask_rate": 0.5}
    # A profile value outside the listed choices is searched too, as the first trial.
    odd = {hp.name: hp for hp in tuning.search_space(_settings(hidden_units="100,10", mask_rate="0.3",
                                                               learning_rate="0.05")).space}
    assert "100,10" in odd["hidden_units"].values and odd["hidden_units"].default == "100,10"
    assert 0.3 in odd["mask_rate"].values and 0.0 not in odd["mask_rate"].values
    assert odd["learning_rate"].max_value == 0.05


def test_the_first_trial_is_the_profile_then_the_search_moves_the_same_way_each_time(tmp_path):
    def trials(seed):
        space = tuning.search_space(_settings())
        oracle = tuning.ProfileFirstOracle(objective=kt.Objective(tuning.OBJECTIVE, "min"), max_trials=3,
                                           hyperparameters=space, seed=seed)
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
    fn_args = types.SimpleNamespace(custom_config=settings, hyperparameters={
        "space": [], "values": {"hidden_units": "512,256,128", "learning_rate": 0.002, "mask_rate": 0.25}})
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
    assert 300 < len(held) < 500  # about a fifth
    assert model._count_records([path], holdout=True) == len(held)
    assert held == {bytes(r) for r in model._records([path], holdout=True).as_numpy_iterator()}  # always the same


def test_results_read_tfx_s_tuner_results_best_first():
    rows = tuning.results([{"trial_id": "01", "score": 1.2, "batch_size": 128},
                           {"trial_id": "00", "score": 1.1, "batch_size": 256}])
    assert rows == [{"trial": 1, "val_rmse": 1.1, "values": {"batch_size": 256}},
                    {"trial": 2, "val_rmse": 1.2, "values": {"batch_size": 128}}]


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
            parameters = [vizier._parameter(types.SimpleNamespace(name=name), value)
                          for name, value in self.suggestions.pop(0).items()]
            trials = [aiplatform_v1.Trial(name=f"{request.parent}/trials/{len(self.created) + 2}",
                                          parameters=parameters)]
        return _Operation(aiplatform_v1.SuggestTrialsResponse(trials=trials))

    def complete_trial(self, request):
        self.completed.append(request)


def _vizier_oracle(client, tmp_path, max_trials=3):
    oracle = vizier.VizierOracle(project="p", region="europe-west4", study_prefix="babyweight_tuner", client=client,
                                 objective=kt.Objective(tuning.OBJECTIVE, "min"), max_trials=max_trials,
                                 hyperparameters=tuning.search_space(_settings()))
    oracle._set_project_dir(str(tmp_path), "p")
    return oracle


def test_the_search_space_becomes_a_vizier_study_minimizing_validation_rmse():
    spec = vizier.study_spec(tuning.search_space(_settings()), kt.Objective(tuning.OBJECTIVE, "min"))
    assert [(m.metric_id, m.goal) for m in spec.metrics] == [
        ("val_rmse", aiplatform_v1.StudySpec.MetricSpec.GoalType.MINIMIZE)]
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
    client = FakeVizier([{"hidden_units": "512,256", "embedding_dim": 16.0, "learning_rate": 0.002,
                          "batch_size": 128.0, "train_epochs": 2.0, "min_train_steps": 3000.0, "mask_rate": 0.75}])
    oracle = _vizier_oracle(client, tmp_path)
    assert client.studies == []  # nothing is created until a trial is asked for (workers build an oracle too)
    first = oracle.create_trial("tuner0")
    parent, study = client.studies[0]
    assert parent == "projects/p/locations/europe-west4" and study.display_name.startswith("babyweight_tuner_")
    assert first.hyperparameters.values == {hp.name: hp.default for hp in oracle.hyperparameters.space}
    oracle.update_trial(first.trial_id, {tuning.OBJECTIVE: 1.05})
    first.status = "COMPLETED"
    oracle.end_trial(first)
    assert client.completed[0].final_measurement.metrics[0].value == pytest.approx(1.05)

    second = oracle.create_trial("tuner1")
    assert second.hyperparameters.values == {"hidden_units": "512,256", "embedding_dim": 16, "learning_rate": 0.002,
                                             "batch_size": 128, "train_epochs": 2, "min_train_steps": 3000,
                                             "mask_rate": 0.75}
    assert isinstance(second.hyperparameters.values["batch_size"], int)
    second.status, second.message = "FAILED", "Traceback...\nFailedTrialError: training diverged (validation RMSE nan)"
    oracle.end_trial(second)
    assert client.completed[1].trial_infeasible
    assert client.completed[1].infeasible_reason == "FailedTrialError: training diverged (validation RMSE nan)"
    assert oracle.create_trial("tuner0").status == "STOPPED"  # Vizier has nothing more to suggest
    assert len(client.studies) == 1
