"""`make soak-serving`: the server as a team leaves it running, under wrk's load through what weeks bring, in one run.

    make soak-serving                       # the bundled model, 2 workers, 20 pushes
    make soak-serving ARGS="--pushes 5"     # shorter

wrk loads valid requests (rows of the bundled data) throughout, at concurrency CONCURRENCY, while four scenarios
run one after the other:
  hostile  families of malformed and oversized requests (HOSTILE) beside the valid ones: each must be answered
           4xx, none 5xx or dropped, and the valid requests go on unaffected;
  pushes   N new versions copied in one after another, each waited for until it serves: no valid request fails;
           each worker's RSS after the first push and after the last (goal: within 10%);
  log      the request log's folder removed, then a file put in its place (nothing can be written) for
           --fault-seconds, then taken away: the server answers throughout, the log starts again by itself and
           the records it could not write are counted, not held;
  models   the model folder made unreadable (a file in its place) for --fault-seconds: the loaded version serves;
           a version pushed once it is back is served (polling resumed).
One table on stdout, and outputs/bench/soak.json.
"""

import argparse
import functools
import http.client
import json
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil

from serving.bench import server_bench
from serving.model_server import request_log

CONCURRENCY = 16
CHUNK_SECONDS = 1  # wrk runs in chunks of this length until a scenario ends
PATH = server_bench.PATH
REQUIRED = {"mother_age": 30, "gestation_weeks": 39}


def _instances(count: int) -> bytes:
    return json.dumps({"instances": [REQUIRED] * count}).encode()


# Families of hostile requests: (family, method, path, headers, body). Each must be answered 4xx.
HOSTILE: List[Tuple[str, str, str, Dict[str, str], bytes]] = [
    ("broken JSON", "POST", PATH, {}, b'{"instances": [{"mother_age": 3'),
    ("broken JSON", "POST", PATH, {}, b""),
    ("deeply nested JSON", "POST", PATH, {}, b"[" * 200_000),
    ("deeply nested JSON", "POST", PATH, {}, b'{"instances": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}"),
    (  # within JSON's nesting limit, deep enough to exhaust repr's stack in an error message
        "deeply nested JSON",
        "POST",
        PATH,
        {},
        b'{"instances": [{"gestation_weeks": 39, "mother_age": ' + b"[" * 1_000 + b"]" * 1_000 + b"}]}",
    ),
    ("wrong types", "POST", PATH, {}, b'{"instances": [{"mother_age": "thirty", "gestation_weeks": 39}]}'),
    ("wrong types", "POST", PATH, {}, b'{"instances": "everyone"}'),
    ("wrong types", "POST", PATH, {}, b'{"instances": [[30, 39]]}'),
    ("wrong types", "POST", PATH, {}, b'{"inputs": 5}'),
    ("wrong types", "POST", PATH, {}, b'{"instances": [{"mother_age": {"$gt": 1}, "gestation_weeks": 39}]}'),
    ("absurd values", "POST", PATH, {}, b'{"instances": [{"mother_age": 30, "gestation_weeks": 1e30}]}'),
    ("absurd values", "POST", PATH, {}, b'{"instances": [{"mother_age": -1e308, "gestation_weeks": 39}]}'),
    ("absurd values", "POST", PATH, {}, b'{"instances": [{"mother_age": 30, "gestation_weeks": NaN}]}'),
    ("absurd values", "POST", PATH, {}, b'{"instances": [{"mother_age": 30, "gestation_weeks": 1e999}]}'),
    (
        "huge strings",
        "POST",
        PATH,
        {},
        json.dumps({"instances": [{**REQUIRED, "is_male": "x" * 500_000}]}).encode(),
    ),
    ("huge bodies", "POST", PATH, {}, b" " * 2_000_000),
    ("huge bodies", "POST", PATH, {}, b" " * 40_000_000),
    ("too many instances", "POST", PATH, {}, _instances(5_000)),
    ("too many instances", "POST", PATH, {}, b'{"inputs": {"mother_age": [' + b"30," * 150_000 + b"30]}}"),
    ("unknown routes", "GET", "/nowhere", {}, b""),
    ("unknown routes", "POST", "/v1/models/another:predict", {}, _instances(1)),
    ("unknown routes", "GET", "/v1/models/babyweight/versions/" + "9" * 40, {}, b""),
    ("unknown routes", "POST", "/v1/models/babyweight:explode", {}, _instances(1)),
    ("unknown routes", "GET", "/v1/models/babyweight/labels/" + "x" * 5_000, {}, b""),
    ("unknown routes", "GET", "/v1/models/babyweight/versions/" + "9" * 5_000, {}, b""),  # past int()'s digits
    ("unknown routes", "POST", "/v1/models/babyweight/versions/" + "9" * 5_000 + ":predict", {}, _instances(1)),
    ("verbs", "DELETE", "/v1/models/babyweight", {}, b""),
    ("verbs", "PUT", PATH, {}, _instances(1)),
    ("verbs", "PATCH", "/metrics", {}, b""),
    (
        "invalid UTF-8",
        "POST",
        PATH,
        {},
        b'{"instances": [{"mother_age": 30, "gestation_weeks": 39, "is_male": "\xff"}]}',
    ),
    ("bad headers", "POST", PATH, {"X-Request-Id": "x" * 500}, _instances(1)),
    ("bad headers", "POST", PATH, {"X-Routing-Key": "x" * 200_000}, _instances(1)),  # a head past 64 KiB: 431
    ("bad headers", "POST", PATH, {"Content-Type": "text/plain", "X-Request-Id": "a b"}, _instances(1)),
    (
        "unauthenticated writes",
        "POST",
        "/v1/models/babyweight:feedback",
        {},
        b'{"request_id": "a", "weight_pounds": 7}',
    ),
]


class Load:
    """wrk at `concurrency` on valid requests, in chunks, from start() until stop(): the totals of every chunk."""

    def __init__(self, url: str, bodies: str, script: pathlib.Path, concurrency: int = CONCURRENCY):
        self.url, self.bodies, self.script, self.concurrency = url, bodies, script, concurrency
        self.totals = {"requests": 0, "non2xx": 0, "socket_errors": 0, "seconds": 0.0, "p99_ms": 0.0}
        self.error: Optional[str] = None  # why wrk stopped early (it could not connect, say)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Load":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = server_bench.wrk(
                    self.url + PATH, self.concurrency, CHUNK_SECONDS, self.bodies, self.script, timeout_seconds=10
                )
            except Exception as error:  # the scenario fails with the reason, not silently with fewer requests
                self.error = f"{type(error).__name__}: {error}"
                return
            for name in ("requests", "non2xx", "socket_errors", "seconds"):
                self.totals[name] += chunk[name]
            self.totals["p99_ms"] = max(self.totals["p99_ms"], chunk["p99_ms"])


def send(url: str, method: str, path: str, headers: Dict[str, str], body: bytes) -> Tuple[Optional[int], bytes]:
    """The status and body of one request on its own connection; (None, the error) if the connection was dropped."""
    host, port = url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body or None, headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read()
    except OSError as error:
        return None, repr(error).encode()
    finally:
        connection.close()


def workers(server_pid: int) -> List[psutil.Process]:
    """The server's worker processes: its children that uvicorn spawned."""
    found = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def worker_rss(server_pid: int) -> List[float]:
    """Each worker process's resident memory (MiB)."""
    found = []
    for child in workers(server_pid):
        try:
            found.append(child.memory_info().rss / 2**20)
        except psutil.Error:
            continue
    return sorted(found)


def metric(url: str, prefix: str) -> float:
    """The sum of the /metrics lines that start with `prefix` (every worker's, every label's)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


def status(url: str) -> Dict[str, str]:
    with urllib.request.urlopen(url + "/v1/models/babyweight", timeout=30) as response:
        return {v["version"]: v["state"] for v in json.loads(response.read())["model_version_status"]}


def _switched(url: str, number: int, answers: int = 8) -> bool:
    """Whether version `number` serves and the one before it doesn't, in `answers` answers in a row (a worker
    each, as the connections land)."""
    for _ in range(answers):
        states = status(url)
        if states.get(str(number)) != "AVAILABLE" or states.get(str(number - 1)) == "AVAILABLE":
            return False
    return True


def _until(condition: Callable[[], bool], seconds: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise RuntimeError(f"soak: {what} not within {seconds:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - started


def hostile(url: str, rounds: int) -> Dict[str, Any]:
    """Every hostile family `rounds` times, two clients at once: the statuses they got."""
    statuses: Dict[str, Dict[str, int]] = {}
    lock = threading.Lock()

    def client(offset: int) -> None:
        for round_ in range(rounds):
            for index in range(len(HOSTILE)):
                family, method, path, headers, body = HOSTILE[(index + offset + round_) % len(HOSTILE)]
                answer, text = send(url, method, path, headers, body)
                kind = "dropped" if answer is None else f"{answer // 100}xx"
                with lock:
                    counts = statuses.setdefault(family, {})
                    counts[kind] = counts.get(kind, 0) + 1
                    if kind != "4xx":  # what went wrong, once per family
                        counts.setdefault(f"first {kind}", f"{answer} {text[:120]!r}")

    clients = [threading.Thread(target=client, args=(offset,)) for offset in (0, len(HOSTILE) // 2)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    return statuses


def scenario_hostile(url: str, rounds: int) -> Dict[str, Any]:
    statuses = hostile(url, rounds)
    sent = sum(sum(n for n in counts.values() if isinstance(n, int)) for counts in statuses.values())
    refused = sum(counts.get("4xx", 0) for counts in statuses.values())
    wrong = {family: counts for family, counts in statuses.items() if set(counts) != {"4xx"}}
    return {
        "hostile_sent": sent,
        "hostile_4xx": refused,
        "hostile_families": len(statuses),
        "hostile_wrong": wrong,
        "ok": refused == sent,
    }


def scenario_pushes(url: str, pid: int, models: pathlib.Path, newest: int, pushes: int, count: int) -> Dict[str, Any]:
    """Copies in versions newest+1 .. newest+pushes, as the Pusher does (whole), each waited for until it serves."""
    rss_first: List[float] = []
    switch = []
    for number in range(newest + 1, newest + pushes + 1):
        staging = models.parent / "staging"
        shutil.copytree(models / str(number - 1), staging)
        staging.rename(models / str(number))
        switch.append(_until(functools.partial(_switched, url, number), 180, f"version {number} serving"))
        shutil.rmtree(models / str(number - 1))  # as a retention policy would: the folder holds one version
        if number == newest + 1:
            time.sleep(2)  # the first push's memory settles under load before it is measured
            rss_first = worker_rss(pid)
    rss_last = worker_rss(pid)
    growth = max((last / first - 1 for first, last in zip(rss_first, rss_last)), default=0.0)
    return {
        "pushes": pushes,
        "rss_first_mib": [round(value) for value in rss_first],
        "rss_last_mib": [round(value) for value in rss_last],
        "rss_growth": growth,
        "switch_seconds_max": max(switch),
        "ok": growth <= 0.10 and len(rss_first) == len(rss_last) == count,  # every worker measured
    }


def scenario_log(url: str, pid: int, logs: pathlib.Path, fault_seconds: float) -> Dict[str, Any]:
    """The log folder removed, then made unwritable (a file in its place), then given back."""
    rss_before = worker_rss(pid)
    _remove(logs)
    recreated = _until(lambda: bool(request_log.log_files(str(logs))), 30, "the log folder made again")
    _remove(logs)
    logs.write_text("not a folder: nothing can be written here")
    time.sleep(fault_seconds)
    dropped = metric(url, "babyweight_request_log_dropped_records_total")
    logs.unlink()
    pids = {str(child.pid) for child in workers(pid)} or {str(pid)}  # one worker: the server's own process
    recovered = _until(lambda: _writing(logs) >= pids, 30, "every worker's log writing again")
    rss_after = worker_rss(pid)
    return {
        "log_recreated_seconds": recreated,
        "log_recovered_seconds": recovered,
        "log_dropped_records": dropped,
        "log_errors": metric(url, "babyweight_request_log_errors_total"),
        "rss_before_mib": [round(value) for value in rss_before],
        "rss_after_mib": [round(value) for value in rss_after],
        "ok": dropped > 0,
    }


def _writing(logs: pathlib.Path) -> set:
    """The pids of the processes whose request log files in `logs` hold records."""
    found = set()
    for path in request_log.log_files(str(logs)):
        match = request_log.FILE_NAME.fullmatch(path.name)
        try:
            if match and path.stat().st_size > 0:
                found.add(match.group("pid"))
        except OSError:
            continue
    return found


def _remove(folder: pathlib.Path) -> None:
    """The folder gone from its path at once (renamed away, then deleted): the writers may be creating files in it."""
    gone = folder.with_name(folder.name + ".gone")
    folder.rename(gone)
    shutil.rmtree(gone)


def scenario_models(url: str, models: pathlib.Path, fault_seconds: float) -> Dict[str, Any]:
    """The model folder replaced by a file (unreadable as a folder) for fault_seconds, then given back."""
    served = status(url)
    errors_before = metric(url, "babyweight_model_storage_errors_total")
    away = models.parent / "serving_model.away"
    models.rename(away)
    models.write_text("not a folder")
    time.sleep(fault_seconds)
    during = status(url)
    errors = metric(url, "babyweight_model_storage_errors_total") - errors_before
    models.unlink()
    away.rename(models)
    # Polling resumes: a version pushed once the folder is back is served (within the backoff's 30 s and its load).
    newest = max(int(name) for name in os.listdir(models) if name.isdigit())
    staging = models.parent / "staging"
    shutil.copytree(models / str(newest), staging)
    staging.rename(models / str(newest + 1))
    resumed = _until(functools.partial(_switched, url, newest + 1), 120, f"version {newest + 1} serving")
    return {
        "storage_errors": errors,
        "still_available": during == served,
        "resumed_seconds": resumed,
        "ok": during == served and errors > 0,
    }


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every scenario, each under its own wrk load; their figures."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="soak-serving-"))
    try:
        if args.model_dir:
            source = pathlib.Path(args.model_dir)
            newest = max(int(name) for name in os.listdir(source) if name.isdigit())
            version, data_dir = source / str(newest), pathlib.Path(args.data_dir)
        else:
            from pipeline import config as config_lib

            config, versions = server_bench.pushed_versions(args.output_dir)
            newest = max(versions)
            version, data_dir = pathlib.Path(versions[newest]), config_lib.PROJECT_ROOT / config.data_dir
        models, logs = work / "serving_model", work / "logs"
        shutil.copytree(version, models / str(newest))
        script = work / "soak.lua"
        script.write_text(server_bench.WRK_SCRIPT)
        bodies = work / "bodies.jsonl"
        bodies.write_text("\n".join(server_bench.peaked_bodies(data_dir, 5_000, seed=3)) + "\n")
        port = server_bench._free_port()
        command = [sys.executable, "-m", "babyweight_cli", "serve", "--model-dir", str(models), "--log-dir", str(logs)]
        command += ["--workers", str(args.workers), "--poll-seconds", "0.5", "--port", str(port), "--grpc-port", "0"]
        results = []
        with server_bench._server(command, port, {}, work / "server.log", PATH) as (url, pid):
            scenarios = {
                "hostile": lambda: scenario_hostile(url, args.hostile_rounds),
                "pushes": lambda: scenario_pushes(url, pid, models, newest, args.pushes, args.workers),
                "log": lambda: scenario_log(url, pid, logs, args.fault_seconds),
                "models": lambda: scenario_models(url, models, args.fault_seconds),
            }
            for name, scenario in scenarios.items():
                with Load(url, str(bodies), script) as load:
                    result = scenario()
                result = {"scenario": name, **result, **{f"valid_{key}": value for key, value in load.totals.items()}}
                result["load_error"] = load.error
                result["ok"] = (
                    result["ok"]
                    and load.error is None
                    and load.totals["requests"] > 0
                    and load.totals["non2xx"] == 0
                    and load.totals["socket_errors"] == 0
                )
                results.append(result)
                print(_row(result), flush=True)
        if not all(result["ok"] for result in results):  # the server's own account of what went wrong
            lines = (work / "server.log").read_text(errors="replace").splitlines()
            shown = [line for line in lines if " INFO " not in line][-40:]
            print("\n".join(["the server's log, but its INFO lines:"] + shown))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _row(result: Dict[str, Any]) -> str:
    """A scenario's line of the table: the valid load's figures, then what the scenario measured."""
    name = result["scenario"]
    if name == "hostile":
        wrong = "; ".join(f"{family}: {counts}" for family, counts in result["hostile_wrong"].items()) or "none"
        found = (
            f"{result['hostile_4xx']:,} of {result['hostile_sent']:,} hostile requests ({result['hostile_families']} "
            f"families) answered 4xx; other answers: {wrong}"
        )
    elif name == "pushes":
        found = (
            f"{result['pushes']} pushes; RSS per worker after the first {result['rss_first_mib']} MiB, after the "
            f"last {result['rss_last_mib']} MiB ({result['rss_growth']:+.1%}); slowest switch "
            f"{result['switch_seconds_max']:.1f} s"
        )
    elif name == "log":
        found = (
            f"folder made again in {result['log_recreated_seconds']:.1f} s; writing again "
            f"{result['log_recovered_seconds']:.1f} s after the fault; {result['log_dropped_records']:,.0f} records "
            f"dropped and counted; RSS {result['rss_before_mib']} -> {result['rss_after_mib']} MiB"
        )
    else:
        found = (
            f"{result['storage_errors']:.0f} failed polls counted; the loaded version "
            f"{'kept serving' if result['still_available'] else 'WAS UNLOADED'}; a version pushed after the fault "
            f"served {result['resumed_seconds']:.1f} s later"
        )
    valid = (
        f"{result['valid_requests']:,} valid requests, {result['valid_non2xx'] + result['valid_socket_errors']} "
        f"failed, p99 {result['valid_p99_ms']:.0f} ms"
    )
    if result.get("load_error"):
        valid += f" (wrk stopped: {result['load_error']})"
    return f"| {name} | {'yes' if result['ok'] else 'NO'} | {valid} | {found} |"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make soak-serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--fault-seconds", type=float, default=10.0, help="how long each storage fault lasts")
    parser.add_argument("--hostile-rounds", type=int, default=20, help="times each hostile request is sent")
    parser.add_argument("--model-dir", help="a folder of versions to serve (default: the pipeline's pushed model)")
    parser.add_argument("--data-dir", default="data/natality", help="with --model-dir: the rows of the valid load")
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (make soak-serving installs it: apt-get install wrk)", file=sys.stderr)
        return 2
    print("| scenario | passed | valid load (wrk) | what happened |\n|---|---|---|---|", flush=True)
    results = run(args)
    path = pathlib.Path(args.output_dir) / "bench" / "soak.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"figures: {path}")
    return 0 if all(result["ok"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
