"""Validates serving requests (features without the label) against the schema and the training data.

    babyweight validate-serving requests.jsonl           # or a CSV file with a header line
    babyweight validate-serving outputs/serving_logs     # what the prediction server answered
    babyweight validate-serving requests.csv --output-dir outputs --json

Each line of a JSON-lines file is one request: {"is_male": "true", "mother_age": 31, ...}; a value may
be a list (a feature with several values) and null or a missing key means no value; in a CSV file an
empty field means no value. The prediction server's request log (a folder, or one of its files) and Vertex
AI's request-response log exported from BigQuery are read as they are (models/requests.py). The requests are
checked with TFDV against the curated schema's SERVING
environment (expected and unexpected features, types, presence, value counts, domains), for the features
the serving contract requires (models/features.py: a request lacking one is refused), and against the
statistics of the newest span that passed validation in the store (skew, by the schema's
skew_comparator thresholds). Exit code 0: no anomaly; 1: anomalies, listed; 2: the file can't be read.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any, Dict, List, Optional, Sequence

import pyarrow as pa
import tensorflow_data_validation as tfdv
from tensorflow_data_validation.statistics import stats_impl
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from models import features
from models.requests import RequestsError, read_requests
from pipeline import config as config_lib
from pipeline.components import spans
from pipeline.components.validation import DRIFT_SPLIT, Finding, csv_presence, findings, load_statistics, validate_split
from pipeline.metadata import mlmd

SERVING = "SERVING"
_ARROW_TYPES = {schema_pb2.INT: pa.int64(), schema_pb2.FLOAT: pa.float32(), schema_pb2.BYTES: pa.binary()}


def _integer(value: Any) -> int:
    number = float(value)  # 30, 30.0 and "30" are all the integer 30; "thirty" and 30.5 are not
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _column(values: List[List[Any]], arrow_type: pa.DataType) -> pa.Array:
    """Values as the schema's type; if one doesn't convert, all as text, as CsvExampleGen would infer."""
    convert = {pa.int64(): _integer, pa.float32(): float}.get(arrow_type)
    if convert is not None:
        try:
            return pa.array([[convert(v) for v in row] for row in values], type=pa.list_(arrow_type))
        except (TypeError, ValueError):
            pass
    return pa.array(
        [[str(v).lower() if isinstance(v, bool) else str(v) for v in row] for row in values], type=pa.list_(pa.binary())
    )


def to_record_batch(requests: Sequence[Dict[str, Any]], schema: schema_pb2.Schema) -> pa.RecordBatch:
    """One list column per feature seen in the requests; a request without a value gets an empty list."""
    types = {f.name: _ARROW_TYPES.get(f.type, pa.binary()) for f in schema.feature}
    names: List[str] = []
    for request in requests:
        names.extend(name for name in request if name not in names)
    columns = []
    for name in names:
        values = [request.get(name) for request in requests]
        lists = [[] if v is None else list(v) if isinstance(v, list) else [v] for v in values]
        columns.append(_column(lists, types.get(name, pa.binary())))
    return pa.RecordBatch.from_arrays(columns, names)


def statistics_of(
    requests: Sequence[Dict[str, Any]], schema: schema_pb2.Schema
) -> statistics_pb2.DatasetFeatureStatisticsList:
    """TFDV statistics of the requests, computed in memory (what TFDV's DataFrame path does)."""
    return stats_impl.generate_statistics_in_memory(to_record_batch(requests, schema), tfdv.StatsOptions(schema=schema))


def newest_validated(config: config_lib.PipelineConfig) -> tuple:
    """(examples, statistics) artifacts of the newest span that passed validation in the run's store."""
    from pipeline.artifacts import GATE_ID

    passed = spans.validated(mlmd.open_sqlite(config.metadata_path), config.pipeline_name, GATE_ID)
    if not passed:
        raise mlmd.MetadataError(f"no span has passed validation in {config.metadata_path} yet (make run)")
    return max(passed, key=lambda pair: (spans.span_of(pair[0]), pair[0].id))


def training_statistics(config: config_lib.PipelineConfig) -> statistics_pb2.DatasetFeatureStatisticsList:
    """Train-split statistics of the newest span that passed validation in the run's store."""
    _, statistics = newest_validated(config)
    return load_statistics(statistics.uri, DRIFT_SPLIT)  # skew against the split drift is measured on


def contract_findings(requests: Sequence[Dict[str, Any]]) -> List[Finding]:
    """A finding per required feature (models/features.py, the serving contract) that some requests lack.

    Requests are numbered from 1 in file order (JSON lines: blank lines not counted; CSV: the header not counted).
    """
    lacking: Dict[str, List[int]] = {}
    for number, request in enumerate(requests, start=1):
        for name in features.missing_required(request):
            lacking.setdefault(name, []).append(number)
    return [
        Finding(
            "serving",
            name,
            "required",
            "SERVING_CONTRACT_REQUIRED_FEATURE",
            f"{len(numbers)} request(s) lack this required feature (no value or an 'unknown' code), "
            f"which the model's serving signatures refuse: request(s) "
            + ", ".join(map(str, numbers[:10]))
            + (", ..." if len(numbers) > 10 else ""),
            True,
        )
        for name, numbers in lacking.items()
    ]


def check_requests(
    requests: Sequence[Dict[str, Any]], schema: schema_pb2.Schema, training: statistics_pb2.DatasetFeatureStatisticsList
) -> List[Finding]:
    """Requests lacking a required feature, anomalies against the SERVING environment, then skew against training."""
    serving = statistics_of(requests, schema)
    found = contract_findings(requests)
    # The contract lets a request leave an optional feature out; one that no request carries is still reported.
    found += [
        f
        for f in findings(validate_split(serving, schema, None, environment=SERVING), "serving", ())
        if not (f.check == "presence" and f.feature in features.OPTIONAL_NAMES)
    ]
    skew = tfdv.validate_statistics(csv_presence(training), schema, serving_statistics=csv_presence(serving))
    found += [
        dataclasses.replace(f, check="skew") for f in findings(skew, "serving vs training", ()) if f.check == "drift"
    ]
    return found


def main(argv: Optional[List[str]] = None) -> int:
    """`babyweight validate-serving FILE`: prints the anomalies; exit code 1 if there are any."""
    parser = argparse.ArgumentParser(prog="babyweight validate-serving", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "requests",
        type=pathlib.Path,
        help="a .csv file, JSON lines (any other name), or a folder of them (the server's request log)",
    )
    parser.add_argument("--output-dir", help="the pipeline's output folder (default: the local profile's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = config_lib.load_config(overrides={"output_dir": args.output_dir} if args.output_dir else {})
    schema = tfdv.load_schema_text(config.schema_path)
    try:
        requests = read_requests(args.requests)
        found = check_requests(requests, schema, training_statistics(config))
    except (RequestsError, mlmd.MetadataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([dataclasses.asdict(f) for f in found], indent=2))
    else:
        print(
            f"{len(requests)} request(s) in {args.requests}: {len(found) or 'no'} anomal"
            f"{'y' if len(found) == 1 else 'ies'}"
        )
        for finding in found:
            print(f"  {finding.check}: {finding.feature or 'whole data set'}: {finding.description}")
    return 1 if found else 0
