"""TFX's CsvExampleGen, reading a file's header as the CSV check does (pipeline/csv_check.py).

TFX 1.16 splits the first line on commas as it is: a UTF-8 byte-order mark (Excel's "CSV UTF-8", many
Windows tools) becomes part of the first column's name (`\\ufeffsource_year`), and a header written
with quotes (R's write.csv) keeps them in every name. Here the header is parsed by Python's csv module
without the mark; everything else (reading the rows, CRLF line ends included, inferring types, splits,
spans, fingerprints, caching) is TFX's own executor.
"""
from typing import Any, List

import apache_beam as beam
from google.protobuf import wrappers_pb2
from tfx import v1 as tfx
from tfx.components.example_gen.component import FileBasedExampleGen
from tfx.components.example_gen.csv_example_gen import executor as csv_executor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2
from tfx_bsl.coders import csv_decoder

from models import features
from pipeline import csv_check


def column_names(path: str) -> List[str]:
    """The column names in a CSV file's first line, as the CSV check reads them."""
    with fileio.open(path, "rb") as handle:
        return csv_check.header_names(handle.readline().decode("utf-8"))


class _CsvToExample(csv_executor._CsvToExample):  # pylint: disable=protected-access
    """TFX's CSV-to-tf.Example transform with the header read by `column_names`."""

    def expand(self, pipeline: beam.Pipeline) -> beam.pvalue.PCollection:
        csv_files = fileio.glob(self._csv_pattern)
        if not csv_files:
            raise RuntimeError(f"Split pattern {self._csv_pattern} does not match any files.")
        names = column_names(csv_files[0])
        for path in csv_files[1:]:
            if column_names(path) != names:
                raise RuntimeError(f"Files in same split {self._csv_pattern} have different header.")
        parsed_csv_lines = (
            pipeline
            | "CreateFilenames" >> beam.Create(csv_files)
            | "ReadFromText" >> beam.ParDo(
                csv_executor._ReadCsvRecordsFromTextFile())  # pylint: disable=protected-access
            | "ParseCSVLine" >> beam.ParDo(csv_decoder.ParseCSVLine(delimiter=","))
            | "ExtractParsedCSVLines" >> beam.Keys())
        column_infos = beam.pvalue.AsSingleton(
            parsed_csv_lines
            | "InferColumnTypes" >> beam.CombineGlobally(csv_decoder.ColumnTypeInferrer(names, skip_blank_lines=True)))
        return parsed_csv_lines | "ToTFExample" >> beam.ParDo(
            csv_executor._ParsedCsvToTfExample(), column_infos)  # pylint: disable=protected-access


class Executor(csv_executor.Executor):
    """CsvExampleGen's executor with `_CsvToExample` above."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:  # noqa: N802 (TFX's name)
        return _CsvToExample


class CsvExampleGen(tfx.components.CsvExampleGen):
    """TFX's CsvExampleGen (same artifacts and node id) with `Executor` above, and the fingerprint of its
    code (pipeline/cache.py) as its custom_config, so that a change of this module reruns it."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, input_base: str, input_config: example_gen_pb2.Input, output_config: example_gen_pb2.Output,
                 code_fingerprint: str):  # pylint: disable=super-init-not-called
        custom_config = example_gen_pb2.CustomConfig()
        custom_config.custom_config.Pack(wrappers_pb2.StringValue(value=code_fingerprint))
        FileBasedExampleGen.__init__(self, input_base=input_base, input_config=input_config,
                                     output_config=output_config, custom_config=custom_config)


def lacks_required(example: Any) -> bool:
    """Whether a tf.Example lacks a required feature of the serving contract (models/features.py)."""
    values = {}
    for column in features.REQUIRED_FEATURES:
        if column.name in example.features.feature:
            feature = example.features.feature[column.name]
            kind = feature.WhichOneof("kind")
            values[column.name] = list(getattr(feature, kind).value) if kind else []
    return bool(features.missing_required(values))


class _UnlabelledCsvToExample(_CsvToExample):  # pylint: disable=protected-access
    """`_CsvToExample` without the rows that lack a required feature: the model refuses them (the serving
    contract), and one such row in a batch fails BulkInferrer's whole step."""

    def expand(self, pipeline: beam.Pipeline) -> beam.pvalue.PCollection:
        return super().expand(pipeline) | "RequiredFeatures" >> beam.Filter(lambda example: not lacks_required(example))


class UnlabelledExecutor(csv_executor.Executor):
    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:  # noqa: N802 (TFX's name)
        return _UnlabelledCsvToExample


class UnlabelledCsvExampleGen(CsvExampleGen):
    """Unlabelled rows for BulkInferrer: `CsvExampleGen` leaving out the rows the model would refuse."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(UnlabelledExecutor)

