"""`make bench-tflite`: the newest pushed version as SavedModel and as TFLite models, on the same rows.

    make bench-tflite                                                   # the bundled data's rows
    make bench-tflite ARGS="--input ../shared/data/natality/bq_export_31col.csv"

The models: the SavedModel, the pushed TFLite float32 and float16 files, and the SavedModel converted here with
int8 weights (dynamic range: measured, not shipped). For each: its size on disk, the latency of one prediction
(one row per call, every row the serving contract accepts from --input, up to --single-rows, one after another),
predictions/s one row per call and in batches of 1,024, its largest difference from the SavedModel and its RMSE
against the rows' labels. The SavedModel is called in-process through TensorFlow (serving_raw, as the server's
model is); the TFLite models through tflite-runtime's interpreter on one thread (serving/clients/device.py, as a device
runs them). The table goes to stdout and outputs/bench/tflite.json.
"""

import argparse
import glob
import pathlib
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import numpy

from models import features, lite
from models.requests import read_requests

BATCH = 1024


def saved_model_bytes(version_dir: pathlib.Path) -> int:
    """The SavedModel's files (graph, variables, assets), without the TFLite models and assets.extra beside it."""
    kept = [
        path
        for path in version_dir.rglob("*")
        if path.is_file()
        and path.name not in lite.FILES.values()
        and "assets.extra" not in path.relative_to(version_dir).parts
    ]
    return sum(path.stat().st_size for path in kept)


def measure(
    predict: Callable[[Dict[str, numpy.ndarray]], numpy.ndarray], columns: Dict[str, numpy.ndarray], single_rows: int
) -> Dict[str, Any]:
    """Latency of one-row calls and throughput of one-row and 1,024-row calls on the same rows."""
    rows = len(next(iter(columns.values())))
    one_by_one = [
        {name: array[index : index + 1] for name, array in columns.items()} for index in range(min(rows, single_rows))
    ]
    predict(one_by_one[0])  # the first call traces or allocates
    latencies = []
    for one in one_by_one:
        started = time.perf_counter()
        predict(one)
        latencies.append(time.perf_counter() - started)
    batches = [
        {name: array[start : start + BATCH] for name, array in columns.items()} for start in range(0, rows, BATCH)
    ]
    predict(batches[0])
    started = time.perf_counter()
    predictions = numpy.concatenate([predict(batch) for batch in batches])
    batched_seconds = time.perf_counter() - started
    return {
        "latency_p50_us": float(numpy.percentile(latencies, 50) * 1e6),
        "latency_p99_us": float(numpy.percentile(latencies, 99) * 1e6),
        "one_row_per_s": len(latencies) / sum(latencies),
        "batched_per_s": rows / batched_seconds,
        "predictions": predictions,
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Measures the models and prints the table; 1 if the newest version has no TFLite models or no row is usable."""
    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as scratch:
        return _main(argv, scratch)


def _main(argv: Optional[List[str]], scratch: str) -> int:
    parser = argparse.ArgumentParser(prog="make bench-tflite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="CSV or JSON lines with the natality columns (default: the bundled data)")
    parser.add_argument("--single-rows", type=int, default=5_000, help="rows predicted one per call (latency)")
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    import tensorflow as tf

    from pipeline import config as config_lib
    from serving.bench import server_bench as bench
    from serving.clients import device
    from serving.core import contract

    config, versions = bench.pushed_versions(args.output_dir)
    newest = max(versions)
    version_dir = pathlib.Path(versions[newest])
    missing = [name for name in lite.FILES.values() if not (version_dir / name).is_file()]
    if missing:
        print(
            f"error: version {newest} has no {', '.join(missing)}: the pipeline's TFLiteExporter writes them beside "
            "each model it pushes (make run)",
            file=sys.stderr,
        )
        return 1
    paths = [args.input] if args.input else sorted(glob.glob(str(pathlib.Path(config.data_dir) / "*.csv")))
    keys, labels = [], []
    for path in paths:
        for row in read_requests(pathlib.Path(path)):
            try:
                keys.append(features.instance_key(contract.to_instance(row)))
            except ValueError:
                continue
            labels.append(float(row.get(features.LABEL.name) or "nan"))
    if not keys:
        print(f"error: no row of {', '.join(paths)} is a request the serving contract accepts", file=sys.stderr)
        return 1
    columns, labels = features.raw_columns(keys), numpy.array(labels)
    signature = tf.saved_model.load(str(version_dir)).signatures[lite.SIGNATURE]

    def saved_model(batch: Dict[str, numpy.ndarray]) -> numpy.ndarray:
        return (
            signature(**{name: tf.constant(array) for name, array in batch.items()})[lite.PREDICTIONS]
            .numpy()
            .reshape(-1)
        )

    models = {"SavedModel": (saved_model, saved_model_bytes(version_dir))}
    for variant, name in lite.FILES.items():
        models[f"TFLite {variant}"] = (
            device.DeviceModel(str(version_dir / name)).predict_columns,
            (version_dir / name).stat().st_size,
        )
    unshipped = pathlib.Path(scratch) / "dynamic_range.tflite"
    unshipped.write_bytes(lite.convert(str(version_dir), "dynamic_range"))
    models["TFLite dynamic range"] = (device.DeviceModel(str(unshipped)).predict_columns, unshipped.stat().st_size)
    results: Dict[str, Any] = {"version": newest, "input": paths, "rows": len(keys), "models": {}}
    reference = None
    known = ~numpy.isnan(labels)
    for title, (predict, size) in models.items():
        figures = measure(predict, columns, args.single_rows)
        predictions = figures.pop("predictions")
        reference = predictions if reference is None else reference
        figures.update(
            bytes=size,
            max_difference=float(numpy.abs(predictions - reference).max()),
            rmse=float(numpy.sqrt(numpy.mean((predictions[known] - labels[known]) ** 2))),
        )
        results["models"][title] = figures
    print(
        f"version {newest}, {len(keys):,} rows the serving contract accepts from {', '.join(paths)} "
        f"({int(known.sum()):,} labelled); one row per call: the first {min(len(keys), args.single_rows):,}"
    )
    print(
        f"{'model':<22}{'size':>10}{'p50 µs':>9}{'p99 µs':>9}{'1 row/call /s':>15}{'1,024/call /s':>15}"
        f"{'max |diff| lb':>15}{'RMSE lb':>9}"
    )
    for title, figures in results["models"].items():
        print(
            f"{title:<22}{figures['bytes'] / 1024:>7,.0f} KiB{figures['latency_p50_us']:>9,.0f}"
            f"{figures['latency_p99_us']:>9,.0f}{figures['one_row_per_s']:>15,.0f}{figures['batched_per_s']:>15,.0f}"
            f"{figures['max_difference']:>15.6f}{figures['rmse']:>9.4f}"
        )
    config_lib.write_bench_figures(args.output_dir, "tflite", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
