"""Training rows as requests send them: optional features removed at random.

`drops` draws which values a batch of rows loses. `TransformedMask` removes them from rows the transform graph
has already transformed, giving each the transformed values the graph gives a missing input, so the Trainer
transforms its rows once and masks them afresh each epoch. It is exactly what transforming the rows with
those values left out ("" or NaN, as a request leaves them out) gives: tests/models/test_masking.py checks it
on every row of the real export, with every 'unknown' code. "Missing" keeps one definition, `is_missing` in
models/preprocessing.py, which the mask reaches through the transform graph.
"""

from typing import Any, Dict, Mapping, Optional

import tensorflow as tf

from models import features, preprocessing, signatures


def drops(
    rows: tf.Tensor, mask_rate: float, presence: Optional[Mapping[str, float]] = None, seed: Any = (0, 0)
) -> Dict[str, tf.Tensor]:
    """{feature: which of `rows` rows lose its value}, for the features that can lose one.

    A `mask_rate` share of rows lose some of their optional features: in such a row each optional feature is
    removed with a probability drawn for the row, uniform in [0, 1], so rows lacking one feature and rows lacking
    all of them are both common (clients leave out several at once). A feature in `presence` also keeps its value
    in only that share of rows, chosen at random (0: in none), as in a span where it is that rare. The draws are
    stateless, from `seed` (two integers): the same seed removes the same values, however tf.data orders its
    parallel calls.
    """
    presence = dict(presence or {})
    unknown = sorted(set(presence) - {c.name for c in features.FEATURES})
    if unknown:
        raise ValueError(
            f"cannot remove {', '.join(unknown)}: not among the model features "
            f"{', '.join(c.name for c in features.FEATURES)}"
        )
    shape = tf.reshape(rows, [1])
    seed = tf.cast(seed, tf.int64)
    draws = iter(range(2 + 2 * len(features.FEATURES)))

    def uniform() -> tf.Tensor:  # each draw its own stream, folded in from the seed
        return tf.random.stateless_uniform(shape, seed=tf.random.experimental.stateless_fold_in(seed, next(draws)))

    partial = uniform() < mask_rate
    share = uniform()
    dropped = {}
    for column in features.FEATURES:
        masks = []
        if mask_rate and not column.required:
            masks.append(partial & (uniform() < share))
        if column.name in presence:
            masks.append(uniform() >= presence[column.name])
        if masks:
            dropped[column.name] = masks[0] if len(masks) == 1 else masks[0] | masks[1]
    return dropped


class TransformedMask:
    """Removes values from transformed rows: each transformed feature a dropped value decides
    (`features.transformed_keys`) takes the value the transform graph gives a missing input, and the crosses are
    crossed again (`preprocessing.crosses`)."""

    def __init__(self, tft_layer: tf.keras.layers.Layer, raw_spec: Mapping[str, Any]):
        # The transform of one row in which every feature is missing: each transformed feature's missing value.
        nothing = {
            c.name: tf.constant([""]) if c.dtype == "string" else tf.constant([float("nan")]) for c in features.FEATURES
        }
        transformed = tft_layer(signatures.sparse_raw(nothing, raw_spec))
        self._missing = {
            key: tf.reshape(transformed[key], [-1])[0]
            for column in features.FEATURES
            for key in features.transformed_keys(column)
        }

    def __call__(self, transformed: Dict[str, tf.Tensor], dropped: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        masked = dict(transformed)
        for name, drop in dropped.items():
            for key in features.transformed_keys(features.BY_NAME[name]):
                masked[key] = tf.where(drop, self._missing[key], transformed[key])
        masked.update(preprocessing.crosses(masked))
        return masked
