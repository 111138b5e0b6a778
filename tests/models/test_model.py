"""The Keras model builds and learns; training is sized by the data."""
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


@pytest.mark.parametrize("examples, expected", [
    (16_000, (63, 7)),  # 4 epochs would be 252 steps: more epochs until at least 400
    (1_000_000, (3907, 4)),  # large data: the configured 4 epochs
    (10, (1, 400)),
])
def test_training_schedule_covers_small_and_large_data(examples, expected):
    assert model.training_schedule(examples, 256, 4, 400) == expected
