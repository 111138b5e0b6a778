"""Skew and drift on served requests: TFDV's distances, the schema's thresholds, and floors that keep clean windows
from alarming, on the real export's rows."""

import csv
import random

import pytest
import tensorflow_data_validation as tfdv

from models import features
from pipeline.components.checks import comparator_thresholds
from pipeline.config import load_config
from watch import skew

RATE = 1e-6


@pytest.fixture(scope="module")
def schema():
    return tfdv.load_schema_text(load_config().schema_path)


@pytest.fixture(scope="module")
def real(real_export_csv, schema):
    """Training requests (6,000 rows) and a pool of other rows served from, with their training statistics."""
    with real_export_csv.open(newline="") as handle:
        rows = [
            {k: row[k] for k in features.FEATURE_NAMES if row.get(k) not in ("", None)}
            for row in csv.DictReader(handle)
        ]
    rows = [row for row in rows if not features.missing_required(row)]
    random.Random(0).shuffle(rows)
    training = skew.statistics_of(rows[:3200], schema)  # a 4,000-row span's train split
    return training, rows[3200:], rows[:3200]


@pytest.fixture(scope="module")
def calibrated(schema, real):
    training, _, training_rows = real
    return {kind: skew.calibrated(schema, training, training_rows, kind, RATE, 2500) for kind in ("skew", "drift")}


def test_the_floors_come_from_the_schemas_thresholds(schema, real, calibrated):
    training, _, _ = real
    floors = skew.floors(schema, training, "skew", RATE)
    assert set(floors) == set(comparator_thresholds(schema, "skew"))
    # a stricter threshold needs a bigger window; a lower false-alarm rate too
    looser = skew.floors(schema, training, "skew", 1e-3)
    assert all(looser[name] <= floor for name, floor in floors.items() if floor)
    assert floors["mother_married"] > floors["weight_gain_pounds"]  # L-infinity of a share needs more rows
    # the calibration on the training rows raises the floor of a feature of few common values, TFDV's divergence
    # of its histograms being biased at small windows, and leaves the others at the formula's
    assert calibrated["skew"]["gestation_weeks"] >= 2 * floors["gestation_weeks"]
    assert calibrated["skew"]["weight_gain_pounds"] == skew.SMALLEST_DIVERGENCE_WINDOW
    assert all(calibrated["skew"][name] >= floor for name, floor in floors.items() if floor)


def test_clean_windows_never_pass_a_threshold_at_their_floor(schema, real, calibrated):
    training, pool, _ = real
    floors = calibrated["skew"]
    sizes = skew.window_sizes(floors, 2500)
    rng = random.Random(1)
    nearest = {}
    for _ in range(25):
        windows = {size: (rng.sample(pool, size), None) for size in sizes}
        for judged in skew.judge(schema, windows, training, "skew", floors):
            assert not judged.alarm, judged
            nearest[judged.feature] = max(nearest.get(judged.feature, 0), judged.distance / judged.threshold)
    assert max(nearest.values()) < 0.9, nearest  # room to spare, not luck


def test_below_its_floor_a_feature_waits(schema, real, calibrated):
    training, pool, _ = real
    floors = calibrated["skew"]
    shifted = [dict(row, mother_married="false") for row in pool[:256]]  # every mother unmarried: far off
    judged = {j.feature: j for j in skew.judge(schema, {256: (shifted, None)}, training, "skew", floors)}
    assert floors["mother_married"] > 256
    assert judged["mother_married"].distance is None and not judged["mother_married"].alarm
    assert judged["weight_gain_pounds"].distance is not None  # judged: its floor is lower


def test_a_client_in_kilograms_is_flagged_from_its_smallest_window(schema, real, calibrated):
    training, pool, _ = real
    floors = calibrated["skew"]
    kilograms = [
        dict(row, weight_gain_pounds=round(float(row["weight_gain_pounds"]) / 2.2046))
        if "weight_gain_pounds" in row
        else row
        for row in pool
    ]
    size = min(s for s in skew.window_sizes(floors, 2500) if s >= floors["weight_gain_pounds"])
    assert size <= 256  # the smallest window weight_gain_pounds is judged in
    judged = {j.feature: j for j in skew.judge(schema, {size: (kilograms[:size], None)}, training, "skew", floors)}
    assert judged["weight_gain_pounds"].alarm, judged["weight_gain_pounds"]
    assert [name for name, j in judged.items() if j.alarm] == ["weight_gain_pounds"]


def test_ten_more_points_of_unmarried_mothers_are_flagged(schema, real, calibrated):
    training, pool, _ = real
    floors = calibrated["skew"]
    married = [row for row in pool if row.get("mother_married") == "true"]
    unmarried = [row for row in pool if row.get("mother_married") == "false"]
    share = len(unmarried) / (len(married) + len(unmarried))
    rng = random.Random(2)
    size = 2500
    shifted = [rng.choice(unmarried if rng.random() < share + 0.10 else married) for _ in range(size)]
    judged = {j.feature: j for j in skew.judge(schema, {size: (shifted, None)}, training, "skew", floors)}
    assert judged["mother_married"].alarm, judged["mother_married"]


def test_drift_compares_a_window_with_the_one_before(schema, real, calibrated):
    _, pool, _ = real
    floors = calibrated["drift"]
    size = 256
    before = pool[:size]
    same = pool[size : 2 * size]
    kilograms = [
        dict(row, weight_gain_pounds=round(float(row["weight_gain_pounds"]) / 2.2046))
        if "weight_gain_pounds" in row
        else row
        for row in same
    ]
    clean = {j.feature: j for j in skew.judge(schema, {size: (same, before)}, None, "drift", floors)}
    drifted = {j.feature: j for j in skew.judge(schema, {size: (kilograms, before)}, None, "drift", floors)}
    assert not any(j.alarm for j in clean.values()), clean
    assert drifted["weight_gain_pounds"].alarm
