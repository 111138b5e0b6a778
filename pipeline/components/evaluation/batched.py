"""The Evaluator's metrics a batch of rows at a time, inside TFMA's own evaluation: same inputs, outputs and blessing.

TFMA evaluates each eval row once per slice and per metric in Python (about 0.6 ms a row per process here). For the
EvalConfigs this project writes (pipeline/components/evaluator.py: example counts, this project's weighted RMSE and
MAE, overall and per slice of one feature, with value and change thresholds against a baseline), this module
computes the same numbers with vectorised work per batch of rows:
- each model's predictions and transformed features from the signatures TFMA calls (ModelSpec.signature_name and
  preprocessing_function_names), on a batch of serialized examples at a time;
- the slices as TFMA finds them (the models' transformed features first, then the raw features), their keys made
  by TFMA's own SingleSliceSpec, once per distinct value;
- per slice and model, the sums TFMA's combiners add (weight, weight x error, weight x error squared; the error is
  the float32 difference, the products float64), merged across bundles and Beam workers, and turned into TFMA's
  MetricKeys and values, with the candidate-minus-baseline diffs TFMA adds.
It runs as a TFMA Evaluator inside `tfma.ExtractEvaluateAndWriteResults`, so the EvalConfig's defaults, the files
(metrics, plots, attributions, validations, eval_config.json, read by `tfma.load_eval_result`) and the validation
against the thresholds (hence TFX's ModelBlessing) are TFMA's own. An EvalConfig it can't compute (`unsupported`
says why) is evaluated by TFMA's own extractors and evaluators, as is every config when the Evaluator is asked to
(`evaluator_engine: tfma`). Tests hold it to TFMA on the real export (tests/pipeline/components/
test_batched_evaluation.py: `test_*_matches_tfma`).
"""

import collections
import json
import logging
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import tensorflow as tf
import tensorflow_model_analysis as tfma
from apache_beam.transforms import window
from apache_beam.utils import windowed_value
from tensorflow_model_analysis import constants
from tensorflow_model_analysis.evaluators import metrics_validator
from tensorflow_model_analysis.metrics import metric_types
from tensorflow_model_analysis.slicer import slicer_lib
from tfx_bsl.coders import example_coder

from pipeline.components.evaluation import tfma_metrics

ROWS_PER_CALL = 8192  # serialized examples per model call
# What each metric adds up, per slice and model: the index of its sums (see _Sums).
WEIGHT, ABS_ERRORS, ABS_WEIGHTS, SQUARED_ERRORS, SQUARED_WEIGHTS = range(5)
METRICS = {  # class name in the EvalConfig -> the metric's name in TFMA's output
    "ExampleCount": "example_count",
    "WeightedExampleCount": "weighted_example_count",
    **tfma_metrics.NAMES,
}
STAGE = "BatchedMetrics"
# The output a model's prediction is read from when it has several, in TFMA's order (model_util).
PREDICTION_KEYS = ("scores", "outputs", "predictions", "logistic", "probabilities", "logits")


def unsupported(eval_config: tfma.EvalConfig, extractors: Any = None, slice_spec: Any = None) -> Optional[str]:
    """Why the batched evaluation can't compute this evaluation (TFMA then does), or None if it can."""
    if extractors or slice_spec:
        return "custom extractors or a legacy slice spec"
    if eval_config.cross_slicing_specs:
        return "cross slicing"
    for spec in eval_config.slicing_specs:
        if len(spec.feature_keys) > 1 or spec.feature_values or spec.slice_keys_sql:
            return f"slicing on {tfma.SlicingSpec.__name__}({spec}) (one feature or none only)"
    options = eval_config.options
    if options.compute_confidence_intervals.value or options.min_slice_size.value > 1:
        return "confidence intervals or a minimum slice size"
    if not options.HasField("include_default_metrics") or options.include_default_metrics.value:
        return "the model's default metrics (include_default_metrics unset or true)"
    if not 1 <= len(eval_config.model_specs) <= 2:
        return f"{len(eval_config.model_specs)} models"
    if not all(model.example_weight_key for model in eval_config.model_specs):
        return "unweighted metrics (a model spec without example_weight_key)"
    for model in eval_config.model_specs:
        if (
            not model.signature_name
            or len(model.preprocessing_function_names) > 1
            or model.prediction_key
            or model.label_keys
            or model.example_weight_keys
            or model.prediction_keys
        ):
            return f"model spec {model.name!r}: one signature, at most one preprocessing function, one output"
    for metrics_spec in eval_config.metrics_specs:
        if metrics_spec.binarize.ByteSize() or metrics_spec.aggregate.ByteSize() or metrics_spec.query_key:
            return "binarized, aggregated or query metrics"
        if metrics_spec.output_names:
            return "named outputs"
        if metrics_spec.HasField("example_weights"):
            return "example_weights options (weighted metrics only)"
        for metric in metrics_spec.metrics:
            if metric.class_name not in METRICS or (
                metric.class_name in tfma_metrics.NAMES and metric.module != tfma_metrics.__name__
            ):
                return f"metric {metric.class_name}"
            if "name" in (json.loads(metric.config) if metric.config else {}):
                return f"metric {metric.class_name} under another name"
    for model in eval_config.model_specs:
        if model.model_type not in ("", tfma.TF_GENERIC, tfma.TF_KERAS):
            return f"model type {model.model_type}"
    return None


def evaluators(eval_config: tfma.EvalConfig, eval_shared_models: Sequence[Any]) -> Tuple[list, list]:
    """(extractors, evaluators) for tfma.ExtractEvaluateAndWriteResults: the input as it is, then the batched
    metrics."""
    paths = {model.model_name: model.model_path for model in eval_shared_models}
    keep = tfma.extractors.Extractor(stage_name="BatchedInput", ptransform=beam.Map(lambda extracts: extracts))
    evaluate = tfma.evaluators.Evaluator(
        stage_name=STAGE, run_after="BatchedInput", ptransform=_Evaluate(eval_config=eval_config, model_paths=paths)
    )
    return [keep], [evaluate]


@beam.ptransform_fn
def _Evaluate(extracts: beam.PCollection, eval_config: tfma.EvalConfig, model_paths: Dict[str, str]) -> Dict:  # noqa: N802
    metrics = (
        extracts
        | "SliceSums" >> beam.ParDo(_SliceSums(eval_config, model_paths))
        | "MergeSums" >> beam.CombinePerKey(_AddArrays())
        | "ToMetrics" >> beam.Map(_to_metrics, eval_config)
    )
    nothing = metrics | "NoPlots" >> beam.Map(lambda sliced: (sliced[0], {}))  # TFMA writes an empty entry a slice
    # The thresholds checked by TFMA's own validator, as TFMA's evaluator does: the blessing is TFMA's verdict.
    validations = metrics | "ValidateMetrics" >> beam.Map(metrics_validator.validate_metrics, eval_config)
    return {
        constants.METRICS_KEY: metrics,
        constants.PLOTS_KEY: nothing,
        constants.ATTRIBUTIONS_KEY: nothing,
        constants.VALIDATIONS_KEY: validations,
    }


class _AddArrays(beam.CombineFn):
    """Elementwise sums of the per-bundle sums of a slice."""

    def create_accumulator(self) -> Optional[np.ndarray]:
        return None

    def add_input(self, total: Optional[np.ndarray], sums: np.ndarray) -> np.ndarray:
        return sums.copy() if total is None else total + sums

    def merge_accumulators(self, totals: Iterable[Optional[np.ndarray]]) -> Optional[np.ndarray]:
        found = [total for total in totals if total is not None]
        return sum(found[1:], found[0].copy()) if found else None

    def extract_output(self, total: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return total


class _SliceSums(beam.DoFn):
    """A bundle's rows -> (slice key, sums[model, 5]) once per slice at the bundle's end."""

    def __init__(self, eval_config: tfma.EvalConfig, model_paths: Dict[str, str]):
        self._config = eval_config
        self._paths = model_paths

    def setup(self) -> None:
        self._models = []
        for spec in self._config.model_specs:
            loaded = tf.saved_model.load(self._paths[spec.name])
            transform = (
                loaded.signatures[spec.preprocessing_function_names[0]] if spec.preprocessing_function_names else None
            )
            score = loaded.signatures[spec.signature_name]
            inputs = [list(function.structured_input_signature[1]) for function in (score, transform) if function]
            if any(len(names) != 1 for names in inputs):
                raise ValueError(f"model {spec.name!r}: its signatures must take one input, serialized examples")
            self._models.append((spec, loaded, (score, inputs[0][0]), transform and (transform, inputs[-1][0])))
        # TFMA counts a row once per slice key, however many specs give it: duplicate specs are one.
        self._slices = list(
            dict.fromkeys(slicer_lib.SingleSliceSpec(spec=spec) for spec in self._config.slicing_specs)
        ) or [slicer_lib.SingleSliceSpec()]
        self._decoder = example_coder.ExamplesToRecordBatchDecoder()
        self._keys: Dict[Tuple[int, Any], List] = {}

    def start_bundle(self) -> None:
        self._batches: List[Tuple[List[bytes], Optional[pa.RecordBatch]]] = []  # waiting for a model call
        self._waiting = 0
        self._sums: Dict[Any, np.ndarray] = {}

    def process(self, extracts: Dict[str, Any]) -> Iterator[Any]:
        batch = extracts.get(constants.ARROW_RECORD_BATCH_KEY)
        records = _records(extracts)
        self._batches.append((records, batch if isinstance(batch, pa.RecordBatch) else None))
        self._waiting += len(records)
        if self._waiting >= ROWS_PER_CALL:
            self._flush()
        return iter(())

    def _flush(self) -> None:
        batches, self._batches, self._waiting = self._batches, [], 0
        records = [record for records, _ in batches for record in records]
        if records:
            self._add(records, batches)

    def finish_bundle(self) -> Iterator[windowed_value.WindowedValue]:
        if self._batches:
            self._flush()
        for key, sums in self._sums.items():
            yield windowed_value.WindowedValue(
                (key, sums), window.GlobalWindow().max_timestamp(), [window.GlobalWindow()]
            )

    def _add(self, records: List[bytes], batches: List[Tuple[List[bytes], Optional[pa.RecordBatch]]]) -> None:
        serialized = tf.constant(records, dtype=tf.string)
        answers = []
        rows = len(records)
        for spec, _, (score, score_input), transform in self._models:
            transformed = {}
            if transform:
                function, name = transform
                transformed = {k: v.numpy() for k, v in function(**{name: serialized}).items()}
            prediction = _prediction(spec, score(**{score_input: serialized}), rows)
            label, weight = (_column(spec, transformed, key, rows) for key in (spec.label_key, spec.example_weight_key))
            answers.append((transformed, prediction, label, weight))
        for index, spec in enumerate(self._slices):
            if not spec._columns:  # noqa: SLF001 (TFMA's own spec: the overall slice)
                self._add_slice((), np.ones(len(records), bool), answers)
                continue
            (column,) = spec._columns  # noqa: SLF001
            found = [t[column].reshape(len(records), -1) for t, *_ in answers if column in t]
            if found:
                values = np.concatenate(found, axis=1)  # a row's values in any model's transformed features
            else:
                values = self._raw_values(batches, column)
                if values is None:
                    continue
            for value in _distinct(values):
                matching = (values == value) if value == value else (values != values)  # NaN: one slice, as TFMA's
                for key in self._slice_keys(index, spec, column, value):
                    self._add_slice(key, matching.any(axis=1), answers)

    def _raw_values(self, batches: List[Tuple[List[bytes], Optional[pa.RecordBatch]]], column: str) -> Any:
        """A raw feature's values for the rows of `batches`, from the Arrow batches TFMA's input decoded (decoded
        here only where the input came as bytes); None if no row has the feature."""
        parts = []
        for records, batch in batches:
            decoded = batch if batch is not None else self._decoder.DecodeBatch(records)
            parts.append(_raw_values(decoded, column, len(records)))
        if all(part is None for part in parts):
            return None
        width = max(part.shape[1] for part in parts if part is not None)
        values = np.full((sum(len(records) for records, _ in batches), width), None, object)
        start = 0
        for (records, _), part in zip(batches, parts):
            if part is not None:
                values[start : start + len(records), : part.shape[1]] = part
            start += len(records)
        return values

    def _slice_keys(self, index: int, spec: slicer_lib.SingleSliceSpec, column: str, value: Any) -> List:
        """TFMA's slice keys for a row whose `column` holds `value` (made by TFMA's spec, once per value)."""
        cache_key = (index, value.item() if hasattr(value, "item") else value)
        if cache_key not in self._keys:
            accessor = tfma.slicer.slice_accessor.SliceAccessor([{column: np.array([value])}])
            self._keys[cache_key] = list(spec.generate_slices(accessor))
        return self._keys[cache_key]

    def _add_slice(self, key: Any, rows: np.ndarray, answers: List) -> None:
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = np.zeros((len(answers), 5))
        for model, (_, prediction, label, weight) in enumerate(answers):
            weights = np.ones(int(rows.sum()), np.float32) if weight is None else weight[rows]
            sums[model, WEIGHT] += weights.astype(np.float64).sum()
            if label is None:
                continue
            # The float32 difference, then float64 products, as TFMA's combiners have them (safe_to_scalar).
            difference = (label[rows] - prediction[rows]).astype(np.float64)
            weights = weights.astype(np.float64)
            for errors, total, weight_total in (
                (np.abs(difference), ABS_ERRORS, ABS_WEIGHTS),
                (difference * difference, SQUARED_ERRORS, SQUARED_WEIGHTS),
            ):
                kept = ~np.isnan(errors)
                sums[model, total] += (errors[kept] * weights[kept]).sum()
                sums[model, weight_total] += weights[kept].sum()


def _records(extracts: Dict[str, Any]) -> List[bytes]:
    """The serialized examples of a batch of TFMA's extracts (an Arrow batch with the raw records, or inputs)."""
    batch = extracts.get(constants.ARROW_RECORD_BATCH_KEY)
    if isinstance(batch, pa.RecordBatch):
        column = batch.column(batch.schema.get_field_index(constants.ARROW_INPUT_COLUMN))
        return column.flatten().to_pylist()
    inputs = extracts[constants.INPUT_KEY]
    return list(inputs) if isinstance(inputs, (list, np.ndarray)) else [inputs]


def _raw_values(batch: pa.RecordBatch, column: str, rows: int) -> Optional[np.ndarray]:
    """A raw feature's values, a row of [rows, most values in a row] per example (None where it has fewer); None if
    no example of the batch has the feature."""
    index = batch.schema.get_field_index(column)
    if index < 0:
        return None
    lists = batch.column(index)
    lengths = pa.compute.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = lists.flatten().to_numpy(zero_copy_only=False)
    values = np.full((rows, max(1, int(lengths.max(initial=0)))), None, object)
    parents = np.repeat(np.arange(rows), lengths)
    starts = np.cumsum(lengths) - lengths
    values[parents, np.arange(len(flat)) - starts[parents]] = flat
    return values


def _distinct(values: np.ndarray) -> List[Any]:
    """The distinct values of a slice column (no value: None, left out), every NaN as one."""
    found: Dict[Any, None] = collections.OrderedDict()
    for value in values.ravel():
        if value is not None:
            found.setdefault(float("nan") if value != value else value, None)
    return list(found)


def _prediction(spec: Any, outputs: Dict[str, tf.Tensor], rows: int) -> np.ndarray:
    """A row's prediction from a model's outputs, the key chosen as TFMA chooses it; one value per row."""
    if len(outputs) == 1:
        prediction = next(iter(outputs.values()))
    else:
        key = next((key for key in PREDICTION_KEYS if key in outputs), None)
        if key is None:
            raise ValueError(f"model {spec.name!r}: no prediction among its outputs {sorted(outputs)}")
        prediction = outputs[key]
    prediction = prediction.numpy().reshape(rows, -1)
    if prediction.shape[1] != 1:
        raise ValueError(f"model {spec.name!r}: {prediction.shape[1]} values a row; the batched metrics take one")
    return prediction[:, 0]


def _column(spec: Any, transformed: Dict[str, np.ndarray], key: str, rows: int) -> Optional[np.ndarray]:
    """A label or weight column (one value a row) from the preprocessing function's outputs; None without a key."""
    if not key:
        return None
    if key not in transformed:
        raise ValueError(
            f"model {spec.name!r}: {key!r} is not among its preprocessing function's outputs, where the batched "
            "Evaluator reads labels and weights (set evaluator_engine: tfma to read them from the raw features)"
        )
    column = transformed[key].reshape(rows, -1)
    if column.shape[1] != 1:
        raise ValueError(f"model {spec.name!r}: {key!r} has {column.shape[1]} values a row; one is taken")
    return column[:, 0]


def _to_metrics(sliced: Tuple[Any, np.ndarray], eval_config: tfma.EvalConfig) -> Tuple[Any, Dict]:
    """A slice's sums -> TFMA's metrics dict: each configured metric per model, then the candidate's diffs."""
    key, sums = sliced
    names = [spec.name for spec in eval_config.model_specs]
    baseline = next((spec.name for spec in eval_config.model_specs if spec.is_baseline), None)
    metrics = {}
    for metrics_spec in eval_config.metrics_specs:
        models = list(metrics_spec.model_names) or names
        for metric in metrics_spec.metrics:
            name = METRICS[metric.class_name]
            for model in models:
                row = sums[names.index(model)]
                metric_key = metric_types.MetricKey(name=name, model_name=model, example_weighted=True)
                metrics[metric_key] = _value(metric.class_name, row)
    if baseline:
        for metric_key, value in list(metrics.items()):
            base = metric_key.make_baseline_key(baseline)
            if metric_key.model_name != baseline and base in metrics:
                metrics[metric_key.make_diff_key()] = value - metrics[base]
    return key, metrics


def _value(class_name: str, row: np.ndarray) -> float:
    """A weighted metric's value from its slice's sums (unsupported() leaves unweighted ones to TFMA)."""
    if class_name in ("ExampleCount", "WeightedExampleCount"):
        return float(row[WEIGHT])
    if class_name == "WeightedMeanAbsoluteError":
        return float(row[ABS_ERRORS] / row[ABS_WEIGHTS]) if row[ABS_WEIGHTS] else float("nan")
    mean = row[SQUARED_ERRORS] / row[SQUARED_WEIGHTS] if row[SQUARED_WEIGHTS] else float("nan")
    return float(np.sqrt(mean))


def log_engine(reason: Optional[str]) -> None:
    if reason:
        logging.warning(
            "Evaluator: TFMA evaluates this EvalConfig row by row (the batched evaluation can't: %s)", reason
        )
    else:
        logging.info("Evaluator: batched evaluation (pipeline/components/evaluation/batched.py), TFMA's outputs")
