"""`make bench-predict`: predict-batch on files beside the prediction server and the bare signature, in one run.

    make bench-predict                      # 1,000,000 generated rows; ARGS="--rows 200000" for a quicker look
Three ways to predict the same generated rows with the newest pushed version:
- predict-batch: `babyweight predict-batch` as a user runs it, files -> files (a new process: its imports, the
  Beam job, the files written), on the rows in eight files;
- signature: the version's serving_raw called in-process on batches of 1,024 ready inputs (the limit);
- server: `babyweight serve` (one worker) answering rows one per request from one client (--server-rows rows).
The table goes to stdout and outputs/bench/predict.json.
"""

import argparse
import http.client
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

FILES = 8


def _rows(paths: List[pathlib.Path]):
    from serving.batch import io as batch_io

    class Opened:  # what fileio.ReadMatches gives csv_batches
        def __init__(self, path: pathlib.Path):
            self.metadata = type("Metadata", (), {"path": str(path)})()
            self.path = path

        def read(self) -> bytes:
            return self.path.read_bytes()

    return [record for path in paths for records in batch_io.csv_batches(Opened(path)) for record in records]


def signature_rate(version_dir: str, records: list) -> float:
    """Rows/s of serving_raw on batches of 1,024 inputs already parsed (the model alone)."""
    from serving.batch import core as batch_core

    handler = batch_core.VersionHandler(version_dir)
    model = handler.load_model()
    parsed = [batch_core.parse(records[start : start + 1024])[0] for start in range(0, len(records), 1024)]
    parsed = [p for p in parsed if p is not None]
    handler.run_inference(parsed[:1], model)  # the first call traces
    started = time.perf_counter()
    for one in parsed:
        handler.run_inference([one], model)
    return sum(len(p.ids) for p in parsed) / (time.perf_counter() - started)


def server_rate(models: str, records: list, count: int, work: pathlib.Path) -> Dict[str, float]:
    """Rows/s of `babyweight serve` answering one row per request from one client on a kept-alive connection."""
    from serving.bench import server_bench as bench
    from serving.core import contract

    instances = []
    for record in records:
        try:
            instances.append(contract.to_instance(record.fields))
        except (ValueError, TypeError):
            continue
        if len(instances) == count:
            break
    port = bench._free_port()
    command = [
        sys.executable,
        "-m",
        "babyweight_cli",
        "serve",
        "--model-dir",
        models,
        "--workers",
        "1",
        "--log-dir",
        str(work / "logs"),
        "--port",
        str(port),
        "--grpc-port",
        "0",
    ]
    with bench._server(command, port, {}, work / "server.log", bench.PATH):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": "application/json"}
        started = time.perf_counter()
        for instance in instances:
            connection.request("POST", bench.PATH, json.dumps({"instances": [instance]}), headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"the server answered {answer.status} to {instance}")
        seconds = time.perf_counter() - started
    return {"rows": len(instances), "rows_per_s": len(instances) / seconds}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="generated rows, in eight files")
    parser.add_argument("--server-rows", type=int, default=5_000, help="rows sent to the server one by one")
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    from data import generator
    from pipeline import config as config_lib
    from serving.bench import server_bench as bench

    config, versions = bench.pushed_versions(args.output_dir)
    newest = max(versions)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as folder:
        work = pathlib.Path(folder)
        paths = generator.write(args.rows // FILES, seed=7, output_dir=work / "in", spans=FILES)
        started = time.perf_counter()
        job = subprocess.run(
            [
                sys.executable,
                "-m",
                "babyweight_cli",
                "predict-batch",
                "--input",
                str(work / "in" / "*" / "*.csv"),
                "--output",
                str(work / "out" / "run"),
                "--model-dir",
                config.serving_dir,
                "--version",
                str(newest),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        if job.returncode:
            print(f"error: predict-batch failed:\n{job.stderr[-3000:]}", file=sys.stderr)
            return 1
        summary = job.stdout.splitlines()[0]
        rows = args.rows // FILES * FILES
        records = _rows(paths)
        results = {
            "rows": rows,
            "version": newest,
            "predict_batch_summary": summary,
            "predict_batch": {"seconds": seconds, "rows_per_s": rows / seconds},
            "signature": {"rows_per_s": signature_rate(versions[newest], records[:200_000])},
            "server": server_rate(config.serving_dir, records, args.server_rows, work),
        }
    print(f"version {newest}, {rows:,} generated rows in {FILES} files ({summary})")
    print(f"{'way':<40}{'rows/s':>12}")
    print(
        f"{'predict-batch, files -> files':<40}{results['predict_batch']['rows_per_s']:>12,.0f}"
        f"   ({results['predict_batch']['seconds']:.1f} s for the command)"
    )
    print(f"{'signature in-process, batches of 1,024':<40}{results['signature']['rows_per_s']:>12,.0f}")
    print(
        f"{'server, one row per request':<40}{results['server']['rows_per_s']:>12,.0f}"
        f"   ({results['server']['rows']:,} rows)"
    )
    config_lib.write_bench_figures(args.output_dir, "predict", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
