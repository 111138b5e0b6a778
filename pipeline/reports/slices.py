"""Evaluation slices named for people: 'gestation 37-41 weeks', 'twins', 'boys'.

TFMA keys a slice by the feature it sliced on and its value (`gestation_weeks_bucket_xf=3`,
`plurality=2`); the prediction monitor slices the raw rows by the same features and buckets. Both name
their slices here, so every table and plot of a report, and the run summary, call one slice one name.
The names are a reporting fact, kept out of models/features.py so that renaming a slice reruns no training.
"""

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from models import features

OVERALL = "overall"
# What people call a slice feature, and its values where they have names of their own.
TITLES: Dict[str, str] = {"is_male": "sex", "plurality": "plurality", "gestation_weeks": "gestation"}
VALUE_NAMES: Dict[str, Dict[str, str]] = {
    "is_male": {"true": "boys", "false": "girls"},
    "plurality": {"1": "singletons", "2": "twins", "3": "triplets", "4": "quadruplets", "5": "quintuplets or more"},
}
UNITS: Dict[str, str] = {"gestation_weeks": "weeks"}
BUCKETED: Dict[str, features.Column] = {
    features.transformed_name(features.bucket_name(c)): c for c in features.FEATURES if c.bucket_boundaries
}


def _bucket_name(column: features.Column, bucket: int) -> str:
    """Bucket `bucket` of the transform's ids (models/preprocessing.py: one past the last boundary is missing)."""
    title, unit = TITLES.get(column.name, column.name), UNITS.get(column.name, "")
    bounds = column.bucket_boundaries
    if bucket < 0 or bucket > len(bounds) + 1:
        return f"{title} bucket {bucket}"
    if bucket == len(bounds) + 1:
        return f"{title} unknown"
    integer = column.dtype == "int"  # [37, 42) of whole weeks is 37-41
    unit = f" {unit}" if unit else ""
    if bucket == 0:
        return f"{title} under {bounds[0]:g}{unit}"
    if bucket == len(bounds):
        return f"{title} {bounds[-1]:g}{unit} or more"
    if integer:
        return f"{title} {bounds[bucket - 1]:g}-{bounds[bucket] - 1:g}{unit}"
    return f"{title} {bounds[bucket - 1]:g} to under {bounds[bucket]:g}{unit}"


def name(feature: str, value: str) -> str:
    """The slice of `feature` (a raw slice feature or a transformed bucket id) at `value`, named for people."""
    if feature in BUCKETED:
        return _bucket_name(BUCKETED[feature], int(value)) if str(value).lstrip("-").isdigit() else f"{feature} {value}"
    title = TITLES.get(feature, feature)
    if value == "":
        return f"{title} unknown"
    return VALUE_NAMES.get(feature, {}).get(str(value), f"{title} {value}")


def name_of_key(slice_key: Sequence[Tuple[str, object]]) -> str:
    """A TFMA slice key ((feature, value) pairs; empty for the whole split) named for people."""
    return ", ".join(name(feature, _text(value)) for feature, value in slice_key) or OVERALL


def _text(value: object) -> str:
    """A slice value as text: bytes decoded, 2.0 as '2', a missing value (None, NaN) as ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def order(feature: str, value: str) -> Tuple[int, float, str]:
    """Sort key of a slice: overall first, then features as TFMA slices them, values in their natural order."""
    keys = [key[0] for key in features.slice_keys() if key]
    position = keys.index(feature) + 1 if feature in keys else len(keys) + 1
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("inf")
    return position, number, str(value)


def values_by_slice(rows: Dict[str, Sequence], bucket_ids: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Each slice feature's value per row, as text, as TFMA slices: the raw slice features from `rows`, the bucket
    ids as the model's transform gave them (`bucket_ids`, by transformed name); '' where a raw value is missing."""
    result = {name: np.asarray(ids).astype(np.int64).ravel().astype(str) for name, ids in bucket_ids.items()}
    for name in features.SLICE_FEATURES:
        result[name] = np.array([_text(value) for value in rows[name]])
    return result


def ordered(by_key: Dict[Tuple[Tuple[str, object], ...], object]) -> List[Tuple[str, object]]:
    """(slice name, item) pairs of items keyed by TFMA slice keys (() for overall), in slice order."""

    def sort_key(key: Tuple[Tuple[str, object], ...]) -> tuple:
        return tuple(order(feature, _text(value)) for feature, value in key)

    return [(name_of_key(key), by_key[key]) for key in sorted(by_key, key=sort_key)]
