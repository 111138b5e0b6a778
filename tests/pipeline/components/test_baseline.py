"""The reference models' inputs and fit, on rows as the examples and requests carry them."""

import numpy as np
import pandas as pd

from models import features
from pipeline.components import baseline


def _frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    weeks = rng.integers(30, 43, rows).astype(float)
    frame = pd.DataFrame({c.name: np.full(rows, np.nan) for c in features.FEATURES})
    frame["gestation_weeks"] = weeks
    frame["mother_age"] = rng.integers(16, 45, rows).astype(float)
    frame["is_male"] = rng.choice(["true", "false", ""], rows)
    frame["mother_married"] = ""
    frame[features.LABEL.name] = 0.25 * weeks - 2.5 + (frame.is_male == "true") * 0.3
    return frame


def test_tree_inputs_are_numbers_flags_and_nan_for_missing_values_and_unknown_codes():
    frame = pd.DataFrame(
        {"is_male": ["true", "false", ""], "father_age": [30.0, 99.0, np.nan], "gestation_weeks": ["39", "", "99"]}
    )
    columns = [features.BY_NAME[n] for n in ("is_male", "father_age", "gestation_weeks", "plurality")]
    matrix = baseline.tree_inputs(frame, columns)
    expected = np.array([[1, 30, 39, np.nan], [0, np.nan, np.nan, np.nan], [np.nan, np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(matrix, expected)


def test_trees_learn_the_signal_and_skip_rows_without_a_label():
    train = _frame(3000)
    train.loc[:99, features.LABEL.name] = np.nan
    trees = baseline.fit_trees(train)
    test = _frame(500, seed=1)
    labels = test[features.LABEL.name].to_numpy()
    assert baseline.rmse(trees.predict(baseline.tree_inputs(test)), labels) < 0.1
    assert trees.n_features_in_ == len(features.FEATURES)


def test_rmse_ignores_rows_without_a_label():
    assert baseline.rmse(np.array([1.0, 5.0, 2.0]), np.array([2.0, np.nan, 4.0])) == np.sqrt(2.5)
