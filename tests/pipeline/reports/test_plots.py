"""The report's plots: SVG images that parse, carry their titles as text, stay small; the data behind them."""

import base64
import re
import warnings
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipeline.components import monitor
from pipeline.reports import plots

SVG = "{http://www.w3.org/2000/svg}"


def svg_of(tag: str) -> ElementTree.Element:
    """The SVG inside an <img> tag the plots write, parsed (raises if it isn't well-formed)."""
    data = re.search(r"src='data:image/svg\+xml;base64,([^']+)'", tag).group(1)
    return ElementTree.fromstring(base64.b64decode(data))


def texts(svg: ElementTree.Element) -> str:
    return " ".join("".join(element.itertext()) for element in svg.iter(f"{SVG}text"))


def numeric(values) -> statistics_pb2.FeatureNameStatistics:
    feature = statistics_pb2.FeatureNameStatistics()
    histogram = feature.num_stats.histograms.add(type=statistics_pb2.Histogram.STANDARD)
    counts, edges = np.histogram(values, bins=10)
    for count, low, high in zip(counts, edges, edges[1:]):
        histogram.buckets.add(low_value=low, high_value=high, sample_count=count)
    return feature


def categorical(shares) -> statistics_pb2.FeatureNameStatistics:
    feature = statistics_pb2.FeatureNameStatistics()
    for value, frequency in shares.items():
        feature.string_stats.top_values.add(value=value, frequency=frequency)
    return feature


@pytest.mark.parametrize(
    "make, previous",
    [
        (lambda seed: numeric(np.random.default_rng(seed).normal(30, 5, 500)), True),
        (lambda seed: numeric(np.random.default_rng(seed).normal(30, 5, 500)), False),
        (lambda seed: categorical({"true": 300 + seed, "false": 200}), True),
    ],
)
def test_a_distribution_plot_is_an_svg_titled_with_the_drift_and_its_threshold(make, previous):
    title = "mother_age: BLOCKING drift\nJensen-Shannon 0.210 > threshold 0.1"
    tag = plots.distribution(title, make(1), "span 3", make(2) if previous else None, "span 2", alert=True)
    assert tag.startswith("<img class='plot' alt='mother_age: BLOCKING drift")
    svg = svg_of(tag)
    shown = texts(svg)
    assert "mother_age: BLOCKING drift" in shown and "Jensen-Shannon 0.210 > threshold 0.1" in shown
    assert ("grey: span 2" in shown) == previous and "span 3" in shown
    assert len(tag) < 40_000


def test_unknown_codes_are_a_bar_of_their_own_not_values_of_the_histogram():
    """gestation_weeks with 99 ('unknown') in a fifth of the rows: the histogram spans the known weeks only, and the
    codes' share of each span's rows is a separate bar, named."""
    rng = np.random.default_rng(5)

    def weeks(unknown_share: float) -> np.ndarray:
        values = rng.normal(39, 2, 1000).round().clip(20, 45)
        values[: int(1000 * unknown_share)] = 99
        values[-10:] = np.nan  # no value: neither a week nor the code
        return values

    values = {"now": weeks(0.2), "before": weeks(0.05)}
    tag = plots.distribution(
        "gestation_weeks\nJensen-Shannon 0.050 <= threshold 0.15",
        numeric(values["now"][:-10]),
        "span 3",
        numeric(values["before"][:-10]),
        "span 2",
        alert=False,
        values=values,
        unknown_codes=(99,),
    )
    shown = texts(svg_of(tag))
    assert "unknown" in shown and "(99)" in shown, shown
    ticks = [float(t) for t in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])", shown.split("unknown")[0])]
    assert ticks and max(ticks) < 60, shown  # no axis stretched to 99 weeks
    # The heights of the "unknown" bars: each span's share of all its rows (no value counts as a row) holding the code.
    figure_shares = plots.unknown_shares(values, (99,))
    assert figure_shares == pytest.approx({"now": 0.2, "before": 0.05})


def test_predicted_against_actual_draws_the_monitors_grid_with_the_diagonal():
    rng = np.random.default_rng(3)
    actual = rng.normal(7.3, 1.2, 3000)
    predicted = actual + rng.normal(0, 0.8, 3000)
    labels = np.concatenate([actual, [np.nan] * 5])
    record = monitor.describe(
        np.concatenate([predicted, [7.0] * 5]), labels, {"plurality": np.array(["1"] * 2000 + ["2"] * 1005)}
    )
    grid = record["predicted_vs_actual"]
    counts, _, _ = np.histogram2d(
        actual,
        np.clip(predicted, grid["low"], grid["high"]),
        bins=grid["bins"],
        range=[[grid["low"], grid["high"]]] * 2,
    )
    assert sum(cell[2] for cell in grid["cells"]) == 3000  # the labelled rows, every one in a cell
    assert (grid["high"] - grid["low"]) / grid["bins"] == 0.25 and grid["low"] == np.floor(actual.min())
    assert all(counts[i, j] == n for i, j, n in grid["cells"])
    tag = plots.predicted_vs_actual(grid, "Predicted against actual weight, eval split of span 1")
    shown = texts(svg_of(tag))
    assert "Predicted against actual weight" in shown and "predicted = actual" in shown
    assert len(tag) < 120_000


def test_a_diverged_models_predictions_stay_in_the_labels_grid():
    labels = np.array([6.0, 7.5, 9.2])
    grid = monitor.describe(np.array([1e4, -50.0, 7.0]), labels, {})["predicted_vs_actual"]
    assert (grid["low"], grid["high"], grid["bins"]) == (6.0, 10.0, 16)
    assert sorted(grid["cells"]) == [[0, 15, 1], [6, 0, 1], [12, 4, 1]]


def test_residuals_by_slice_carry_their_spread_and_the_plot_names_each_slice():
    rng = np.random.default_rng(5)
    labels = rng.normal(7, 1, 1000)
    predictions = labels - rng.normal(0.1, 0.5, 1000)
    record = monitor.describe(predictions, labels, {"plurality": np.array(["1"] * 990 + ["2"] * 10)})
    twins = record["residuals"]["twins"]
    residuals = (labels - predictions)[990:]
    assert twins["n"] == 10 and twins["sd"] == pytest.approx(residuals.std())
    assert twins["quantiles"]["0.25"] == pytest.approx(np.quantile(residuals, 0.25))
    assert list(record["residuals"]) == ["overall", "singletons", "twins"]
    shown = texts(svg_of(plots.residuals_by_slice(record["residuals"], "Residuals (label - prediction) by slice")))
    assert "twins (n=10)" in shown and "singletons (n=990)" in shown


def test_metrics_by_slice_draws_each_threshold_and_the_baseline():
    metrics = {
        "overall": {"root_mean_squared_error": 0.9, "root_mean_squared_error_diff": -0.01, "mean_absolute_error": 0.7},
        "twins": {"root_mean_squared_error": 0.8, "root_mean_squared_error_diff": 0.02, "mean_absolute_error": 0.6},
    }
    tag = plots.metrics_by_slice(
        metrics,
        {"root_mean_squared_error": "RMSE", "mean_absolute_error": "MAE"},
        {"root_mean_squared_error": 1.2},
        "TFMA's metrics per slice",
    )
    shown = texts(svg_of(tag))
    assert "threshold 1.2 (overall)" in shown and "blessed baseline" in shown and "twins" in shown
    assert shown.count("threshold") == 1  # MAE was given none: no line, no legend


def test_plots_over_runs_take_runs_without_a_value_and_a_single_run():
    tag = plots.over_runs(
        ["1: span 1", "2: span 2", "3: span 3"],
        {"eval RMSE": [0.9, None, 0.88]},
        "Eval RMSE per run, with its threshold",
        "RMSE (lb)",
        limits=[1.2, None, 1.2],
    )
    assert "Eval RMSE per run" in texts(svg_of(tag)) and "2: span 2" in texts(svg_of(tag))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's deprecations (errors in numpy 2) included
        single = plots.over_runs(
            ["1: span 1"],
            {"mean prediction": [7.2]},
            "Predictions on the eval split",
            "lb",
            band=[(5.1, 8.1)],
            band_label="5-95%",
        )
    assert "mean prediction (bars: 5-95%)" in texts(svg_of(single))
    drift = plots.drift_over_runs(
        ["1", "2"],
        {"mother_age": [None, 0.2], "is_male": [None, 0.01]},
        {"mother_age": [None, 0.1], "is_male": [None, 0.1]},
        "Drift distance",
    )
    assert "mother_age" in texts(svg_of(drift)) and "is_male" in texts(svg_of(drift))
