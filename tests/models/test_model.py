"""The Keras model builds and learns; strategies are picked from config and train on two devices."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from models import features, model


def _batch(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    inputs = {features.transformed_name(name): rng.integers(0, size, rows)
              for name, size in features.id_sizes().items()}
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


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown distribution strategy 'tpu'"):
        model.select_strategy("tpu")


def test_mirrored_strategy_trains_one_step_on_two_logical_cpus():
    # Logical devices must be configured before TensorFlow starts, hence a fresh interpreter.
    script = textwrap.dedent("""
        import os
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from models import model
        from tests.models.test_model import _batch
        strategy = model.select_strategy("mirrored")
        assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
        assert model.select_strategy("default").num_replicas_in_sync == 1
        with strategy.scope():
            keras_model = model.build_keras_model([8], 2, 0.01)
        inputs = _batch(64)
        before = [w.numpy().copy() for w in keras_model.trainable_weights]
        dataset = tf.data.Dataset.from_tensor_slices((inputs, np.full(64, 7.0, np.float32))).batch(64)
        keras_model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
        changed = sum(not np.allclose(b, w.numpy()) for b, w in zip(before, keras_model.trainable_weights))
        assert changed > 0
        print("replicas", strategy.num_replicas_in_sync, "changed", changed)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout


@pytest.mark.parametrize("examples, expected", [
    (16_000, (63, 7)),  # 4 epochs would be 252 steps: more epochs until at least 400
    (1_000_000, (3907, 4)),  # large data: the configured 4 epochs
    (10, (1, 400)),
])
def test_training_schedule_covers_small_and_large_data(examples, expected):
    assert model.training_schedule(examples, 256, 4, 400) == expected
