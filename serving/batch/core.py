"""The core of `babyweight predict-batch`, the same for every source and sink: records -> the model's inputs ->
predictions, in one Beam pipeline.

A source reads batches of records (an id and the original text), a sink writes predictions and rejected
records (serving/batch/io.py); the core between them is the same for every pair: each batch is read into the
model's inputs by the serving contract (`contract.to_instance`, whose check is the server's, applied a column at a
time where the values allow: `parse`), predicted by a pushed version through Beam's RunInference (a model handler
calling the version's `serving_raw` signature on the batch), and formatted as rows: the record's id, the
prediction, the model version and a timestamp. A record that can't be parsed or predicted goes to the dead-letter
output with its reason and original text; nothing stops the job.
"""

import abc
import itertools
import os
import pickle
import time
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

import apache_beam as beam
import numpy
import orjson
from apache_beam.ml.inference import base as inference

from models import features

PREDICTIONS, REJECTED = "predictions", "rejected"
BATCH_SIZE = 4096  # instances per model call: 1,024 predict at 280,000/s here, 4,096 at 500,000/s


class Record(NamedTuple):
    """One instance as read: where it came from (a file and line, a message id) and its original text."""

    id: str
    text: str
    fields: Optional[Dict[str, Any]] = None  # named values, when the source knows them (a CSV row, a table row)


BROKEN = "__error__"  # a record's field saying why its source could not read it (a CSV row's field count)


def rejected(record: Record, reason: str) -> Dict[str, Any]:
    return {"id": record.id, "reason": reason, "text": record.text}


class Batch(list):
    """Records or output rows moved through the pipeline as one element."""


class _BatchCoder(beam.coders.Coder):
    """Pickles a batch when the runner moves it, and estimates its size without encoding it: Beam samples the size
    of a step's outputs, and pickling batches of 4,096 records to measure them took a tenth of a run."""

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> Any:
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, value: Any) -> int:
        return 100 * len(value.ids if isinstance(value, Parsed) else value)  # about 100 bytes a record or row


class Parsed(NamedTuple):
    """A batch of records the contract accepts: their ids and serving_raw's inputs, one array per feature."""

    ids: List[str]
    texts: List[str]
    columns: Dict[str, Any]


beam.coders.registry.register_coder(Batch, _BatchCoder)
beam.coders.registry.register_coder(Parsed, _BatchCoder)


_PLAIN_NUMBER = {str, int, float, type(None)}  # what float() reads as the contract does: not bool, not a list
_PLAIN_TEXT = {str, bool, type(None)}  # true/false: a BigQuery BOOL column's values
_TEXT_OF = {None: "", True: "true", False: "false"}


def _plain_columns(values: Sequence[Dict[str, Any]]) -> Optional[Dict[str, numpy.ndarray]]:
    """serving_raw's inputs for instances whose values are all plain (a number or a number's text, a text or
    true/false, none),
    converted a column at a time; None if any value is not, and each instance then takes the contract's own path."""
    columns = {}
    for column in features.FEATURES:
        column_values = list(map(dict.get, values, itertools.repeat(column.name)))
        kinds = set(map(type, column_values))
        if column.dtype == "string":
            if not kinds <= _PLAIN_TEXT:
                return None
            columns[column.name] = numpy.array([_TEXT_OF.get(value, value) for value in column_values], object)
        else:
            if not kinds <= _PLAIN_NUMBER:
                return None
            try:
                columns[column.name] = numpy.array(column_values, numpy.float64).astype(numpy.float32)
            except (ValueError, TypeError):  # a text that is not a number ("" too): the contract names it
                return None
    return columns


def _perhaps_refused(columns: Dict[str, numpy.ndarray]) -> numpy.ndarray:
    """The instances the contract may refuse: that may lack a required feature (no value, or one of its 'unknown'
    codes), or hold a number outside its domain or a text too long. The contract's own check decides for each of
    these; the others pass it."""
    from serving.core import contract

    mask = numpy.zeros(len(next(iter(columns.values()))), bool)
    domains = contract.numeric_domains()
    for column in features.FEATURES:
        values = columns[column.name]
        if column.dtype == "string":
            if max(map(len, values), default=0) > contract.MAX_TEXT_CHARACTERS:
                mask |= numpy.array([len(value) > contract.MAX_TEXT_CHARACTERS for value in values], bool)
        else:
            low, high = domains[column.name]
            with numpy.errstate(invalid="ignore"):
                mask |= ~numpy.isnan(values) & ~((values >= low) & (values <= high))
    for column in features.REQUIRED_FEATURES:
        values = columns[column.name]
        if column.dtype == "string":
            mask |= values == ""
        else:
            # An integer column's value is read as the integer it truncates to (99.5 weeks is 99, 'unknown').
            read = numpy.trunc(values) if column.dtype == "int" else values
            mask |= numpy.isnan(values) | numpy.isin(read, numpy.array(column.missing_codes, numpy.float32))
    return mask


def parse(records: Sequence[Record]) -> Tuple[Optional[Parsed], List[Dict[str, Any]]]:
    """Records -> the accepted ones' model inputs, and the rejected ones with their reasons.

    The contract is `contract.to_instance` (the server's check: types, value counts, required features); a batch
    of plain values is converted a column at a time, which gives the same inputs (tests check), and only the
    instances the contract may refuse go through it one by one.
    """
    from serving.core import contract, loader

    kept, values, rejects = [], [], []
    for record in records:
        if record.fields is not None:
            if BROKEN in record.fields:
                rejects.append(rejected(record, record.fields[BROKEN]))
                continue
            fields = record.fields
        else:
            try:
                fields = orjson.loads(record.text)  # as the server reads a body: nesting limited, no NaN
            except orjson.JSONDecodeError as error:
                rejects.append(rejected(record, f"not JSON: {error}"))
                continue
            if not isinstance(fields, dict):
                rejects.append(rejected(record, "expected an object of feature values"))
                continue
            unknown = [name for name in fields if name not in features.BY_NAME]
            if unknown:  # a message may carry any of the table's columns; another name is a mistake, e.g. a typo
                rejects.append(
                    rejected(
                        record,
                        f"unknown column {unknown[0]!r} (a message takes the natality "
                        "table's columns; the model reads "
                        f"{', '.join(features.FEATURE_NAMES)})",
                    )
                )
                continue
        kept.append(record)
        values.append(fields)
    columns = _plain_columns(values) if values else None
    if columns is None:  # not plain (or nothing left): each instance through the contract
        keys, accepted = [], []
        for record, fields in zip(kept, values):
            try:
                keys.append(features.instance_key(contract.to_instance(fields)))
                accepted.append(record)
            except ValueError as error:
                rejects.append(rejected(record, str(error)))
        if not accepted:
            return None, rejects
        kept, columns = accepted, {name: tensor.numpy() for name, tensor in loader.columns_of(keys).items()}
    else:
        keep = numpy.ones(len(kept), bool)
        for index in numpy.flatnonzero(_perhaps_refused(columns)):
            try:
                contract.to_instance(values[index])
            except ValueError as error:
                rejects.append(rejected(kept[index], str(error)))
                keep[index] = False
        if not keep.all():
            kept = [record for record, kept_one in zip(kept, keep) if kept_one]
            columns = {name: array[keep] for name, array in columns.items()}
        if not kept:
            return None, rejects
    return Parsed([record.id for record in kept], [record.text for record in kept], columns), rejects


class ParseBatch(beam.DoFn):
    """A batch of records -> Parsed (the accepted ones) and rejected rows on the REJECTED output."""

    def process(self, records: Batch) -> Iterator[Any]:
        parsed, rejects = parse(records)
        for row in rejects:
            yield beam.pvalue.TaggedOutput(REJECTED, row)
        if parsed is not None:
            yield parsed


class VersionHandler(inference.ModelHandler):
    """Beam's RunInference model handler for a pushed version: serving_raw on each parsed batch.

    A batch the model refuses as a whole is predicted one instance at a time, so only the instance it refuses
    is rejected (its inference is the model's error, text); the others are predicted.
    """

    def __init__(self, version_dir: str):
        super().__init__()
        self.version_dir = version_dir

    def load_model(self) -> Any:
        """The loaded SavedModel itself: its objects (the transform's tables) live as long as it does."""
        import tensorflow as tf

        return tf.saved_model.load(self.version_dir)

    def run_inference(
        self, batch: Sequence[Parsed], model: Any, inference_args: Optional[Dict[str, Any]] = None
    ) -> Iterable[inference.PredictionResult]:
        import tensorflow as tf

        from serving.core import loader

        signature = model.signatures["serving_raw"]

        def predict(columns: Dict[str, Any]) -> numpy.ndarray:
            return signature(**columns)["predictions"].numpy().reshape(-1)

        results = []
        for parsed in batch:
            refused: Dict[int, str] = {}  # instance -> the model's reason
            try:
                predictions = predict(parsed.columns)
            except tf.errors.OpError:
                predictions = numpy.full(len(parsed.ids), numpy.nan, numpy.float32)
                for index in range(len(parsed.ids)):
                    try:
                        predictions[index] = predict(
                            {name: values[index : index + 1] for name, values in parsed.columns.items()}
                        )[0]
                    except tf.errors.OpError as error:
                        refused[index] = f"the model refused the instance: {loader.first_reason(error.message)}"
            results.append(inference.PredictionResult(parsed, (predictions, refused)))
        return results

    def get_num_bytes(self, batch: Sequence[Parsed]) -> int:
        """For Beam's metrics, without pickling each batch as the default does (a tenth of a run)."""
        return sum(_BatchCoder().estimate_size(parsed) for parsed in batch)

    def batch_elements_kwargs(self) -> Dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": 1}  # each element is a batch already

    def get_metrics_namespace(self) -> str:
        return "babyweight"


def newest_version(model_dir: str) -> str:
    """The pushed version folder with the highest number."""
    import tensorflow as tf

    versions = [name.rstrip("/") for name in tf.io.gfile.listdir(model_dir) if name.rstrip("/").isdigit()]
    if not versions:
        raise ValueError(f"{model_dir}: no pushed version (a folder named by a number) to predict with")
    return max(versions, key=int)


class Rows(beam.DoFn):
    """A predicted batch -> a batch of output rows (id, prediction, model version, timestamp); an instance the
    model refused, or answered with no finite number, is rejected with the reason."""

    def __init__(self, version: int):
        super().__init__()
        self.version = version

    def process(self, result: inference.PredictionResult) -> Iterator[Any]:
        parsed, (predictions, refused) = result.example, result.inference
        good = features.predicted(predictions)
        for index in numpy.flatnonzero(~good):
            reason = refused.get(index) or features.not_a_prediction(predictions[index])
            yield beam.pvalue.TaggedOutput(
                REJECTED, {"id": parsed.ids[index], "reason": reason, "text": parsed.texts[index]}
            )
        now, version = time.time(), self.version
        if good.all():
            ids, values = parsed.ids, predictions.tolist()
        else:
            ids, values = [parsed.ids[index] for index in numpy.flatnonzero(good)], predictions[good].tolist()
        if ids:
            yield Batch(
                {"id": record_id, "prediction": value, "model_version": version, "timestamp": now}
                for record_id, value in zip(ids, values)
            )


def failed_batch(failure: Tuple[Sequence[Parsed], Tuple[type, str, List[str]]]) -> Iterator[Dict[str, Any]]:
    """RunInference's dead letter (a batch whose prediction raised, with the error's type, repr and traceback)
    -> each instance rejected with the error."""
    batch, (_, error, _) = failure
    for parsed in batch:
        for record_id, text in zip(parsed.ids, parsed.texts):
            yield {"id": record_id, "reason": f"prediction failed: {error}", "text": text}


class Predict(beam.PTransform):
    """The core every source and sink share: batches of records -> {PREDICTIONS: batches of rows, REJECTED: rows}."""

    def __init__(self, model_dir: str, version: Optional[str] = None):
        super().__init__()
        self.version = version or newest_version(model_dir)
        self.version_dir = os.path.join(model_dir, self.version)

    def expand(self, batches: beam.PCollection):  # -> {PREDICTIONS: row batches, REJECTED: rows}
        parsed = batches | "Parse" >> beam.ParDo(ParseBatch()).with_output_types(Parsed).with_outputs(
            REJECTED, main=PREDICTIONS
        )
        predicted, failed = (
            parsed[PREDICTIONS]
            | "RunInference" >> inference.RunInference(VersionHandler(self.version_dir)).with_exception_handling()
        )
        rows = predicted | "Rows" >> beam.ParDo(Rows(int(self.version))).with_output_types(Batch).with_outputs(
            REJECTED, main=PREDICTIONS
        )
        failures = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch)
        rejects = (parsed[REJECTED], rows[REJECTED], failures) | "Rejected" >> beam.Flatten()
        return {PREDICTIONS: rows[PREDICTIONS], REJECTED: rejects}


def in_batches(records: beam.PCollection) -> beam.PCollection:
    """Records one by one (messages, table rows) -> batches for the core, within each window."""
    return (
        records
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=BATCH_SIZE)
        | "AsBatch" >> beam.Map(Batch).with_output_types(Batch)
    )


class Source(abc.ABC):
    """Reads records (an id and the original text) into a pipeline."""

    @abc.abstractmethod
    def read(self, pipeline: beam.Pipeline) -> beam.PCollection:
        """The records, as `Record`s."""


class Sink(abc.ABC):
    """Writes the predicted rows and the rejected records."""

    @abc.abstractmethod
    def write(self, predictions: beam.PCollection, rejects: beam.PCollection) -> None:
        """Adds the writes to the pipeline."""


class Counts(NamedTuple):
    read: int
    predicted: int
    rejected: int


def build(
    pipeline: beam.Pipeline, source: Source, sink: Sink, model_dir: str, version: Optional[str] = None
) -> Predict:
    """source -> the core -> sink; returns the core (its version)."""
    batches = source.read(pipeline) | "CountRead" >> beam.ParDo(Count("read", batches=True))
    core = Predict(model_dir, version)
    outputs = batches | "Predict" >> core
    rejects = outputs[REJECTED] | "CountRejected" >> beam.ParDo(Count("rejected"))
    predictions = outputs[PREDICTIONS] | "CountPredicted" >> beam.ParDo(Count("predicted", batches=True))
    sink.write(predictions, rejects)
    return core


class Count(beam.DoFn):
    """Passes elements on, counting them (or the items of each, for batches) in the job's metrics."""

    def __init__(self, name: str, batches: bool = False):
        super().__init__()
        self.counter = beam.metrics.Metrics.counter("babyweight", name)
        self.batches = batches

    def process(self, element: Any) -> Iterator[Any]:
        self.counter.inc(len(element) if self.batches else 1)
        yield element


def counts(result: Any) -> Counts:
    """Rows read (parsed or not), predicted and rejected, from the pipeline's metrics."""
    found = {}
    for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("babyweight"))["counters"]:
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + counter.committed
    return Counts(found.get("read", 0), found.get("predicted", 0), found.get("rejected", 0))
