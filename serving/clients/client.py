"""`babyweight predict --url URL FILE`: predictions for the rows of a CSV or JSON-lines file, from a server
(or, with --tflite, from a pushed version's TFLite model on this machine, as a device runs it:
serving/clients/device.py).

    babyweight predict --url http://127.0.0.1:8501 data/natality/natality.csv
    babyweight predict --url http://127.0.0.1:8501 --label stable requests.jsonl --output predictions.csv
    babyweight predict --url \
        https://REGION-aiplatform.googleapis.com/v1/projects/P/locations/REGION/endpoints/E:predict FILE
    babyweight predict --tflite outputs/serving_model/VERSION/babyweight.tflite data/natality/natality.csv

The file is read as `babyweight validate-serving` reads it (models/requests.py): a CSV of the natality table's
columns or JSON lines of features. The model's features are sent (the table's other columns are not); a row
the serving contract refuses (a required feature missing, a value not of its type) is not sent and gets an
error naming the row and feature, and so does a row the server refuses, or answers with no number (null, NaN, an
infinity: predict-batch rejects such an answer too); the other rows are answered. Output: CSV with row, prediction,
model_version and error, one line per input row (stdout, or --output). Exit code 0: every row predicted; 1: some
rows refused; 2: the file, the server or the TFLite model can't be read or reached.
A Vertex AI endpoint is called with the application-default credentials (gcloud auth application-default login).
"""

import argparse
import csv
import json
import pathlib
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from models import features
from models.requests import RequestsError, read_requests
from serving.core import contract
from serving.model_server.settings import MODEL_NAME

TIMEOUT_SECONDS = 60


class ServerError(RuntimeError):
    """The server can't be reached or answered something other than predictions."""

    def __init__(self, message: str, status: int = 0, reason: str = ""):
        super().__init__(message)
        self.status, self.reason = status, reason


def predict_url(url: str, model: str = MODEL_NAME, version: Optional[int] = None, label: Optional[str] = None) -> str:
    """The :predict URL: URL as it is if it names a method (Vertex endpoints), else TF Serving's path on it."""
    if url.rstrip("/").endswith(":predict"):
        return url
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else f"/labels/{label}" if label else "")
    return url.rstrip("/") + path + ":predict"


def _headers(url: str) -> Dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if urllib.parse.urlparse(url).hostname.endswith("aiplatform.googleapis.com"):
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        headers["Authorization"] = f"Bearer {credentials.token}"
    return headers


def post(url: str, instances: List[Dict[str, Any]]) -> Tuple[List[Any], str]:
    """The answers for `instances` (a prediction each, or what the server sent instead) and the version that
    answered."""
    request = urllib.request.Request(url, data=json.dumps({"instances": instances}).encode(), headers=_headers(url))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read())
            version = response.headers.get("x-model-version") or answer.get("deployedModelId", "")
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        try:
            body = json.loads(body).get("error", body)
        except (json.JSONDecodeError, AttributeError):
            pass
        raise ServerError(f"{url} answered {error.code}: {body}", error.code, str(body)) from None
    except (urllib.error.URLError, OSError) as error:
        raise ServerError(f"can't reach {url}: {getattr(error, 'reason', error)}") from None
    predictions = answer.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != len(instances):
        raise ServerError(f"{url} answered without a prediction per instance: {str(answer)[:200]}")
    return [p[0] if isinstance(p, list) and len(p) == 1 else p for p in predictions], version


def predict_rows(url: str, rows: List[Dict[str, Any]], batch_size: int) -> List[Dict[str, Any]]:
    """One result per row: {"row", "prediction", "model_version", "error"}; refused rows aren't sent."""
    results = [
        {"row": number, "prediction": "", "model_version": "", "error": ""} for number in range(1, len(rows) + 1)
    ]
    ready: List[Tuple[int, Dict[str, Any]]] = []
    for index, row in enumerate(rows):
        try:
            ready.append((index, contract.to_instance(row)))
        except ValueError as error:
            results[index]["error"] = f"row {index + 1}: {error}"
    for start in range(0, len(ready), batch_size):
        batch = ready[start : start + batch_size]
        while batch:
            try:
                predictions, version = post(url, [instance for _, instance in batch])
            except ServerError as error:
                refused = re.match(r"instance (\d+): (.*)", error.reason, re.S)
                if error.status != 400 or not refused or int(refused.group(1)) >= len(batch):
                    raise
                index = batch.pop(int(refused.group(1)))[0]  # that row alone is refused; the others go again
                results[index]["error"] = f"row {index + 1}: {refused.group(2)}"
                continue
            for (index, _), prediction, good in zip(batch, predictions, features.predicted(predictions)):
                if good:
                    results[index].update(prediction=prediction, model_version=version)
                else:  # null, NaN or an infinity: no prediction (predict-batch and --tflite reject it too)
                    results[index]["error"] = f"row {index + 1}: {features.not_a_prediction(prediction)}"
            break
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """`babyweight predict --url URL FILE [--output OUT]`."""
    parser = argparse.ArgumentParser(
        prog="babyweight predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("file", type=pathlib.Path, help="CSV with a header line, or JSON lines")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", default="http://127.0.0.1:8501", help="the server (default: %(default)s)")
    source.add_argument(
        "--tflite",
        type=pathlib.Path,
        help="a TFLite export (babyweight.tflite or babyweight_float16.tflite in a pushed version's "
        "folder), run here by the TensorFlow Lite interpreter instead of asking a server",
    )
    parser.add_argument("--model", default=MODEL_NAME)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--version", type=int, help="ask this version (default: the newest available)")
    target.add_argument("--label", help="ask the version with this label (e.g. stable)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="instances per request (per model call with --tflite)"
    )
    parser.add_argument("--output", type=pathlib.Path, help="write the CSV here instead of printing it")
    args = parser.parse_args(argv)
    if args.tflite and (args.version or args.label):
        parser.error("--version and --label choose a server's version; a TFLite file is one version")
    from models import lite
    from serving.clients import device

    try:
        rows = read_requests(args.file)
        if args.tflite:
            results = device.predict_rows(device.DeviceModel(str(args.tflite)), rows, args.batch_size)
        else:
            results = predict_rows(predict_url(args.url, args.model, args.version, args.label), rows, args.batch_size)
    except (RequestsError, ServerError, lite.LiteModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    handle = args.output.open("w", newline="") if args.output else sys.stdout
    writer = csv.DictWriter(handle, fieldnames=["row", "prediction", "model_version", "error"])
    writer.writeheader()
    writer.writerows(results)
    if args.output:
        handle.close()
    refused = [r for r in results if r["error"]]
    versions = sorted({r["model_version"] for r in results if r["model_version"]})
    print(
        f"{len(results) - len(refused)} of {len(results)} row(s) of {args.file} predicted by version(s) "
        f"{', '.join(versions) or '-'}"
        + (f"; {len(refused)} refused (error column), e.g. {refused[0]['error']}" if refused else ""),
        file=sys.stderr,
    )
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
