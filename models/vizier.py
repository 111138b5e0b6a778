"""A KerasTuner oracle whose trials Vertex AI Vizier suggests: the Tuner's search on Vertex (models/tuning.py).

KerasTuner keeps its own books (trials, scores, the best values TFX's Tuner writes); Vizier chooses the values.
In a tuning job with parallel trials, TFX runs this oracle once, in the chief's oracle process, and the workers
ask it for trials over KerasTuner's gRPC protocol, so one study serves them all. The study is created at the
first trial (not when the oracle is built: workers build one too but never use it). Its first trial is the
profile's settings (the space's defaults); Vizier's default algorithm suggests the rest. A failed trial is
reported infeasible, so Vizier steers away from it.
"""

import datetime
from typing import Any, Dict, Optional

import keras_tuner as kt
from google.cloud import aiplatform_v1
from google.protobuf import struct_pb2
from keras_tuner.src.engine import trial as trial_module

ParameterSpec = aiplatform_v1.StudySpec.ParameterSpec


def parameter_spec(hp: kt.engine.hyperparameters.HyperParameter) -> ParameterSpec:
    """Vizier's description of one KerasTuner hyperparameter, with its default as the starting point."""
    if isinstance(hp, kt.engine.hyperparameters.Choice):
        if all(isinstance(value, str) for value in hp.values):
            return ParameterSpec(
                parameter_id=hp.name,
                categorical_value_spec=ParameterSpec.CategoricalValueSpec(
                    values=list(hp.values), default_value=hp.default
                ),
            )
        return ParameterSpec(
            parameter_id=hp.name,
            discrete_value_spec=ParameterSpec.DiscreteValueSpec(
                values=[float(value) for value in hp.values], default_value=float(hp.default)
            ),
        )
    if not isinstance(hp, (kt.engine.hyperparameters.Int, kt.engine.hyperparameters.Float)):
        raise ValueError(f"hyperparameter {hp.name}: Vizier takes Choice, Int and Float, not {type(hp).__name__}")
    scales = ParameterSpec.ScaleType
    scale = scales.UNIT_LOG_SCALE if hp.sampling == "log" else scales.UNIT_LINEAR_SCALE
    if isinstance(hp, kt.engine.hyperparameters.Int):
        return ParameterSpec(
            parameter_id=hp.name,
            scale_type=scale,
            integer_value_spec=ParameterSpec.IntegerValueSpec(
                min_value=hp.min_value, max_value=hp.max_value, default_value=hp.default
            ),
        )
    return ParameterSpec(
        parameter_id=hp.name,
        scale_type=scale,
        double_value_spec=ParameterSpec.DoubleValueSpec(
            min_value=hp.min_value, max_value=hp.max_value, default_value=hp.default
        ),
    )


def study_spec(hyperparameters: kt.HyperParameters, objective: kt.Objective) -> aiplatform_v1.StudySpec:
    """The study of a search space: its parameters and the objective metric, to minimize or maximize."""
    goal = aiplatform_v1.StudySpec.MetricSpec.GoalType
    return aiplatform_v1.StudySpec(
        metrics=[
            aiplatform_v1.StudySpec.MetricSpec(
                metric_id=objective.name, goal=goal.MINIMIZE if objective.direction == "min" else goal.MAXIMIZE
            )
        ],
        parameters=[parameter_spec(hp) for hp in hyperparameters.space],
    )


def _value(hp: kt.engine.hyperparameters.HyperParameter, value: Any) -> Any:
    """A Vizier parameter value (proto-plus gives a str or a float) as the KerasTuner hyperparameter's own type."""
    if isinstance(hp, kt.engine.hyperparameters.Choice):
        if isinstance(value, str):
            if value not in hp.values:
                raise ValueError(f"Vizier suggested {value!r} for {hp.name}, not one of its choices {hp.values}")
            return value
        return min(hp.values, key=lambda choice: abs(float(choice) - value))
    if isinstance(hp, kt.engine.hyperparameters.Int):
        return int(round(value))
    return float(value)


def _parameter(hp: kt.engine.hyperparameters.HyperParameter, value: Any) -> aiplatform_v1.Trial.Parameter:
    number = not isinstance(value, str)
    return aiplatform_v1.Trial.Parameter(
        parameter_id=hp.name,
        value=struct_pb2.Value(number_value=float(value)) if number else struct_pb2.Value(string_value=value),
    )


class VizierOracle(kt.Oracle):
    """Trials suggested by a Vertex AI Vizier study in `project` and `region`, named `study_prefix`_UTC time."""

    def __init__(self, project: str, region: str, study_prefix: str, client: Optional[Any] = None, **kwargs):
        super().__init__(**kwargs)
        self._parent = f"projects/{project}/locations/{region}"
        self._region = region
        self._display_name = f"{study_prefix}_{datetime.datetime.utcnow():%Y%m%d_%H%M%S}"
        self._client = client
        self._study: Optional[str] = None
        self._vizier_trials: Dict[str, str] = {}  # KerasTuner's trial id -> Vizier's trial name

    def _vizier(self) -> Any:
        if self._client is None:
            self._client = aiplatform_v1.VizierServiceClient(
                client_options={"api_endpoint": f"{self._region}-aiplatform.googleapis.com"}
            )
        if self._study is None:
            study = aiplatform_v1.Study(
                display_name=self._display_name, study_spec=study_spec(self.hyperparameters, self.objective)
            )
            self._study = self._client.create_study(parent=self._parent, study=study).name
        return self._client

    def populate_space(self, trial_id: str) -> Dict[str, Any]:
        client = self._vizier()
        space = {hp.name: hp for hp in self.hyperparameters.space}
        if not self.trials:  # the profile's settings first
            vizier_trial = client.create_trial(
                parent=self._study,
                trial=aiplatform_v1.Trial(parameters=[_parameter(hp, hp.default) for hp in space.values()]),
            )
        else:
            suggested = client.suggest_trials(
                request=aiplatform_v1.SuggestTrialsRequest(
                    parent=self._study, suggestion_count=1, client_id=f"tfx-tuner-{trial_id}"
                )
            ).result()
            if not suggested.trials:
                return {"status": trial_module.TrialStatus.STOPPED}
            vizier_trial = suggested.trials[0]
        self._vizier_trials[trial_id] = vizier_trial.name
        values = {
            parameter.parameter_id: _value(space[parameter.parameter_id], parameter.value)
            for parameter in vizier_trial.parameters
        }
        return {"status": trial_module.TrialStatus.RUNNING, "values": values}

    def end_trial(self, trial: kt.engine.trial.Trial) -> None:
        # `trial` may be a copy rebuilt from KerasTuner's gRPC message (a worker's trial, without score or message);
        # the oracle's own record, scored by super().end_trial, is the one to report.
        try:
            super().end_trial(trial)
        finally:
            name = self._vizier_trials.pop(trial.trial_id, None)
            if name is not None:
                self._complete(name, self.trials.get(trial.trial_id, trial))

    def _complete(self, name: str, trial: kt.engine.trial.Trial) -> None:
        """Reports a finished trial to Vizier: its score, or why it failed (an infeasible trial)."""
        if trial.status == trial_module.TrialStatus.COMPLETED and trial.score is not None:
            measurement = aiplatform_v1.Measurement(
                metrics=[aiplatform_v1.Measurement.Metric(metric_id=self.objective.name, value=trial.score)]
            )
            request = aiplatform_v1.CompleteTrialRequest(name=name, final_measurement=measurement)
        else:
            lines = (trial.message or "").strip().splitlines()
            reason = (lines[-1] if lines else f"the trial ended {trial.status}")[:500]
            request = aiplatform_v1.CompleteTrialRequest(name=name, trial_infeasible=True, infeasible_reason=reason)
        self._client.complete_trial(request=request)
