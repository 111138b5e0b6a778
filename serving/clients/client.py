"""`babyweight predict --url URL FILE`: predictions for the rows of a CSV or JSON-lines file, from a server
(with --grpc, over TF Serving's gRPC API: serving/clients/grpc_client.py; with --tflite, from a pushed version's
TFLite model on this machine, as a device runs it: serving/clients/device.py).

    babyweight predict --url http://127.0.0.1:8501 data/natality/natality.csv
    babyweight predict --url http://127.0.0.1:8501 --label stable requests.jsonl --output predictions.csv
    babyweight predict --grpc 127.0.0.1:8500 --version 3 data/natality/natality.csv
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

Batches (--batch-size rows) go over one kept-alive connection (one gRPC channel with --grpc). A batch the server
refuses for now (429 or 503, after the Retry-After it names; gRPC's UNAVAILABLE or RESOURCE_EXHAUSTED) or whose
connection fails is sent again, a few times with growing waits (RETRIES, BACKOFF_SECONDS), before the command gives
up with exit code 2. Each batch carries one X-Request-Id (gRPC metadata x-request-id), the same on every try, so the
server's request log ties the tries together, and each row's answer is written once: where the server says a retry's
id answered an earlier try (an experiment's 409), the answer was lost in transit and those rows get that error
instead of a second answer. With --client-id, every request carries that X-Client-Id: a label of this client's traffic
in the server's request log, not a credential. On a terminal, a progress bar (rows done of all) runs on stderr.
A Vertex AI endpoint is called with the application-default credentials (gcloud auth application-default login).
"""

import argparse
import contextlib
import csv
import json
import pathlib
import re
import sys
import urllib.parse
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import tqdm
import urllib3
from urllib3.util.retry import Retry

from models import features
from models.requests import RequestsError, read_requests
from serving.core import contract
from serving.model_server.settings import MODEL_NAME

TIMEOUT_SECONDS = 60  # one try's, whole: to connect, send and read the answer (a trickled answer too)
RETRIES = 5  # tries of a batch after the first, before the command gives up (exit code 2)
# Waits between tries: none before the first retry, then this, doubling (urllib3's backoff_factor): 0, 1, 2, 4, 8 s.
BACKOFF_SECONDS = 0.5
RETRY_AFTER_MAX_SECONDS = 30  # a server's Retry-After is honoured up to this, so that a run's time stays bounded
# Refused before anything was answered ("too many requests", "unavailable, e.g. no version loaded yet"): safe to retry.
RETRIED_STATUSES = (429, 503)
# An experiment's 409 for an X-Request-Id it recorded already (serving/model_server/app.py): for this client's ids,
# always one of its own earlier tries, whose answer the connection lost.
ANSWERED_EARLIER = "was used by an earlier request"

# The answers for a batch of instances sent with one request id: a prediction each (or what the server sent instead)
# and the version that answered. A REST or gRPC sender; raises ServerError.
Sender = Callable[[List[Dict[str, Any]], str], Tuple[List[Any], str]]


class ServerError(RuntimeError):
    """The server can't be reached or answered something other than predictions (status: HTTP's, or the REST
    status TF Serving gives a gRPC code; 0 when nothing was answered)."""

    def __init__(self, message: str, status: int = 0, reason: str = ""):
        super().__init__(message)
        self.status, self.reason = status, reason


def predict_url(url: str, model: str = MODEL_NAME, version: Optional[int] = None, label: Optional[str] = None) -> str:
    """The :predict URL: URL as it is if it names a method (Vertex endpoints), else TF Serving's path on it."""
    if url.rstrip("/").endswith(":predict"):
        return url
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else f"/labels/{label}" if label else "")
    return url.rstrip("/") + path + ":predict"


class _BoundedRetry(Retry):
    """urllib3's Retry, with a server's Retry-After honoured up to RETRY_AFTER_MAX_SECONDS."""

    def get_retry_after(self, response: Any) -> Optional[float]:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, RETRY_AFTER_MAX_SECONDS)


def retry_policy() -> Retry:
    """What a POST of a batch may retry: RETRIED_STATUSES and failed connections (refused, reset, timed out, even
    after the request went out: the request id ties the tries together), RETRIES times in all, with backoff."""
    return _BoundedRetry(
        total=RETRIES,
        other=0,  # e.g. a TLS certificate refused: another try would fail the same way
        redirect=False,
        allowed_methods=frozenset({"POST"}),
        status_forcelist=RETRIED_STATUSES,
        backoff_factor=BACKOFF_SECONDS,
        raise_on_status=False,  # the last refusal is returned, and reported with the server's own words
        respect_retry_after_header=True,
    )


def _cause(error: Exception) -> str:
    """Why a connection failed, in words (urllib3 wraps the cause in the connection object's repr)."""
    if isinstance(error, urllib3.exceptions.ProtocolError) and len(error.args) > 1:
        error = error.args[1]  # ('Connection aborted.', RemoteDisconnected(...))
    return str(error).split(">: ", 1)[-1]


class RestSender:
    """Batches POSTed to a :predict URL over one pool of kept-alive connections, with retry_policy()."""

    def __init__(self, url: str, client_id: str = ""):
        self.url = url
        self.client_id = client_id  # the X-Client-Id of every request, none where ""
        self.pool = urllib3.PoolManager(
            maxsize=1, retries=retry_policy(), timeout=urllib3.Timeout(total=TIMEOUT_SECONDS)
        )
        self.credentials = None
        if urllib.parse.urlparse(url).hostname.endswith("aiplatform.googleapis.com"):
            import google.auth

            self.credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])

    def _headers(self, request_id: str) -> Dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if self.client_id:
            headers["X-Client-Id"] = self.client_id
        if self.credentials is not None:
            if not self.credentials.valid:  # the first request, or an hour later
                import google.auth.transport.requests

                self.credentials.refresh(google.auth.transport.requests.Request())
            headers["Authorization"] = f"Bearer {self.credentials.token}"
        return headers

    def __call__(self, instances: List[Dict[str, Any]], request_id: str) -> Tuple[List[Any], str]:
        """The answers for `instances` (a prediction each, or what the server sent instead) and the version that
        answered."""
        body = json.dumps({"instances": instances}).encode()
        try:
            response = self.pool.request("POST", self.url, body=body, headers=self._headers(request_id))
        except urllib3.exceptions.MaxRetryError as error:
            tries = (
                "" if isinstance(error.reason, urllib3.exceptions.SSLError) else f" ({RETRIES + 1} tries)"
            )  # other=0
            raise ServerError(f"can't reach {self.url}{tries}: {_cause(error.reason)}") from None
        except urllib3.exceptions.HTTPError as error:
            raise ServerError(f"can't reach {self.url}: {_cause(error)}") from None
        tries = 1 + len(response.retries.history) if response.retries else 1
        if response.status != 200:
            text = response.data.decode(errors="replace")
            try:
                text = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                pass
            after = f" after {tries} tries" if tries > 1 else ""
            raise ServerError(f"{self.url} answered {response.status}{after}: {text}", response.status, str(text))
        try:
            answer = json.loads(response.data)
        except ValueError:
            raise ServerError(f"{self.url} answered no JSON: {response.data[:200]!r}") from None
        predictions = answer.get("predictions") if isinstance(answer, dict) else None
        if not isinstance(predictions, list) or len(predictions) != len(instances):
            raise ServerError(f"{self.url} answered without a prediction per instance: {str(answer)[:200]}")
        version = response.headers.get("x-model-version") or answer.get("deployedModelId", "")
        return [p[0] if isinstance(p, list) and len(p) == 1 else p for p in predictions], version

    def close(self) -> None:
        self.pool.clear()


class GrpcSender:
    """Batches sent with TF Serving's gRPC API (grpc_client.py) on one channel, its failures as ServerError."""

    def __init__(self, target: str, model: str, version: Optional[int], label: Optional[str]):
        from serving.clients import grpc_client  # TensorFlow's protos: loaded only for --grpc

        self.failed = grpc_client.RpcFailed
        self.predictor = grpc_client.Predictor(
            target,
            model,
            version,
            label,
            timeout_seconds=TIMEOUT_SECONDS,
            retries=RETRIES,
            backoff_seconds=BACKOFF_SECONDS,
        )

    def __call__(self, instances: List[Dict[str, Any]], request_id: str) -> Tuple[List[Any], str]:
        try:
            return self.predictor.predict(instances, request_id)
        except self.failed as error:
            raise ServerError(str(error), error.status, error.reason) from None

    def close(self) -> None:
        self.predictor.close()


def _lost_in_transit(row: int, request_id: str) -> str:
    return (
        f"row {row}: the answer was lost in transit: request {request_id} was answered, but the connection broke "
        "before the answer arrived (the server's request log has it under that id); not asked again, so that it is "
        "not answered twice"
    )


def predict_rows(send: Sender, rows: List[Dict[str, Any]], batch_size: int) -> List[Dict[str, Any]]:
    """One result per row: {"row", "prediction", "model_version", "error"}; refused rows aren't sent. A progress
    bar on stderr where it is a terminal."""
    results = [
        {"row": number, "prediction": "", "model_version": "", "error": ""} for number in range(1, len(rows) + 1)
    ]
    ready: List[Tuple[int, Dict[str, Any]]] = []
    for index, row in enumerate(rows):
        try:
            ready.append((index, contract.to_instance(row)))
        except ValueError as error:
            results[index]["error"] = f"row {index + 1}: {error}"
    progress = tqdm.tqdm(
        total=len(rows),
        initial=len(rows) - len(ready),
        unit="row",
        file=sys.stderr,
        disable=None,  # None: a tty's
    )
    with progress:
        for start in range(0, len(ready), batch_size):
            batch = ready[start : start + batch_size]
            while batch:
                request_id = uuid.uuid4().hex  # one per batch contents, the same on each of its tries
                try:
                    predictions, version = send([instance for _, instance in batch], request_id)
                except ServerError as error:
                    if error.status == 409 and ANSWERED_EARLIER in error.reason:
                        for index, _ in batch:
                            results[index]["error"] = _lost_in_transit(index + 1, request_id)
                        progress.update(len(batch))
                        break
                    refused = re.match(r"instance (\d+): (.*)", error.reason, re.S)
                    if error.status != 400 or not refused or int(refused.group(1)) >= len(batch):
                        raise
                    index = batch.pop(int(refused.group(1)))[0]  # that row alone is refused; the others go again
                    results[index]["error"] = f"row {index + 1}: {refused.group(2)}"
                    progress.update(1)
                    continue
                for (index, _), prediction, good in zip(batch, predictions, features.predicted(predictions)):
                    if good:
                        results[index].update(prediction=prediction, model_version=version)
                    else:  # null, NaN or an infinity: no prediction (predict-batch and --tflite reject it too)
                        results[index]["error"] = f"row {index + 1}: {features.not_a_prediction(prediction)}"
                progress.update(len(batch))
                break
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """`babyweight predict --url URL | --grpc HOST:PORT | --tflite FILE  FILE [--output OUT]`."""
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
        "--grpc",
        metavar="HOST:PORT",
        help="the server's gRPC port (TF Serving's PredictionService, plain text) instead of its REST API",
    )
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
    parser.add_argument(
        "--client-id", default="", help="--url: sent as X-Client-Id, this client's label in the server's request log"
    )
    args = parser.parse_args(argv)
    if args.tflite and (args.version or args.label):
        parser.error("--version and --label choose a server's version; a TFLite file is one version")
    if args.client_id and (args.grpc or args.tflite):
        parser.error("--client-id goes with --url's requests")
    from models import lite
    from serving.clients import device

    try:
        rows = read_requests(args.file)
        if args.tflite:
            results = device.predict_rows(device.DeviceModel(str(args.tflite)), rows, args.batch_size)
        else:
            sender = (
                GrpcSender(args.grpc, args.model, args.version, args.label)
                if args.grpc
                else RestSender(predict_url(args.url, args.model, args.version, args.label), args.client_id)
            )
            with contextlib.closing(sender):
                results = predict_rows(sender, rows, args.batch_size)
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
