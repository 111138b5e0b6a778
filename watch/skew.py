"""Skew (served requests against the training data) and drift (against the window before) with TFDV, judged only
on windows big enough that noise alone would not pass the schema's thresholds.

The distances are TFDV's own (`tfdv.validate_statistics`, the schema's skew_comparator and drift_comparator:
L-infinity for categories, Jensen-Shannon divergence for numbers), the thresholds the schema's
(pipeline/components/checks.comparator_thresholds reads them for the floors). What is added here is the floor:
the smallest window in which a feature's distance between two samples of the same data stays under its
threshold but with chance watch_false_alarm_rate:
- L-infinity: a category's share moves by z*s*sqrt(1/n + 1/N) at most, s = max sqrt(p(1 - p)) over the training
  shares, z the normal quantile; so n >= 1 / ((t / (z s))^2 - 1/N);
- Jensen-Shannon (in bits, as TFDV's) between two samples of one distribution over B buckets is about
  chi2(B-1) * (1/n + 1/N) / (8 ln 2); so n >= 1 / (8 ln2 t / chi2_(B-1)(1 - a) - 1/N).
Drift compares two windows of n: 1/N becomes 1/n. These hold for sampling noise only; TFDV's divergence on
histograms also has a bias (each side's 10 equal-width buckets over its own range, re-bucketed as if uniform)
that is large for features of a few common values (gestation_weeks: half its threshold at 128 rows, a third
at 512). So the floors are then calibrated on the training rows themselves (`calibrated`): windows drawn from
one half of them against the other half at each size, and a feature judged from the size where the mean of the
CALIBRATION_DRAWS windows' distances plus z standard deviations stays under its threshold, and their largest
under RESOLVE_SHARE of it, at that size and every larger one.
A feature below its floor is `waiting`, never alarming.
Windows come in several sizes, each feature judged in those at or above its floor: the smallest sees a sudden
change soon (a client's unit bug), the largest a small one (a rate moving 10 points).
"""

import dataclasses
import math
import statistics as stdlib_statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tensorflow_data_validation as tfdv
from scipy import stats as scipy_stats
from tensorflow_data_validation.statistics import stats_impl
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from models import features
from pipeline.commands.serving_check import to_record_batch
from pipeline.components.checks import comparator_thresholds
from pipeline.components.validation import csv_presence

JSD_BUCKETS = 20  # TFDV compares numeric features over the union of both histograms' 10 buckets: up to 20
SMALLEST_WINDOW = 64
# TFDV's divergence of a few hundred requests has a tail no calibration of 40 draws sees: a year of checks in
# `make simulate-loop` saw gestation_weeks pass its threshold in one client's 128 clean requests. None is judged
# under this many.
SMALLEST_DIVERGENCE_WINDOW = 256
CALIBRATION_DRAWS = 40  # windows drawn from the training rows at each size
RESOLVE_SHARE = 0.8  # an alert resolves once its distance is under this share of the threshold: no flapping
TRAINING_ROWS = 5000  # training rows read for the calibration


@dataclasses.dataclass(frozen=True)
class Judged:
    feature: str
    measure: str
    distance: Optional[float]  # the largest of the windows it was judged in (None: not judged)
    threshold: float
    n: int  # requests in that window
    needed: Optional[int]  # the floor; None: no window can judge it (too few training rows)
    alarm: bool


def _category_shares(feature: statistics_pb2.FeatureNameStatistics) -> List[float]:
    buckets = feature.string_stats.rank_histogram.buckets or feature.string_stats.top_values
    counts = [getattr(b, "sample_count", 0) or getattr(b, "frequency", 0) for b in buckets]
    total = sum(counts)
    return [count / total for count in counts] if total else []


def _mode_share(feature: statistics_pb2.FeatureNameStatistics) -> float:
    """The share of the feature's most common value, from its quantiles histogram (buckets of one value)."""
    for histogram in feature.num_stats.histograms:
        if histogram.type == statistics_pb2.Histogram.QUANTILES:
            total = sum(b.sample_count for b in histogram.buckets)
            single: Dict[float, float] = {}
            for bucket in histogram.buckets:
                if bucket.low_value == bucket.high_value:
                    single[bucket.low_value] = single.get(bucket.low_value, 0.0) + bucket.sample_count
            return max(single.values(), default=0.0) / total if total else 0.0
    return 0.0


def _training_features(training: statistics_pb2.DatasetFeatureStatisticsList) -> Dict[str, Any]:
    return {f.path.step[0] if f.path.step else f.name: f for f in training.datasets[0].features}


def floors(
    schema: schema_pb2.Schema,
    training: Optional[statistics_pb2.DatasetFeatureStatisticsList],
    kind: str,
    false_alarm_rate: float,
) -> Dict[str, Optional[int]]:
    """feature -> the smallest window judged for `kind` ('skew' against `training`, 'drift' window against window);
    None where no window would do."""
    z = stdlib_statistics.NormalDist().inv_cdf(1 - false_alarm_rate / 2)
    chi2 = scipy_stats.chi2.ppf(1 - false_alarm_rate, JSD_BUCKETS - 1)
    found = _training_features(training) if training is not None else {}
    result: Dict[str, Optional[int]] = {}
    for name, (measure, threshold) in comparator_thresholds(schema, kind).items():
        if name not in features.FEATURE_NAMES:
            continue  # the label: requests have none
        feature = found.get(name)
        rows = (
            feature.string_stats.common_stats.num_non_missing or feature.num_stats.common_stats.num_non_missing
            if feature is not None
            else 0
        )
        if measure == "infinity_norm":
            shares = _category_shares(feature) if feature is not None else []
            spread = max((math.sqrt(p * (1 - p)) for p in shares), default=0.5)
            room = (threshold / (z * spread)) ** 2
        else:
            room = 8 * math.log(2) * threshold / chi2
            # TFDV's divergence is 1 (total) for a window holding one value only against varied training data,
            # which a window of n shows with chance mode_share^n: judged from where that is below the rate too
            share = _mode_share(feature) if feature is not None else 0.0
            if 0 < share < 1:
                room = min(room, -math.log(share) / -math.log(false_alarm_rate))
        if kind == "drift":
            room /= 2  # two windows of n
        elif rows:
            room -= 1 / rows
        smallest = SMALLEST_WINDOW if measure == "infinity_norm" else SMALLEST_DIVERGENCE_WINDOW
        result[name] = max(smallest, math.ceil(1 / room)) if room > 0 else None
    return result


def calibrated(
    schema: schema_pb2.Schema,
    training: statistics_pb2.DatasetFeatureStatisticsList,
    rows: Sequence[Dict[str, Any]],
    kind: str,
    false_alarm_rate: float,
    largest: int,
    seed: int = 0,
) -> Dict[str, Optional[int]]:
    """`floors`, raised to the smallest window size from which windows of the training `rows` keep their mean
    distance plus z standard deviations (z for false_alarm_rate) under each threshold: skew, windows of one half of
    the rows against the other half's statistics (half the reference rows the check has: more noise than it meets);
    drift, two draws against each other. A feature calm at no size tried is judged from twice the largest."""
    import random

    rng = random.Random(seed)
    formula = floors(schema, training, kind, false_alarm_rate)
    thresholds = comparator_thresholds(schema, kind)
    shuffled = list(rows)
    rng.shuffle(shuffled)
    half = len(shuffled) // 2
    reference = statistics_of(shuffled[:half], schema) if kind == "skew" and half else None
    pool = shuffled[half:] if kind == "skew" else shuffled
    sizes = window_sizes({name: SMALLEST_WINDOW for name in formula}, largest, every=True)
    sizes = [size for size in sizes if size * (2 if kind == "drift" else 1) <= len(pool)]
    z = stdlib_statistics.NormalDist().inv_cdf(1 - false_alarm_rate)
    calm: Dict[str, List[bool]] = {name: [] for name in formula}
    for size in sizes:
        found: Dict[str, List[float]] = {name: [] for name in formula}
        for _ in range(CALIBRATION_DRAWS):
            drawn = rng.sample(pool, size * (2 if kind == "drift" else 1))
            against = reference if kind == "skew" else statistics_of(drawn[size:], schema)
            for name, distance in distances(schema, statistics_of(drawn[:size], schema), against, kind).items():
                if name in found:
                    found[name].append(distance)
        for name, values in found.items():
            high = stdlib_statistics.fmean(values) + z * stdlib_statistics.pstdev(values) if values else 0.0
            # and the largest draw under RESOLVE_SHARE of it: the distances' tail is heavier than a normal one's
            calm[name].append(
                high <= thresholds[name][1] and max(values, default=0.0) <= RESOLVE_SHARE * thresholds[name][1]
            )
    result: Dict[str, Optional[int]] = {}
    for name, floor in formula.items():
        start = next((i for i in range(len(sizes)) if all(calm[name][i:])), len(sizes))
        found = sizes[start] if start < len(sizes) else (2 * sizes[-1] if sizes else floor)
        result[name] = None if floor is None else max(floor, found or 0)
    return result


def training_rows(examples_uri: str, split: str, limit: int = TRAINING_ROWS) -> List[Dict[str, Any]]:
    """Up to `limit` rows of an ExampleGen split as requests: the model's features, bytes as text."""
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(f"{examples_uri}/Split-{split}/*"))
    rows: List[Dict[str, Any]] = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").take(limit):
        example = tf.train.Example.FromString(record.numpy())
        row = {}
        for name in features.FEATURE_NAMES:
            feature = example.features.feature.get(name)
            kind = feature.WhichOneof("kind") if feature is not None else None
            values = list(getattr(feature, kind).value) if kind else []
            if values:
                row[name] = values[0].decode() if isinstance(values[0], bytes) else values[0]
        rows.append(row)
    return rows


def window_sizes(feature_floors: Dict[str, Optional[int]], largest: int, every: bool = False) -> List[int]:
    """The windows to look at: each floor rounded up to a power of two, and the largest (`every`: each power of
    two from the smallest floor)."""
    sizes = {min(largest, 2 ** math.ceil(math.log2(floor))) for floor in feature_floors.values() if floor}
    if every and sizes:
        sizes = {min(largest, 2**power) for power in range(int(math.log2(min(sizes))), int(math.log2(largest)) + 1)}
    return sorted(sizes | {largest})


def statistics_of(requests: Sequence[Dict[str, Any]], schema: schema_pb2.Schema):
    """TFDV statistics of requests, in memory, of the features the schema compares."""
    options = tfdv.StatsOptions(schema=schema, enable_semantic_domain_stats=False)
    return csv_presence(stats_impl.generate_statistics_in_memory(to_record_batch(requests, schema), options))


def distances(
    schema: schema_pb2.Schema,
    current: statistics_pb2.DatasetFeatureStatisticsList,
    reference: statistics_pb2.DatasetFeatureStatisticsList,
    kind: str,
) -> Dict[str, float]:
    """TFDV's distance per compared feature: skew of `current` (served) against `reference` (training), or drift of
    `current` from `reference` (the window before)."""
    if kind == "skew":
        anomalies = tfdv.validate_statistics(reference, schema, serving_statistics=current)
        field = "skew_measurements"
    else:
        anomalies = tfdv.validate_statistics(current, schema, previous_statistics=reference)
        field = "drift_measurements"
    return {
        ".".join(info.path.step): max(m.value for m in getattr(info, field))
        for info in anomalies.drift_skew_info
        if getattr(info, field)
    }


def judge(
    schema: schema_pb2.Schema,
    windows: Dict[int, Tuple[Sequence[Dict[str, Any]], Optional[Sequence[Dict[str, Any]]]]],
    training: Optional[statistics_pb2.DatasetFeatureStatisticsList],
    kind: str,
    feature_floors: Dict[str, Optional[int]],
) -> List[Judged]:
    """Each compared feature judged in every window at or above its floor: windows maps a size to (its requests,
    the window before it, for drift). A feature alarms if its distance passes the threshold in any of them."""
    thresholds = comparator_thresholds(schema, kind)
    # feature -> (distance, n) of the window where it came nearest to (or furthest past) its threshold
    measured: Dict[str, Tuple[Optional[float], int]] = {name: (None, 0) for name in feature_floors}
    for size in sorted(windows):
        requests, before = windows[size]
        judged = [name for name, floor in feature_floors.items() if floor is not None and size >= floor]
        if not judged:
            continue
        reference = training if kind == "skew" else statistics_of(before, schema)
        found = distances(schema, statistics_of(requests, schema), reference, kind)
        for name in judged:
            worst = measured[name][0]
            if name in found and (worst is None or found[name] >= worst):
                measured[name] = (found[name], size)
    return [
        Judged(
            name,
            thresholds[name][0],
            distance,
            thresholds[name][1],
            n,
            feature_floors[name],
            distance is not None and distance > thresholds[name][1],
        )
        for name, (distance, n) in sorted(measured.items())
    ]
