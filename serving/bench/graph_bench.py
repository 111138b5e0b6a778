"""The one-instance cost of a version's serving_raw beside the graph it replaces, in one process.

    python -m serving.bench.graph_bench [--model-dir VERSION] [--transform-graph DIR]

serving_raw takes its dense inputs straight into the transform's mappings (models/preprocessing.py,
`transform_dense`). The graph it replaces, `old_graph`, builds a tf.Example's sparse tensors from them
(`signatures.sparse_raw`) for TF Transform's graph, then calls the Keras model: rebuilt here from the run's transform
graph and the exported model. `compare` calls both as the server calls a version (serving/core/loader.py's fast call:
two tensors in, the signature inside), on the same instance, in interleaved rounds, and gives each one's median,
with that of a graph computing nothing from the same inputs: the cost of the call itself, which no graph saves.
Defaults: the newest pushed version and the newest transform graph of the local profile's pipeline root.
"""

import argparse
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

# One instance with every feature, as a client sends it.
INSTANCE = {
    "is_male": "true",
    "mother_age": 30,
    "plurality": 1,
    "gestation_weeks": 39,
    "mother_married": "true",
    "weight_gain_pounds": 30,
    "ever_born": 2,
    "father_age": 32,
}
ROUNDS = 15  # each graph timed this many times, in turn
CALLS = 200  # calls per round
WARMUP_CALLS = 200


def old_graph(saved_model_dir: str, transform_graph_dir: str) -> Callable[..., Dict[str, Any]]:
    """serving_raw through TF Transform's graph, called as a signature (one keyword a feature): the dense inputs as
    sparse tensors (`signatures.sparse_raw`), the transform graph's layer, the exported Keras model;
    {"predictions": pounds}, refusing rows that lack a required feature (`signatures.require`) as serving_raw does."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import features, lite, signatures
    from models.preprocessing import dense_raw, is_missing

    output = tft.TFTransformOutput(transform_graph_dir)
    module = tf.Module()
    module.tft_layer = output.transform_features_layer()
    module.model = tf.keras.models.load_model(saved_model_dir, compile=False)
    raw_spec = signatures.raw_feature_spec(output, with_label=False)
    inputs = [
        tf.TensorSpec([None], tf.string if c.dtype == "string" else tf.float32, name=c.name) for c in features.FEATURES
    ]

    @tf.function(input_signature=inputs, autograph=False)
    def serve_raw(*values: tf.Tensor) -> Dict[str, tf.Tensor]:
        raw = signatures.sparse_raw(dict(zip(features.FEATURE_NAMES, values)), raw_spec)
        transformed = module.tft_layer(raw)
        missing = tf.stack([is_missing(c, dense_raw(raw[c.name])) for c in features.REQUIRED_FEATURES], axis=1)
        with tf.control_dependencies([signatures.require(missing)]):
            return {
                lite.PREDICTIONS: tf.identity(
                    module.model({name: transformed[name] for name in module.model.input_names})
                )
            }

    def signature(**columns: Any) -> Dict[str, Any]:
        return serve_raw(*(columns[name] for name in features.FEATURE_NAMES))

    return signature


def _no_graph() -> Callable[..., Dict[str, Any]]:
    """A signature of serving_raw's inputs that computes nothing: what calling any graph with them costs."""
    import tensorflow as tf

    from models import features, lite

    inputs = [
        tf.TensorSpec([None], tf.string if c.dtype == "string" else tf.float32, name=c.name) for c in features.FEATURES
    ]
    first_number = next(place for place, c in enumerate(features.FEATURES) if c.dtype != "string")

    @tf.function(input_signature=inputs, autograph=False)
    def serve_raw(*values: tf.Tensor) -> Dict[str, tf.Tensor]:
        return {lite.PREDICTIONS: tf.reshape(values[first_number], [-1, 1])}

    def signature(**columns: Any) -> Dict[str, Any]:
        return serve_raw(*(columns[name] for name in features.FEATURE_NAMES))

    return signature


def _per_call_ms(predict: Callable[[List[Any]], Any], keys: List[Any]) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        predict(keys)
    return (time.perf_counter() - started) / CALLS * 1e3


def compare(saved_model_dir: str, transform_graph_dir: str, instances: int = 1) -> Dict[str, float]:
    """Milliseconds per call of `instances` instances through the version's serving_raw (lean) and through
    `old_graph` (old), each the median of ROUNDS rounds, and lean's share of old (ratio); and through a graph that
    computes nothing (call: the part of both that no graph saves)."""
    import tensorflow as tf

    from models import features, lite
    from serving.core import loader

    version = tf.saved_model.load(saved_model_dir)  # held while its signature is called
    graphs = {
        "old": old_graph(saved_model_dir, transform_graph_dir),
        "lean": version.signatures[lite.SIGNATURE],
        "call": _no_graph(),
    }
    predicts = {name: loader._fast_call(graph) for name, graph in graphs.items()}  # noqa: SLF001
    tflite = pathlib.Path(saved_model_dir, lite.FILES["float32"])
    if tflite.is_file():  # the server's model call by default (loader._lite_call)
        model = lite.LiteModel(str(tflite), tensorflow_fallback=True)
        predicts["tflite"] = lambda keys: model.predict_columns(features.raw_columns(keys))
    keys = [features.instance_key(INSTANCE)] * instances
    for predict in predicts.values():
        for _ in range(WARMUP_CALLS):
            predict(keys)
    rounds: Dict[str, List[float]] = {name: [] for name in predicts}
    for _ in range(ROUNDS):
        for name, predict in predicts.items():
            rounds[name].append(_per_call_ms(predict, keys))
    ms = {name: statistics.median(times) for name, times in rounds.items()}
    figures = {
        "old_ms": round(ms["old"], 4),
        "lean_ms": round(ms["lean"], 4),
        "ratio": round(ms["lean"] / ms["old"], 3),
        "call_ms": round(ms["call"], 4),
    }
    if "tflite" in ms:
        figures.update(tflite_ms=round(ms["tflite"], 4), tflite_ratio=round(ms["tflite"] / ms["old"], 3))
    return figures


def newest(config: Any) -> Dict[str, Optional[str]]:
    """The newest pushed version of a profile's config, and the newest transform graph of its pipeline root."""
    from serving.core import manager

    versions = manager.list_versions(config.serving_dir)
    graphs = list(pathlib.Path(config.pipeline_root, "Transform", "transform_graph").glob("*"))
    return {
        "model_dir": versions[max(versions)] if versions else None,
        "transform_graph": str(max(graphs, key=lambda p: int(p.name))) if graphs else None,
    }


def line(instances: int, figures: Dict[str, float]) -> str:
    tflite = (
        f", the version's TFLite model {figures['tflite_ms']:.3f} ms (ratio {figures['tflite_ratio']:.2f})"
        if "tflite_ms" in figures
        else ""
    )
    return (
        f"{instances:>3} instance(s) a call: old graph {figures['old_ms']:.3f} ms, serving_raw "
        f"{figures['lean_ms']:.3f} ms (ratio {figures['ratio']:.2f}, goal <= 0.5){tflite}; a graph computing nothing "
        f"{figures['call_ms']:.3f} ms"
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Prints old and lean milliseconds per call, one instance and 64 a call."""
    parser = argparse.ArgumentParser(prog="python -m serving.bench.graph_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a pushed version's folder (default: the newest)")
    parser.add_argument("--transform-graph", help="the run's transform graph folder (default: the newest)")
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    from pipeline import config as config_lib

    found = newest(config_lib.load_config(overrides={"output_dir": args.output_dir}))
    model_dir = args.model_dir or found["model_dir"]
    transform_graph = args.transform_graph or found["transform_graph"]
    if not model_dir or not transform_graph:
        print(
            f"error: no pushed version or no transform graph under {args.output_dir}: run the pipeline (make run)",
            file=sys.stderr,
        )
        return 1
    print(f"version {model_dir}, transform graph {transform_graph}")
    for instances in (1, 64):
        print(line(instances, compare(model_dir, transform_graph, instances)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
