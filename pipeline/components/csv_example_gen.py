"""TFX's CsvExampleGen at Arrow speed, reading a file's header as the CSV check does (pipeline/components/csv_check.py).

TFX 1.16's CsvExampleGen converts each row in Python and moves each record through Beam on its own (about
0.3 ms a row here). This executor keeps TFX's executor (`BaseExampleGenExecutor`: its configuration, split
names and artifact properties; the driver's spans and fingerprints, caching and ML Metadata) and moves batches
of records: `_CsvToExample` turns a split's files into them, `Executor` splits them with TFX's partition
function and writes one gzipped TFRecord file per batch. The records:

- pyarrow's CSV reader parses each file into record batches of text columns (quoted values, quoted line
  breaks, CRLF and blank lines read as TFX's reader reads them);
- each column's type is inferred as TFX infers it (`tfx_bsl`'s rules: integer, else float, else text, over all
  files of the split; a column with no value has no type), with Arrow's casts where they decide it and TFX's own
  rule on the distinct values where they can't;
- tfx-bsl's `RecordBatchToExamplesEncoder` encodes each column, and the columns are joined in name order.

The records are byte for byte what TFX's CsvExampleGen writes serialized deterministically (a test holds it to
that), so TFX's hash split puts every row where TFX's own executor puts it, and a rerun writes the same bytes.
TFX 1.16's own reader also splits the first line on commas as it is: a UTF-8 byte-order mark (Excel's
"CSV UTF-8") becomes part of the first column's name, and a header written with quotes (R's write.csv) keeps
them in every name. Here the header is parsed by Python's csv module without the mark.
"""

import concurrent.futures
import itertools
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf
from google.protobuf import wrappers_pb2
from pyarrow import csv as pa_csv
from tfx import types
from tfx import v1 as tfx
from tfx.components.example_gen import base_example_gen_executor as base_executor
from tfx.components.example_gen import utils as example_gen_utils
from tfx.components.example_gen import write_split
from tfx.components.example_gen.component import FileBasedExampleGen
from tfx.components.example_gen.csv_example_gen import executor as csv_executor
from tfx.components.util import examples_utils
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2, range_config_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils
from tfx_bsl.coders import csv_decoder, example_coder

from models import features
from pipeline.components import csv_check

ColumnType = csv_decoder.ColumnType
BLOCK_BYTES = 16 << 20  # pyarrow reads (and parses on its threads) this much of a file at a time
GZIP_LEVEL = 1  # zlib level 1: two thirds of the default level 6 time, files 30% larger (measured)
ENCODE_ROWS = 65_536  # rows encoded per call: large enough that per-call costs vanish, small enough for the cache
# Arrow's kernels and most of tfx-bsl's encoder release the GIL: columns are converted on every core.
_THREADS = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="csv-columns")
NO_KIND = pa.large_list(pa.int64())  # a column without a value: null lists, which tfx-bsl encodes as Feature()


def column_names(path: str) -> List[str]:
    """The column names in a CSV file's first line, as the CSV check reads them."""
    with fileio.open(path, "rb") as handle:
        return csv_check.header_names(handle.readline().decode("utf-8"))


def read_text_batches(path: str, names: List[str]) -> Iterator[pa.RecordBatch]:
    """The rows of a CSV file after its header, as record batches of text columns named `names` ('' = empty)."""
    options = dict(
        read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1, block_size=BLOCK_BYTES),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    try:
        with beam.io.filesystems.FileSystems.open(path) as handle:  # as TFX's reader opens it (GCS included)
            yield from pa_csv.open_csv(handle, **options)
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path}: {error}") from error


def _present(column: pa.Array) -> pa.Array:
    return pc.not_equal(column, "")


def _python_type(values: pa.Array) -> ColumnType:
    """TFX's own rule (int(), else float(), else text) on each distinct value, the widest type."""
    return max(
        (
            csv_decoder._InferValueType(value.encode())  # pylint: disable=protected-access
            for value in pc.unique(values).to_pylist()
        ),
        default=ColumnType.UNKNOWN,
    )


def infer_type(column: pa.Array) -> ColumnType:
    """The type TFX's ColumnTypeInferrer gives a column of text values: INT if every value is an int64 integer,
    else FLOAT if every value is a number, else STRING; UNKNOWN without a value."""
    values = pc.filter(column, _present(column))
    if len(values) == 0:
        return ColumnType.UNKNOWN
    try:
        csv_check.arrow_numbers(values, int)
        return ColumnType.INT
    except pa.ArrowInvalid:
        pass
    try:
        csv_check.arrow_numbers(values, float)
    except pa.ArrowInvalid:  # text, or numbers Python reads and Arrow doesn't (' 7', '1_000')
        return _python_type(values)
    # All numbers, but an integer beyond int64 makes TFX's column text.
    integers = pc.filter(values, pc.match_substring_regex(values, r"^\s*[+-]?[0-9_]+\s*$"))
    return max(ColumnType.FLOAT, _python_type(integers))


def infer_types(batch: pa.RecordBatch) -> Dict[str, ColumnType]:
    return dict(zip(batch.schema.names, _THREADS.map(infer_type, batch.columns)))


class MergeTypes(beam.CombineFn):
    """The widest type of each column over all batches (UNKNOWN < INT < FLOAT < STRING), as TFX merges them."""

    def create_accumulator(self) -> Dict[str, ColumnType]:
        return {}

    def add_input(self, accumulator: Dict[str, ColumnType], types: Dict[str, ColumnType]) -> Dict[str, ColumnType]:
        for name, column_type in types.items():
            accumulator[name] = max(column_type, accumulator.get(name, ColumnType.UNKNOWN))
        return accumulator

    def merge_accumulators(self, accumulators: List[Dict[str, ColumnType]]) -> Dict[str, ColumnType]:
        merged: Dict[str, ColumnType] = {}
        for accumulator in accumulators:
            self.add_input(merged, accumulator)
        return merged

    def extract_output(self, accumulator: Dict[str, ColumnType]) -> Dict[str, ColumnType]:
        return accumulator


def _values(column: pa.Array, column_type: ColumnType) -> pa.Array:
    """A column's non-empty text values as TFX's handlers convert them (int(), float() then float32, bytes)."""
    if column_type == ColumnType.STRING:
        return pc.cast(column, pa.large_binary())
    convert = int if column_type == ColumnType.INT else float
    try:
        values = csv_check.arrow_numbers(column, convert)
    except pa.ArrowInvalid:  # numbers Python reads and Arrow doesn't (see infer_type)
        values = pa.array([convert(value) for value in column.to_pylist()], pa.int64() if convert is int else None)
    return values if column_type == ColumnType.INT else pc.cast(values, pa.float32())


def feature_lists(column: pa.Array, column_type: ColumnType) -> pa.Array:
    """One list per row: the value, or an empty list for an empty field; a null list (a feature without a
    kind, as TFX writes it) in every row of a column without a value."""
    if column_type == ColumnType.UNKNOWN:
        return pa.nulls(len(column), NO_KIND)
    present = _present(column)
    offsets = np.zeros(len(column) + 1, np.int64)
    np.cumsum(present.to_numpy(zero_copy_only=False), out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), _values(pc.filter(column, present), column_type))


def _varints(numbers: np.ndarray) -> pa.Array:
    """Each number as a protobuf varint, as a binary array."""
    numbers = numbers.astype(np.int64)
    sizes = 1 + sum((numbers >= 1 << shift).astype(np.int64) for shift in (7, 14, 21, 28))
    data = np.zeros((len(numbers), 5), np.uint8)
    for place in range(5):
        data[:, place] = ((numbers >> 7 * place) & 0x7F) | np.where(place < sizes - 1, 0x80, 0)
    offsets = np.zeros(len(numbers) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    return pa.Array.from_buffers(
        pa.binary(), len(numbers), [None, pa.py_buffer(offsets), pa.py_buffer(data[np.arange(5) < sizes[:, None]])]
    )


def _header_size(record: bytes) -> int:
    """Bytes before an Example's first field: its tag and the varint length that follows it."""
    size = 1
    while record[size] & 0x80:
        size += 1
    return size + 1


class BatchEncoder:
    """Serialized tf.Examples of text record batches, with the columns' types, byte for byte what TFX's
    CsvExampleGen makes of the rows serialized deterministically: its features in name order.

    tfx-bsl's encoder writes a row's features in an order that changes from process to process, so each
    column is encoded on its own, and the columns' map entries joined in name order behind the Example's
    header (field 1 `features`, its length, field 1 of Features for each entry)."""

    def __init__(self):
        self._encoder = example_coder.RecordBatchToExamplesEncoder()

    def _entries(self, name: str, lists: pa.Array) -> pa.Array:
        """Each row's map entry of `name` (tag, length, key, Feature), cut out of a one-feature Example."""
        examples = pa.array(self._encoder.encode(pa.RecordBatch.from_arrays([lists], [name])), pa.binary())
        # A one-feature Example is 0x0a (field 1, Features), the varint length of its Features, then the
        # entry with its own tag and length; one byte of length below 128, else cut per row.
        if len(examples) and pc.max(pc.binary_length(examples)).as_py() < 2 + 128:
            return pc.binary_replace_slice(examples, start=0, stop=2, replacement=b"")
        return pa.array([record[_header_size(record) :] for record in examples.to_pylist()], pa.binary())

    def encode(self, batch: pa.RecordBatch, types: Dict[str, ColumnType]) -> List[bytes]:
        columns = dict(zip(batch.schema.names, batch.columns))

        def entries(name: str) -> Any:
            column_type = types.get(name, ColumnType.UNKNOWN)
            if column_type == ColumnType.UNKNOWN:  # the same entry in every row: encoded once
                return self._entries(name, feature_lists(columns[name][:1], column_type))[0]
            return self._entries(name, feature_lists(columns[name], column_type))

        entries = list(_THREADS.map(entries, sorted(columns)))
        body = pc.binary_join_element_wise(*entries, b"")
        if isinstance(body, pa.Scalar):  # no column has a value: every row is the same
            body = pa.array([body.as_py()] * batch.num_rows, pa.binary())
        header = _varints(pc.binary_length(body).to_numpy(zero_copy_only=False))
        return pc.binary_join_element_wise(pc.binary_join_element_wise(b"\x0a", header, b""), body, b"").to_pylist()


Records = Tuple[str, List[bytes]]  # serialized tf.Examples of consecutive rows, and a name for them: "FILE-BATCH"


class _ReadTextBatches(beam.DoFn):
    def __init__(self, names: List[str]):
        self._names = names

    def process(self, numbered_path: Tuple[int, str]) -> Iterator[Tuple[str, pa.RecordBatch]]:
        number, path = numbered_path
        batches = (
            whole.slice(start, ENCODE_ROWS)
            for whole in read_text_batches(path, self._names)
            for start in range(0, whole.num_rows, ENCODE_ROWS)
        )
        for index, batch in enumerate(batches):
            yield f"{number:05d}-{index:05d}", batch


class _EncodeBatch(beam.DoFn):
    def setup(self):
        self._encoder = BatchEncoder()

    def process(self, named_batch: Tuple[str, pa.RecordBatch], types: Dict[str, ColumnType]) -> Iterator[Records]:
        name, batch = named_batch
        yield name, self._encoder.encode(batch, types)


@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(Records)
class _CsvToExample(csv_executor._CsvToExample):  # pylint: disable=protected-access
    """A split's CSV files as batches of serialized tf.Examples (see the module's docstring), the header read
    by `column_names`."""

    def expand(self, pipeline: beam.Pipeline) -> beam.pvalue.PCollection:
        csv_files = fileio.glob(self._csv_pattern)
        if not csv_files:
            raise RuntimeError(f"Split pattern {self._csv_pattern} does not match any files.")
        names = column_names(csv_files[0])
        for path in csv_files[1:]:
            if column_names(path) != names:
                raise RuntimeError(f"Files in same split {self._csv_pattern} have different header.")
        batches = (
            pipeline
            | "CreateFilenames" >> beam.Create(list(enumerate(csv_files)))
            | "ReadCsv" >> beam.ParDo(_ReadTextBatches(names))
        )
        types = beam.pvalue.AsSingleton(
            batches
            | "BatchColumnTypes" >> beam.Map(lambda named_batch: infer_types(named_batch[1]))
            | "InferColumnTypes" >> beam.CombineGlobally(MergeTypes())
        )
        return batches | "ToTFExample" >> beam.ParDo(_EncodeBatch(), types)


class _SplitBatch(beam.DoFn):
    """Each record of a batch to its output split by TFX's own partition function (a hash of its bytes)."""

    def __init__(self, buckets: List[int], split_config: example_gen_pb2.SplitConfig):
        self._buckets = buckets
        self._split_config = split_config

    def process(self, records: Records) -> Iterator[beam.pvalue.TaggedOutput]:
        name, batch = records
        parts: List[List[bytes]] = [[] for _ in self._buckets]
        for record in batch:
            parts[
                base_executor._PartitionFn(  # pylint: disable=protected-access
                    record, len(self._buckets), self._buckets, self._split_config
                )
            ].append(record)
        for index, part in enumerate(parts):
            if part:
                yield beam.pvalue.TaggedOutput(str(index), (name, part))


class _WriteBatch(beam.DoFn):
    """Each batch to its own gzipped TFRecord file in the split's folder, under a temporary name until complete."""

    def __init__(self, folder: str):
        self._folder = folder

    def process(self, records: Records) -> None:
        name, batch = records
        path = os.path.join(self._folder, f"{write_split.DEFAULT_FILE_NAME}-{name}.gz")
        temporary = os.path.join(self._folder, f".{write_split.DEFAULT_FILE_NAME}-{name}.gz.tmp")
        with tf.io.TFRecordWriter(
            temporary, tf.io.TFRecordOptions(compression_type="GZIP", compression_level=GZIP_LEVEL)
        ) as writer:
            for record in batch:
                writer.write(record)
        fileio.rename(temporary, path, overwrite=True)


class Executor(csv_executor.Executor):
    """TFX's CsvExampleGen executor (its configuration, split names, payload format and artifacts) moving
    batches of records instead of one record at a time: `_CsvToExample` reads them, `_SplitBatch` splits them
    with TFX's partition function, `_WriteBatch` writes them. Beam's per-record work (TFX's split, a shuffle and
    a sink per record) cost more than reading and encoding them."""

    input_transform = _CsvToExample

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:  # noqa: N802 (TFX's name)
        return self.input_transform

    def GenerateExamplesByBeam(
        self,
        pipeline: beam.Pipeline,  # noqa: N802 (TFX's name)
        exec_properties: Dict[str, Any],
    ) -> Dict[str, beam.pvalue.PCollection]:
        """Each output split's batches of records, as TFX's `BaseExampleGenExecutor` splits them."""
        input_config = example_gen_pb2.Input()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.INPUT_CONFIG_KEY], input_config)
        output_config = example_gen_pb2.Output()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.OUTPUT_CONFIG_KEY], output_config)
        split_names = example_gen_utils.generate_output_split_names(input_config, output_config)
        exec_properties["_beam_pipeline_args"] = self._beam_pipeline_args or []
        to_records = self.GetInputSourceToExamplePTransform()
        if not output_config.split_config.splits:
            return {
                name: pipeline | f"InputToRecord[{split.name}]" >> to_records(exec_properties, split.pattern)
                for name, split in zip(split_names, input_config.splits)
            }
        if len(input_config.splits) != 1:
            raise ValueError("input must have only one split when output split is specified.")
        if output_config.split_config.HasField("partition_feature_name"):
            raise ValueError(
                "partition_feature_name is not supported by this ExampleGen: its records are split by "
                "a hash of their bytes, as TFX splits them by default"
            )
        buckets = list(itertools.accumulate(split.hash_buckets for split in output_config.split_config.splits))
        parts = (
            pipeline
            | "InputToRecord" >> to_records(exec_properties, input_config.splits[0].pattern)
            | "SplitData"
            >> beam.ParDo(_SplitBatch(buckets, output_config.split_config)).with_outputs(*map(str, range(len(buckets))))
        )
        return {name: parts[str(index)] for index, name in enumerate(split_names)}

    def Do(
        self,
        input_dict: Dict[str, List[types.Artifact]],
        output_dict: Dict[str, List[types.Artifact]],
        exec_properties: Dict[str, Any],
    ) -> None:
        """TFX's `BaseExampleGenExecutor.Do`, writing each split's batches with `_WriteBatch`."""
        self._log_startup(input_dict, output_dict, exec_properties)
        input_config = example_gen_pb2.Input()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.INPUT_CONFIG_KEY], input_config)
        output_config = example_gen_pb2.Output()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.OUTPUT_CONFIG_KEY], output_config)
        examples = output_dict[standard_component_specs.EXAMPLES_KEY]
        artifact_utils.get_single_instance(examples).split_names = artifact_utils.encode_split_names(
            example_gen_utils.generate_output_split_names(input_config, output_config)
        )
        folders = []
        with self._make_beam_pipeline() as pipeline:
            for split_name, batches in self.GenerateExamplesByBeam(pipeline, exec_properties).items():
                folders.append(artifact_utils.get_split_uri(examples, split_name))
                fileio.makedirs(folders[-1])
                _ = batches | f"WriteSplit[{split_name}]" >> beam.ParDo(_WriteBatch(folders[-1]))
        for folder in folders:  # a split that got no row has one empty file, as TFX's writer leaves it
            if not fileio.glob(os.path.join(folder, f"{write_split.DEFAULT_FILE_NAME}-*")):
                _WriteBatch(folder).process(("empty", []))
        payload_format = exec_properties.get(standard_component_specs.OUTPUT_DATA_FORMAT_KEY)
        file_format = exec_properties.get(standard_component_specs.OUTPUT_FILE_FORMAT_KEY)
        for artifact in examples:
            if payload_format:
                examples_utils.set_payload_format(artifact, payload_format)
            if file_format:
                examples_utils.set_file_format(artifact, write_split.to_file_format_str(file_format))


class CsvExampleGen(tfx.components.CsvExampleGen):
    """TFX's CsvExampleGen (same artifacts and node id) with `Executor` above, and the fingerprint of its
    code (pipeline/cache.py) as its custom_config, so that a change of this module reruns it."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(
        self,
        input_base: str,
        input_config: example_gen_pb2.Input,
        output_config: example_gen_pb2.Output,
        code_fingerprint: str,
        range_config: Optional[range_config_pb2.RangeConfig] = None,
    ):  # pylint: disable=super-init-not-called
        custom_config = example_gen_pb2.CustomConfig()
        custom_config.custom_config.Pack(wrappers_pb2.StringValue(value=code_fingerprint))
        FileBasedExampleGen.__init__(
            self,
            input_base=input_base,
            input_config=input_config,
            output_config=output_config,
            custom_config=custom_config,
            range_config=range_config,
        )


def lacks_required(example: Any) -> bool:
    """Whether a tf.Example lacks a required feature of the serving contract (models/features.py)."""
    values = {}
    for column in features.REQUIRED_FEATURES:
        if column.name in example.features.feature:
            feature = example.features.feature[column.name]
            kind = feature.WhichOneof("kind")
            values[column.name] = list(getattr(feature, kind).value) if kind else []
    return bool(features.missing_required(values))


def _has_required(records: Records) -> Records:
    name, batch = records
    return name, [record for record in batch if not lacks_required(tf.train.Example.FromString(record))]


class _UnlabelledCsvToExample(_CsvToExample):  # pylint: disable=protected-access
    """`_CsvToExample` without the rows that lack a required feature: the model refuses them (the serving
    contract), and one such row in a batch fails BulkInferrer's whole step."""

    def expand(self, pipeline: beam.Pipeline) -> beam.pvalue.PCollection:
        return super().expand(pipeline) | "RequiredFeatures" >> beam.Map(_has_required)


class UnlabelledExecutor(Executor):
    input_transform = _UnlabelledCsvToExample


class UnlabelledCsvExampleGen(CsvExampleGen):
    """Unlabelled rows for BulkInferrer: `CsvExampleGen` leaving out the rows the model would refuse."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(UnlabelledExecutor)
