"""The exported model's serving_raw (its dense inputs straight into the transform's mappings) against the graph it
replaces (TF Transform's, rebuilt by serving/bench/graph_bench.py), on the pipeline's run over the real export."""

import csv
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from models import features, lite
from serving.bench import graph_bench
from serving.core import loader

pytestmark = pytest.mark.slow

MAX_DIFFERENCE = 1e-5  # lb, any row
BATCH = 4096


@pytest.fixture(scope="module")
def graphs(real_export_run):
    """The Trainer's serving_raw, and the graph it replaces rebuilt from the run's transform graph and the model."""
    _, result = real_export_run
    exported = str(pathlib.Path(result.steps["Trainer"].outputs["model"][0].uri, "Format-Serving"))
    transform_graph = result.steps["Transform"].outputs["transform_graph"][0].uri
    loaded = tf.saved_model.load(exported)
    yield loaded.signatures[lite.SIGNATURE], graph_bench.old_graph(exported, transform_graph)


def _predict(signature, keys) -> np.ndarray:
    return np.concatenate(
        [
            signature(**loader.columns_of(keys[start : start + BATCH]))[lite.PREDICTIONS].numpy().reshape(-1)
            for start in range(0, len(keys), BATCH)
        ]
    )


def _complete(rows):
    """A real row with a known value of every feature, as an instance."""
    row = next(
        r for r in rows if all(r.get(c.name) and not features.is_missing_value(c, r[c.name]) for c in features.FEATURES)
    )
    return {c.name: row[c.name] if c.dtype == "string" else float(row[c.name]) for c in features.FEATURES}


def test_serving_raw_predicts_every_real_row_as_the_transform_graph_does(graphs, real_export_csv):
    """Every row of the real export that has the required features (NULLs and 'unknown' codes as they come), and a
    complete row with each feature's edge values: beyond the training range, between integers, an unseen text."""
    lean, old = graphs
    rows = [{name: value for name, value in row.items() if value} for row in csv.DictReader(real_export_csv.open())]
    keys = [features.instance_key(row) for row in rows if not features.missing_required(row)]
    assert len(keys) == len(rows) - 144  # the real rows without gestation weeks (none, or 99)
    complete = _complete(rows)
    edges = []
    for column in features.FEATURES:
        values = ["", "unheard-of", "TRUE"] if column.dtype == "string" else [-3, 0.5, 17.5, 97, 1e6, -1e30]
        values += (
            [] if column.required else [None, *column.missing_codes, *(code + 0.5 for code in column.missing_codes)]
        )
        edges += [dict(complete, **{column.name: value}) for value in values]
    keys += [features.instance_key(edge) for edge in edges]
    difference = np.abs(_predict(lean, keys) - _predict(old, keys))
    assert difference.max() <= MAX_DIFFERENCE, (difference.max(), keys[int(difference.argmax())])


@pytest.mark.parametrize("column", features.REQUIRED_FEATURES, ids=lambda column: column.name)
def test_serving_raw_refuses_rows_lacking_a_required_feature_naming_it_and_the_rows(graphs, real_export_csv, column):
    """No value, an 'unknown' code, or a number read as one (99.5 weeks is the integer 99): refused, as the graph it
    replaces refuses them, naming the feature and the rows; lacking both, the first is named."""
    lean, old = graphs
    complete = _complete(list(csv.DictReader(real_export_csv.open())))
    for lacking in [None, *column.missing_codes, *(code + 0.5 for code in column.missing_codes)]:
        instances = [dict(complete, **{column.name: lacking}) if row in (1, 3) else complete for row in range(5)]
        for signature in (lean, old):
            with pytest.raises(
                tf.errors.InvalidArgumentError, match=rf"missing required feature {column.name} .*\[1 3\]"
            ):
                signature(**loader.columns_of([features.instance_key(i) for i in instances]))
    first = features.REQUIRED_FEATURES[0]
    neither = {name: value for name, value in complete.items() if not features.BY_NAME[name].required}
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"missing required feature {first.name} .*\[0\]"):
        lean(**loader.columns_of([features.instance_key(neither)]))


def test_serving_raw_holds_neither_the_transform_graph_nor_the_models_variables(graphs):
    """Its graph is the mappings and the model's arithmetic: no sparse tensors made dense (TF Transform's input), no
    variable read (the weights are constants)."""
    lean, _ = graphs
    ops = {node.op for function in lean.graph.as_graph_def().library.function for node in function.node_def}
    assert not ops & {"SparseToDense", "ReadVariableOp", "ResourceGather", "If", "StatelessIf"}, ops
