"""Training's masking (models/masking.py): which values it removes, and that removing them from transformed rows
is exactly transforming the rows without them, on the real export, with every 'unknown' code."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from models import features, masking, model, signatures
from models.preprocessing import dense_raw


def _share(mask) -> float:
    return float(np.mean(mask.numpy()))


def test_masking_removes_optional_features_in_about_the_configured_share_of_rows_and_never_required_ones():
    rows = 20_000
    dropped = masking.drops(rows, 0.5, seed=(3, 0))
    assert set(dropped) == {c.name for c in features.OPTIONAL_FEATURES}  # never a required one
    removed = np.stack([dropped[c.name].numpy() for c in features.OPTIONAL_FEATURES])
    # Half the rows are partial, and a partial row loses each optional feature with a probability drawn
    # uniformly for the row: a quarter of all values, and rows lacking every optional feature are common.
    assert 0.22 < removed.mean() < 0.28
    assert 0.5 * rows / 7 * 0.8 < removed.all(axis=0).sum() < 0.5 * rows / 7 * 1.2
    assert 0.5 < (~removed.any(axis=0)).mean() < 0.6  # unmasked rows and partial rows that lost nothing


def test_masking_is_the_same_for_the_same_seed():
    first, again, other = (masking.drops(500, 0.5, seed=seed) for seed in ((1, 7), (1, 7), (1, 8)))
    for name in first:
        np.testing.assert_array_equal(first[name].numpy(), again[name].numpy())
    assert any((first[name].numpy() != other[name].numpy()).any() for name in first)


def test_masking_off_keeps_every_value_and_presence_keeps_its_share():
    assert masking.drops(2000, 0.0) == {}
    cut = masking.drops(2000, 0.0, presence={"father_age": 0.0, "is_male": 0.0, "ever_born": 0.2})
    assert set(cut) == {"father_age", "is_male", "ever_born"}
    assert _share(cut["father_age"]) == _share(cut["is_male"]) == 1.0
    assert 0.17 < 1 - _share(cut["ever_born"]) < 0.23
    both = masking.drops(2000, 0.5, presence={"ever_born": 1.0, "father_age": 0.5})
    assert 0.7 < 1 - _share(both["ever_born"]) < 0.8  # masked as without `presence`: a quarter of the values
    assert 0.33 < 1 - _share(both["father_age"]) < 0.42  # and then half of those kept
    with pytest.raises(ValueError, match="cannot remove hospital_id: not among the model features"):
        masking.drops(10, 0.0, presence={"hospital_id": 0.0})


@pytest.fixture(scope="module")
def real_rows(real_export_run):
    """The real export's train split as dense raw rows, with every 'unknown' code of every feature written into
    some rows (the first rows for the first code, the next for the next ...), and the run's transform graph."""
    _, result = real_export_run
    transform = tft.TFTransformOutput(result.steps["Transform"].outputs["transform_graph"][0].uri)
    examples = result.steps["CsvExampleGen"].outputs["examples"][0].uri
    raw_spec = signatures.raw_feature_spec(transform, with_label=True)
    records = next(iter(model._records([f"{examples}/Split-train/*"]).batch(100_000)))
    dense = {name: dense_raw(value).numpy() for name, value in tf.io.parse_example(records, raw_spec).items()}
    row = 0
    for column in features.FEATURES:
        for code in column.missing_codes:
            dense[column.name][row : row + 50] = code
            row += 50
    assert row and len(dense[features.LABEL.name]) > 10_000
    return transform, {name: tf.constant(value) for name, value in dense.items()}


def _without(dense, dropped):
    """Raw rows without the dropped values, as a request leaves them out: "" or NaN in their place."""
    return {
        name: tf.where(dropped[name], "" if value.dtype == tf.string else float("nan"), value)
        if name in dropped
        else value
        for name, value in dense.items()
    }


@pytest.mark.parametrize(
    "mask_rate, presence",
    [
        (0.5, None),  # the Trainer's
        (0.9, {"father_age": 0.0, "is_male": 0.3}),
        (0.0, {"gestation_weeks": 0.5, "plurality": 0.5, "mother_age": 0.7}),  # required ones and crossed ids
    ],
)
def test_masking_transformed_rows_is_transforming_masked_rows_on_the_real_export(real_rows, mask_rate, presence):
    transform, dense = real_rows
    layer = transform.transform_features_layer()
    raw_spec = signatures.raw_feature_spec(transform, with_label=True)
    dropped = masking.drops(tf.size(dense[features.LABEL.name]), mask_rate, presence, seed=(5, 2))
    expected = layer(signatures.sparse_raw(_without(dense, dropped), raw_spec))
    mask = masking.TransformedMask(layer, signatures.raw_feature_spec(transform, with_label=False))
    got = mask(layer(signatures.sparse_raw(dense, raw_spec)), dropped)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(
            tf.reshape(got[key], [-1]).numpy(), tf.reshape(expected[key], [-1]).numpy(), err_msg=key
        )
    for name, drop in dropped.items():  # the masking did remove values: some rows lost each feature, some kept it
        assert 0 < _share(drop) < 1 or presence.get(name) == 0.0, name


def _flat(dataset, batches: int):
    """The rows of a dataset's first batches: {feature: values}, the label and the weight as "label", "weight"."""
    rows = {}
    for features_, label, weight in dataset.take(batches):
        for key, value in dict(features_, label=label, weight=weight).items():
            rows.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(values) for key, values in rows.items()}


def test_the_trainers_rows_are_the_transformed_rows(real_export_run):
    _, result = real_export_run
    transform = tft.TFTransformOutput(result.steps["Transform"].outputs["transform_graph"][0].uri)
    pattern = result.steps["CsvExampleGen"].outputs["examples"][0].uri + "/Split-train/*"
    rows = _flat(model._input_fn([pattern], {pattern: 0.5}, transform, 512, shuffle=False), 1)
    raw_spec = signatures.raw_feature_spec(transform, with_label=True)
    parsed = tf.io.parse_example(next(iter(model._records([pattern]).batch(512))), raw_spec)
    expected = {
        key: tf.reshape(value, [-1]).numpy()
        for key, value in transform.transform_features_layer()(
            signatures.sparse_raw({name: dense_raw(value) for name, value in parsed.items()}, raw_spec)
        ).items()
    }
    np.testing.assert_array_equal(rows.pop("label"), expected.pop(features.label_key()))
    # The span's recency weight, 0 where a row has no label.
    np.testing.assert_array_equal(rows.pop("weight"), 0.5 * expected.pop(features.label_weight_key()))
    assert set(rows) == set(expected)
    for key, value in rows.items():  # tf.data's graph rounds a z-score's last bit differently from eager calls
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, err_msg=key)


def test_each_pass_over_the_rows_masks_them_afresh_cached_or_not_and_whatever_the_batch_size(real_export_run):
    _, result = real_export_run
    transform = tft.TFTransformOutput(result.steps["Transform"].outputs["transform_graph"][0].uri)
    pattern = result.steps["CsvExampleGen"].outputs["examples"][0].uri + "/Split-train/*"
    rows = model._count_records([pattern])

    def two_passes(batch_size: int, cache: bool):
        dataset = model._input_fn(
            [pattern], {pattern: 1.0}, transform, batch_size, False, 0.5, seed=4, repeat=True, cache=cache
        )
        return _flat(dataset, -(-2 * rows // batch_size))

    cached, streamed, small = two_passes(512, True), two_passes(512, False), two_passes(128, True)
    for other in (streamed, small):  # the same rows lose the same values: cached or not, whatever the batch size
        for key, value in cached.items():
            np.testing.assert_array_equal(value[: 2 * rows], other[key][: 2 * rows], err_msg=key)
    # Each row once a pass, in order; masked afresh in the second pass.
    np.testing.assert_array_equal(cached["label"][:rows], cached["label"][rows : 2 * rows])
    gone = cached[features.missing_key(features.BY_NAME["father_age"])]
    first, second = gone[:rows], gone[rows : 2 * rows]
    assert 0.1 < first.mean() < 0.6 and (first != second).mean() > 0.1
    ages = cached[features.transformed_name("father_age")]
    kept = (first == 0) & (second == 0)
    np.testing.assert_array_equal(ages[:rows][kept], ages[rows : 2 * rows][kept])
