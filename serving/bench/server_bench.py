"""`make bench-serving`: the prediction server under wrk's load, beside two references, in one run.

    make bench-serving                      # 5 s per measurement; ARGS="--seconds 10" for steadier figures
Servers, each on the same HTTP stack (Starlette on uvicorn):
- limit: parses the request and returns a fixed prediction, with the server's worker count (no model);
- simple: what a user would write: one process calling the model's signature per request;
- server: `babyweight serve` with its defaults (batching, prediction table, request log, metrics).
And over gRPC (TF Serving's PredictionService/Predict, serving_raw tensors), driven by serving/bench/grpc_load.py:
- grpc limit: grpcio's asyncio server with the server's worker count, parsing the request, a fixed answer;
- grpc server: the same `babyweight serve` process, on its --grpc-port.
Workloads of one instance per request: peaked (rows of the bundled data, drawn with their frequencies from a
pool of BODIES requests) and flat (every feature uniform over its range, a new instance each request), at
concurrency 1, 8 and 64, after WARMUP_SECONDS of load. Then a new version is pushed while the server is under load:
errors are counted, and
the time until the new version serves.
The table goes to stdout and outputs/bench/serving.json; then the model call alone, in this process: the graph
serving_raw replaced, serving_raw, and the version's TFLite model (serving/bench/graph_bench.py;
outputs/bench/serving_graph.json).
"""

import argparse
import contextlib
import functools
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Tuple

from models import features
from models.requests import read_requests

PATH = "/v1/models/babyweight:predict"
CONCURRENCIES = (1, 8, 64)
BODIES = 20_000
WARMUP_SECONDS = 10  # per server and workload, at concurrency 64, before the measurements
FIXED = b'{"predictions":[[7.25]]}'
WRK_SCRIPT = r"""
local bodies_file = os.getenv("BENCH_BODIES")
local requests = {}
local counter = 0
init = function(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  if bodies_file ~= "" then
    for line in io.lines(bodies_file) do
      requests[#requests + 1] = wrk.format("POST", "PATH", {["Content-Type"] = "application/json"}, line)
    end
  end
end
request = function()
  if #requests > 0 then return requests[math.random(#requests)] end
  local body = string.format(
    '{"instances":[{"mother_age":%d,"gestation_weeks":%d,"is_male":"%s","plurality":%d,"mother_married":"%s",' ..
    '"weight_gain_pounds":%d,"ever_born":%d,"father_age":%d}]}',
    math.random(13, 50), math.random(20, 46), math.random() < 0.5 and "true" or "false", math.random(1, 3),
    math.random() < 0.5 and "true" or "false", math.random(0, 98), math.random(1, 12), math.random(14, 70))
  return wrk.format("POST", "PATH", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format('BENCH {"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "non2xx": %d, ' ..
    '"socket_errors": %d}\n', summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
""".replace("PATH", PATH)


def limit_app():
    """The limit: parse the JSON body, answer a fixed prediction."""
    import orjson
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def predict(request):
        orjson.loads(await request.body())
        return Response(FIXED, media_type="application/json")

    return Starlette(routes=[Route("/v1/models/{rest:path}", predict, methods=["POST"])])


def simple_app():
    """The simple server a user would write: the signature called per request, in one process."""
    import numpy
    import orjson
    import tensorflow as tf
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    signature = tf.saved_model.load(os.environ["BENCH_MODEL"]).signatures["serving_raw"]

    async def predict(request):
        instances = orjson.loads(await request.body())["instances"]
        inputs = {}
        for column in features.FEATURES:
            values = [instance.get(column.name) for instance in instances]
            if column.dtype == "string":
                inputs[column.name] = tf.constant(["" if v is None else str(v).lower() for v in values])
            else:
                inputs[column.name] = tf.constant(
                    numpy.array([numpy.nan if v is None else v for v in values], numpy.float32)
                )
        predictions = signature(**inputs)["predictions"].numpy().tolist()
        return Response(orjson.dumps({"predictions": predictions}), media_type="application/json")

    return Starlette(routes=[Route("/v1/models/{rest:path}", predict, methods=["POST"])])


def peaked_bodies(data_dir: pathlib.Path, count: int, seed: int) -> List[str]:
    """Request bodies of one instance: rows of the data drawn at random (so with the data's frequencies)."""
    rows = [row for path in sorted(data_dir.rglob("*.csv")) for row in read_requests(path)]
    rng = random.Random(seed)
    bodies = []
    while len(bodies) < count:
        row = rng.choice(rows)
        instance = {}
        for column in features.FEATURES:
            value = row.get(column.name)
            if value not in (None, ""):
                instance[column.name] = value if column.dtype == "string" else float(value)
        if not features.missing_required(instance):
            bodies.append(json.dumps({"instances": [instance]}))
    return bodies


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _server(
    command: List[str], port: int, env: Dict[str, str], log: pathlib.Path, ready_path: str
) -> Iterator[Tuple[str, int]]:
    """The server started (every worker answering ready_path): (its URL, its pid); SIGTERM to its group at the end."""
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        body = json.dumps({"instances": [{c.name: 30 for c in features.REQUIRED_FEATURES}]}).encode()
        streak = 0
        while streak < 10:  # every worker answers (each loads its own model copy)
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} did not start: {log.read_text()[-2000:]}")
            try:
                request = urllib.request.Request(
                    url + ready_path, data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=5):
                    streak += 1
            except OSError:
                streak = 0
                time.sleep(0.2)
        yield url, process.pid
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def wrk(
    url: str, concurrency: int, seconds: float, bodies_file: str, script: pathlib.Path, timeout_seconds: int = 2
) -> Dict[str, float]:
    """One wrk run's figures; a request unanswered after timeout_seconds counts as a socket error."""
    threads = 1 if concurrency == 1 else 2
    done = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout_seconds}s",
            "-s",
            str(script),
            url,
        ],
        env={**os.environ, "BENCH_BODIES": bodies_file},
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[len("BENCH ") :])
    result["rps"] = result["requests"] / result["seconds"]
    return result


def _with_hits(url: str, measure: Any) -> Dict[str, float]:
    """`measure`'s figures, with the share of instances the server at `url` answered from its table meanwhile
    (hit_rate; none where url is '': a reference server has no table)."""
    before = _cache_counts(url) if url else None
    result = measure()
    if before is not None:
        after = _cache_counts(url)
        looked = sum(after.values()) - sum(before.values())
        result["hit_rate"] = (after["hit"] - before["hit"]) / looked if looked else 0.0
    return result


def _cache_counts(url: str) -> Dict[str, float]:
    counts = {"hit": 0.0, "miss": 0.0}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("babyweight_cache_lookups_total{"):
                counts["hit" if 'result="hit"' in line else "miss"] += float(line.split()[-1])
    return counts


def pushed_versions(output_dir: str) -> Tuple[Any, Dict[int, str]]:
    """The local profile's settings and its pushed versions; the pipeline is run first if none is pushed."""
    from pipeline import config as config_lib
    from serving.core import manager

    config = config_lib.load_config(overrides={"output_dir": output_dir})
    versions = manager.list_versions(config.serving_dir)
    if not versions:
        print(f"no pushed model in {config.serving_dir}: running the pipeline first (make run)", file=sys.stderr)
        import runner_local

        runner_local.main([f"--set=output_dir={output_dir}"])
        versions = manager.list_versions(config.serving_dir)
    return config, versions


def _grpc_ready(port: int, process: subprocess.Popen, log: pathlib.Path, body: bytes) -> None:
    """Every worker answers a Predict (ten in a row), or RuntimeError with the log's end."""
    from serving.bench import grpc_load

    deadline = time.monotonic() + 180
    streak = 0
    while streak < 10:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gRPC server did not start: {log.read_text()[-2000:]}")
        try:
            result = grpc_load.drive("127.0.0.1", port, [body], 1, 0.05)
        except OSError:  # not listening yet
            result = {"requests": 0}
        streak = streak + 1 if result["requests"] and not result.get("non2xx") else 0
        time.sleep(0.05 if streak else 0.2)


def _grpc_rows(name: str, port: int, workloads: Dict[str, List[bytes]], seconds: float, url: str = "") -> List[Dict]:
    """The gRPC workloads at each concurrency after a warm-up, as the HTTP rows (cache hits from url's metrics)."""
    from serving.bench import grpc_load

    rows = []
    for workload, bodies in workloads.items():
        grpc_load.drive("127.0.0.1", port, bodies, 64, WARMUP_SECONDS)
        for concurrency in CONCURRENCIES:
            result = _with_hits(
                url, functools.partial(grpc_load.drive, "127.0.0.1", port, bodies, concurrency, seconds)
            )
            rows.append({"server": name, "workload": workload, "concurrency": concurrency, **result})
            print(_row(rows[-1]), flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench-serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (make bench-serving installs it: apt-get install wrk)", file=sys.stderr)
        return 2
    from pipeline import config as config_lib

    config, versions = pushed_versions(args.output_dir)
    newest = max(versions)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-serving-"))
    models = work / "serving_model"
    shutil.copytree(versions[newest], models / str(newest))
    script = work / "bench.lua"
    script.write_text(WRK_SCRIPT)
    peaked = work / "peaked.jsonl"
    peaked.write_text("\n".join(peaked_bodies(config_lib.PROJECT_ROOT / config.data_dir, BODIES, seed=1)) + "\n")
    workloads = {"peaked": str(peaked), "flat": ""}
    from serving.bench import grpc_load

    grpc_workloads = {
        "peaked": [
            grpc_load.predict_body(json.loads(line)["instances"][0]) for line in peaked.read_text().splitlines()
        ],
        "flat": [grpc_load.predict_body(instance) for instance in grpc_load.flat_instances(grpc_load.FLAT_BODIES, 2)],
    }
    python = sys.executable
    uvicorn = [
        python,
        "-m",
        "uvicorn",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
        "--host",
        "127.0.0.1",
    ]
    results = []
    servers = {
        "limit": (uvicorn + ["--factory", "serving.bench.server_bench:limit_app", "--workers", str(args.workers)], {}),
        "simple": (
            uvicorn + ["--factory", "serving.bench.server_bench:simple_app", "--workers", "1"],
            {"BENCH_MODEL": str(models / str(newest))},
        ),
        "server": (
            [
                python,
                "-m",
                "babyweight_cli",
                "serve",
                "--model-dir",
                str(models),
                "--workers",
                str(args.workers),
                "--log-dir",
                str(work / "logs"),
            ],
            {},
        ),
    }
    grpc_port = _free_port()
    servers["server"][0].extend(["--grpc-port", str(grpc_port)])
    limit_port = _free_port()
    limit_log = work / "grpc_limit.log"
    with limit_log.open("w") as handle:
        limit = subprocess.Popen(
            [python, "-m", "serving.bench.grpc_load", str(limit_port), str(args.workers)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _grpc_ready(limit_port, limit, limit_log, grpc_workloads["peaked"][0])
        results.extend(_grpc_rows("grpc limit", limit_port, grpc_workloads, args.seconds))
    finally:
        os.killpg(limit.pid, 15)
        limit.wait(timeout=30)
    for name, (command, env) in servers.items():
        port = _free_port()
        with _server(command + ["--port", str(port)], port, env, work / f"{name}.log", PATH) as (url, _):
            for workload, bodies in workloads.items():
                # Warm-up: the steady state is measured (the server's table has learned what the pool repeats).
                wrk(url + PATH, 64, WARMUP_SECONDS, bodies, script)
                for concurrency in CONCURRENCIES:
                    result = _with_hits(
                        url if name == "server" else "",
                        functools.partial(wrk, url + PATH, concurrency, args.seconds, bodies, script),
                    )
                    results.append({"server": name, "workload": workload, "concurrency": concurrency, **result})
                    print(_row(results[-1]), flush=True)
            if name == "server":
                results.extend(_grpc_rows("grpc server", grpc_port, grpc_workloads, args.seconds, url))
                results.append(_push_under_load(url, models, newest, args.seconds * 3, str(peaked), script))
                print(_row(results[-1]), flush=True)
    _report(results, pathlib.Path(args.output_dir) / "bench" / "serving.json")
    shutil.rmtree(work, ignore_errors=True)
    _graphs(config, pathlib.Path(args.output_dir) / "bench" / "serving_graph.json")
    return 0


def _graphs(config: Any, path: pathlib.Path) -> None:
    """The model call alone, in this process: the old graph, serving_raw and the version's TFLite model
    (serving/bench/graph_bench.py)."""
    from serving.bench import graph_bench

    found = graph_bench.newest(config)
    if not found["transform_graph"]:
        print(f"\nno transform graph under {config.pipeline_root}: the model call alone is not measured")
        return
    print(f"\nthe model call alone, in one process (version {found['model_dir']}):")
    figures = {}
    for instances in (1, 64):
        figures[instances] = graph_bench.compare(found["model_dir"], found["transform_graph"], instances)
        print("  " + graph_bench.line(instances, figures[instances]))
    path.write_text(json.dumps(figures, indent=1))


def _push_under_load(
    url: str, models: pathlib.Path, newest: int, seconds: float, bodies: str, script: pathlib.Path
) -> Dict:
    """wrk at concurrency 64 while a new version is copied in; then how long until the new version served."""
    import threading

    pushed = {}

    def push() -> None:
        time.sleep(2)
        staging = models.parent / "staging"
        shutil.copytree(models / str(newest), staging)
        staging.rename(models / str(newest + 1))  # as the Pusher does: the version appears whole
        pushed["at"] = time.monotonic()

    def serving_new() -> bool:
        with urllib.request.urlopen(url + "/v1/models/babyweight", timeout=10) as response:
            states = {v["version"]: v["state"] for v in json.loads(response.read())["model_version_status"]}
        return states.get(str(newest + 1)) == "AVAILABLE" and states.get(str(newest)) != "AVAILABLE"

    pusher = threading.Thread(target=push)
    pusher.start()
    result = wrk(url + PATH, 64, seconds, bodies, script)
    pusher.join()
    deadline = time.monotonic() + 120
    while not serving_new() and time.monotonic() < deadline:
        time.sleep(0.2)
    return {
        "server": "server",
        "workload": "peaked, new version pushed",
        "concurrency": 64,
        **result,
        "new_version_available": serving_new(),
        "switch_seconds": time.monotonic() - pushed["at"],
    }


def _row(result: Dict) -> str:
    hit = f"{result['hit_rate']:.0%}" if "hit_rate" in result else "-"
    pushed = (
        ""
        if "new_version_available" not in result
        else f"  new version serving: {'yes' if result['new_version_available'] else 'NO'} "
        f"({result['switch_seconds']:.1f} s after the push; that worker's view)"
    )
    return (
        f"{result['server']:11} {result['workload']:27} c={result['concurrency']:<3} {result['rps']:9.0f} req/s  "
        f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
        f"errors {result['non2xx'] + result['socket_errors']:<4}"
        f" cache hits {hit}{pushed}"
    )


def _report(results: List[Dict], path: pathlib.Path) -> None:
    def rps(server: str, workload: str, concurrency: int) -> float:
        return next(
            r["rps"]
            for r in results
            if (r["server"], r["workload"], r["concurrency"]) == (server, workload, concurrency)
        )

    print("\nratios (same run):")
    print(f"  peaked c=64: server/limit {rps('server', 'peaked', 64) / rps('limit', 'peaked', 64):.2f} (goal >= 0.5)")
    print(
        f"  flat c=64: server/limit {rps('server', 'flat', 64) / rps('limit', 'flat', 64):.2f} (goal >= 0.5), "
        f"server/simple {rps('server', 'flat', 64) / rps('simple', 'flat', 64):.1f} (goal >= 3)"
    )
    print(
        f"  flat c=64 over gRPC: grpc server/grpc limit "
        f"{rps('grpc server', 'flat', 64) / rps('grpc limit', 'flat', 64):.2f}, grpc server/server "
        f"{rps('grpc server', 'flat', 64) / rps('server', 'flat', 64):.2f} (goal >= 1)"
    )

    def latency(server: str) -> Dict:
        return next(r for r in results if (r["server"], r["workload"], r["concurrency"]) == (server, "flat", 1))

    for server, goal in (("server", 0.5), ("grpc server", 0.4)):
        row = latency(server)
        print(
            f"  model path (flat) c=1, {server}: p50 {row['p50_ms']:.2f} ms (goal < {goal}), "
            f"p99 {row['p99_ms']:.2f} ms (goal < 2)"
        )
    print("\n| server | workload | concurrency | requests/s | p50 ms | p99 ms | errors | cache hits |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        hit = f"{result['hit_rate']:.0%}" if "hit_rate" in result else "-"
        print(
            f"| {result['server']} | {result['workload']} | {result['concurrency']} | {result['rps']:,.0f} | "
            f"{result['p50_ms']:.2f} | {result['p99_ms']:.2f} | {result['non2xx'] + result['socket_errors']} | {hit} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"figures: {path}")


if __name__ == "__main__":
    sys.exit(main())
