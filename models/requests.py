"""Prediction requests from files: what `babyweight validate-serving` checks and `babyweight predict` sends.

A file is one of:
- CSV with a header line (e.g. the natality table's columns): one request per row, an empty field no value;
- JSON lines, one request per line: {"mother_age": 31, "gestation_weeks": 39, ...} (null or no key: no value);
- the prediction server's request log (serving/model_server/request_log.py): its records' "instance"s;
- Vertex AI's request-response log exported from BigQuery as JSON lines: the "instances" of each
  "request_payload";
- a folder: every *.jsonl, *.json and *.csv file in it (e.g. the server's log folder), in name order.
"""

import csv
import json
import pathlib
from typing import Any, Dict, Iterator, List

Instance = Dict[str, Any]


class RequestsError(ValueError):
    """The requests file can't be read; the message names the file and line."""


def _from_record(record: Dict[str, Any], where: str) -> Iterator[Instance]:
    """The instances in one JSON line, whichever of the formats above it is."""
    if "request_id" in record and "instance" in record:  # the server's request log
        if isinstance(record["instance"], dict) and record["instance"]:  # {} is a tf.Example request
            yield record["instance"]
        return
    if "request_payload" in record:  # Vertex AI's request-response logging table
        payloads = record["request_payload"]
        for payload in payloads if isinstance(payloads, list) else [payloads]:
            try:
                body = json.loads(payload) if isinstance(payload, str) else payload
            except json.JSONDecodeError as error:
                raise RequestsError(f"{where}: request_payload is not JSON ({error.msg})") from None
            yield from (body.get("instances") or []) if isinstance(body, dict) else []
        return
    yield record


def _read_file(path: pathlib.Path) -> List[Instance]:
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(handle)]
    requests = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if not line.endswith("\n"):  # the last line, still being written (a live server's log)
                    break
                raise RequestsError(f"{path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise RequestsError(f"{path}, line {number}: expected an object of feature values")
            requests.extend(_from_record(record, f"{path}, line {number}"))
    return requests


def read_requests(path: pathlib.Path) -> List[Instance]:
    """Requests as dicts of feature -> value (scalar, list or None), from a file or a folder of files."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".csv"))
        if not files:
            raise RequestsError(f"{path}: no .jsonl, .json or .csv files in this folder")
        requests = [request for file in files for request in _read_file(file)]
    elif path.is_file():
        requests = _read_file(path)
    else:
        raise RequestsError(f"{path}: no such file or folder")
    if not requests:
        raise RequestsError(f"{path}: no requests")
    return requests
