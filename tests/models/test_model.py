"""The Keras model builds and learns; training is sized by the data."""

import numpy as np
import pytest

from models import features, model, preprocessing, signatures


def _batch(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    inputs = {
        features.transformed_name(name): rng.integers(0, size, rows) for name, size in features.id_sizes().items()
    }
    for column in features.numeric_features():
        inputs[features.transformed_name(column.name)] = rng.normal(size=rows).astype(np.float32)
        inputs[features.missing_key(column)] = np.zeros(rows, np.float32)
    return inputs


def test_model_takes_every_transformed_input_and_predicts_one_value_per_row():
    keras_model = model.build_keras_model([8], 2, 0.01)
    assert set(keras_model.input_names) == set(_batch(1))
    assert keras_model.predict(_batch(5), verbose=0).shape == (5, 1)


def test_model_learns_a_simple_signal():
    keras_model = model.build_keras_model([16], 2, 0.05)
    inputs = _batch(2000)
    label = 7 + inputs[features.transformed_name("gestation_weeks")]
    history = keras_model.fit(inputs, label, epochs=15, batch_size=200, verbose=0)
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]


@pytest.mark.parametrize(
    "examples, expected",
    [
        (16_000, (63, 7)),  # 4 epochs would be 252 steps: more epochs until at least 400
        (1_000_000, (3907, 4)),  # large data: the configured 4 epochs
        (10, (1, 400)),
    ],
)
def test_training_schedule_covers_small_and_large_data(examples, expected):
    assert model.training_schedule(examples, 256, 4, 400) == expected


@pytest.mark.parametrize(
    "epochs, expected",
    [
        (400, [40, 80, 120, 160, 200, 240, 280, 320, 360, 400]),  # small data: 400 short epochs, validated 10 times
        (25, [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]),
        (4, [1, 2, 3, 4]),  # large data: after each epoch
    ],
)
def test_the_trainer_validates_at_evenly_spaced_epochs_ending_with_the_last(epochs, expected):
    assert model.validation_epochs(epochs) == expected


def test_python_and_graph_agree_on_what_is_missing():
    import tensorflow as tf

    for column in features.FEATURES:
        if column.dtype == "string":
            values = ["true", "", "false"]
            tensor = tf.constant(values)
        else:
            values = [30.0, float("nan"), 99.0, 0.0]
            tensor = tf.constant(values, tf.float32)
        graph = preprocessing.is_missing(column, tensor).numpy().tolist()
        assert graph == [features.is_missing_value(column, v) for v in values], column.name


def test_parsed_integers_reach_the_missing_check_as_the_python_twin_sees_them():
    import tensorflow as tf

    weeks = features.BY_NAME["gestation_weeks"]
    parsed = tf.sparse.SparseTensor([[0, 0], [1, 0], [3, 0]], tf.constant([39, 99, 17], tf.int64), [4, 1])
    graph = preprocessing.is_missing(weeks, preprocessing.dense_raw(parsed)).numpy().tolist()
    assert graph == [features.is_missing_value(weeks, v) for v in (39, 99, None, 17)] == [False, True, True, False]


class _RawSpec:
    """The part of a TFTransformOutput that `signatures.frequent_instances` reads: the raw features' spec."""

    def raw_feature_spec(self):
        import tensorflow as tf

        spec = {
            c.name: tf.io.VarLenFeature(
                tf.string if c.dtype == "string" else (tf.int64 if c.dtype == "int" else tf.float32)
            )
            for c in features.COLUMNS
        }
        return spec


def _counter_reference(rows, limit):
    """The definition `frequent_instances` keeps: every row that a request may be, counted twice (as it is, and
    as its required features alone) in a collections.Counter, most_common(limit)."""
    import collections

    counts = collections.Counter()
    kept = 0
    for row in rows:
        instance = {name: row.get(name) for name in features.FEATURE_NAMES}
        if features.missing_required(instance):
            continue
        key = features.instance_key(instance)
        counts[key] += 1
        counts[tuple(value if column.required else None for column, value in zip(features.FEATURES, key))] += 1
        kept += 1
    return {
        "rows": kept,
        "instances": [[count, dict(zip(features.FEATURE_NAMES, key))] for key, count in counts.most_common(limit)],
    }


@pytest.mark.parametrize("as_one_number", [True, False])
def test_frequent_instances_count_as_a_counter_does(tmp_path, monkeypatch, as_one_number):
    """Ties (in the order they first appear), rows lacking a required feature, 'unknown' codes and empty values,
    in three files read in name order; each instance counted as one number, or as a row of codes (too many
    distinct values for one number)."""
    import tensorflow as tf

    if not as_one_number:
        monkeypatch.setattr(signatures, "ONE_NUMBER_MAX", 1)

    rng = np.random.default_rng(3)
    rows = []
    for _ in range(3000):
        row = {
            "mother_age": float(rng.choice([22, 31, 99, np.nan])),
            "gestation_weeks": float(rng.choice([38, 40, 99])),
            "is_male": rng.choice(["true", "false", ""]),
            "plurality": float(rng.choice([1, 2, np.nan])),
            "mother_married": rng.choice(["true", ""]),
            "weight_gain_pounds": float(rng.choice([20, 35, np.nan])),
        }
        rows.append({name: value for name, value in row.items() if value == value and value != ""})
    for part in range(3):
        with tf.io.TFRecordWriter(str(tmp_path / f"part-{part}.gz"), "GZIP") as writer:
            for row in rows[part::3]:
                feature = {
                    name: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
                    if isinstance(value, str)
                    else tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
                    if features.BY_NAME[name].dtype == "int"
                    else tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
                    for name, value in row.items()
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    in_file_order = [row for part in range(3) for row in rows[part::3]]
    expected = _counter_reference(in_file_order, limit=25)
    assert 0 < expected["rows"] < 3000 and expected["instances"][0][0] > 1
    assert signatures.frequent_instances([str(tmp_path / "part-*.gz")], _RawSpec(), limit=25) == expected
