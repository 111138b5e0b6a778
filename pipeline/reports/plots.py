"""The plots of the run report and the history page, drawn with matplotlib as SVG images inside the page.

Each plot is an `<img>` holding its SVG as a data URI: the page needs no network and no other file, one
plot's drawing ids cannot clash with another's, and text stays text (sharp at any zoom). Dense marks (the
predicted-against-actual grid) are drawn as a small bitmap inside the SVG, so a page stays a few hundred kB.
"""

import base64
import functools
import html
import io
import math
from typing import Callable, Dict, List, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from tensorflow_metadata.proto.v0 import statistics_pb2

STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "babyweight",
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 7,
    "legend.frameon": False,
}
NOW, BEFORE, ALERT, LIMIT = "#1f77b4", "#a0a0a0", "#c00000", "#c00000"


def _styled(draw: Callable[..., str]) -> Callable[..., str]:
    """Draws under the house style (rcParams are read both when marks are made and when the SVG is written)."""

    @functools.wraps(draw)
    def styled(*args, **kwargs) -> str:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return styled


def image(figure: Figure, title: str) -> str:
    """The figure as an `<img>` of its SVG; `title` (the plot's own title) is its alternative text."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img class='plot' alt='{html.escape(title, quote=True)}' src='data:image/svg+xml;base64,{data}'>"


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _axes(figure: Figure, *grid: int):
    return figure.subplots(*grid) if grid else figure.subplots()


def _numeric_shape(feature: statistics_pb2.FeatureNameStatistics):
    """Bucket edges and share of rows per unit of the value (so spans with other buckets overlay)."""
    histogram = next((h for h in feature.num_stats.histograms if h.type == statistics_pb2.Histogram.STANDARD), None)
    if histogram is None or not histogram.buckets:
        return None
    total = sum(b.sample_count for b in histogram.buckets) or 1
    lows = np.array([b.low_value for b in histogram.buckets])
    highs = np.array([b.high_value for b in histogram.buckets])
    widths = np.maximum(highs - lows, 1e-9 + (highs.max() - lows.min()) / 200)
    return lows, widths, np.array([b.sample_count for b in histogram.buckets]) / total / widths


def _shares(feature: statistics_pb2.FeatureNameStatistics) -> Dict[str, float]:
    values = feature.string_stats.top_values
    total = sum(v.frequency for v in values) or 1
    return {v.value: v.frequency / total for v in values}


@_styled
def distribution(
    title: str,
    current: statistics_pb2.FeatureNameStatistics,
    now: str,
    previous: Optional[statistics_pb2.FeatureNameStatistics],
    before: str,
    alert: bool,
    values: Optional[Dict[str, np.ndarray]] = None,
    unknown_codes: Sequence[float] = (),
) -> str:
    """One feature's distribution in the new span over the previous span's, titled `title` (in red if `alert`).

    With `values` (a sample of the column's raw values, NaN where none: "now" and "before" the spans) and its
    'unknown' codes, the known values are drawn on their own range and the codes as a separate 'unknown' bar:
    TFDV's histograms span every value, so a code such as 99 weeks would stretch them and look like a value."""
    if values and unknown_codes:
        return _distribution_with_unknown(title, values, now, before, alert, unknown_codes)
    figure = _figure(3.4, 2.3)
    axes = _axes(figure)
    if current.HasField("num_stats"):
        for stats, colour, fill in ((previous, BEFORE, True), (current, NOW, False)):
            shape = _numeric_shape(stats) if stats is not None else None
            if shape is None:
                continue
            lows, widths, density = shape
            axes.bar(
                lows,
                density,
                widths,
                align="edge",
                color=colour if fill else "none",
                edgecolor=colour,
                alpha=0.6 if fill else 1.0,
                linewidth=1.2,
            )
        axes.set_ylabel("share per unit")
        axes.set_xlabel(f"grey: {before}, blue outline: {now}" if previous is not None else now, fontsize=7)
    else:
        shares_now = _shares(current)
        shares_before = _shares(previous) if previous is not None else {}
        values_shown = sorted(set(shares_now) | set(shares_before), key=lambda v: -shares_now.get(v, 0))[:8]
        positions = np.arange(len(values_shown))
        if shares_before:
            axes.bar(positions - 0.2, [shares_before.get(v, 0) for v in values_shown], 0.4, color=BEFORE)
        axes.bar(
            positions + (0.2 if shares_before else 0),
            [shares_now.get(v, 0) for v in values_shown],
            0.4 if shares_before else 0.6,
            color=NOW,
        )
        axes.set_xticks(positions, [v[:10] for v in values_shown])
        axes.set_ylabel("share of rows")
        axes.set_xlabel(f"grey: {before}, blue: {now}" if shares_before else now, fontsize=7)
    axes.set_title(title, loc="left", color=ALERT if alert else "black")
    return image(figure, title)


def unknown_shares(values: Dict[str, np.ndarray], unknown_codes: Sequence[float]) -> Dict[str, float]:
    """Each span's share of its rows holding an 'unknown' code: the heights of the plot's 'unknown' bars."""
    return {key: float(np.isin(column, unknown_codes).mean()) for key, column in values.items() if len(column)}


def _distribution_with_unknown(
    title: str, values: Dict[str, np.ndarray], now: str, before: str, alert: bool, unknown_codes: Sequence[float]
) -> str:
    """Known values as a histogram (share of the known values per unit, on bins shared by both spans) beside one
    bar group for the 'unknown' codes (their share of all the span's rows)."""
    spans = [
        (key, label, colour, fill)
        for key, label, colour, fill in (("before", before, BEFORE, True), ("now", now, NOW, False))
        if values.get(key) is not None and len(values[key])
    ]
    known = {
        key: values[key][np.isfinite(values[key]) & ~np.isin(values[key], unknown_codes)] for key, _, _, _ in spans
    }
    pooled = np.concatenate([v for v in known.values()]) if known else np.array([])
    if pooled.size:
        low, high = float(pooled.min()), float(pooled.max())
        width = max(1.0, math.ceil((high - low + 1) / 30))  # whole units: the columns with codes are integers
        edges = np.arange(low, high + width + 1e-9, width) - 0.5
    else:
        edges = np.array([0.0, 1.0])
    figure = _figure(3.4, 2.3)
    axes, side = figure.subplots(1, 2, width_ratios=[4, 1], sharey=False)
    codes = " or ".join(f"{code:g}" for code in unknown_codes)
    shares = unknown_shares(values, unknown_codes)
    for index, (key, _, colour, fill) in enumerate(spans):
        counts, _ = np.histogram(known[key], edges)
        axes.bar(
            edges[:-1],
            counts / max(len(known[key]), 1) / np.diff(edges),  # as TFDV's histograms: a share of the known values
            np.diff(edges),
            align="edge",
            color=colour if fill else "none",
            edgecolor=colour,
            alpha=0.6 if fill else 1.0,
            linewidth=1.2,
        )
        side.bar(index, shares[key], 0.6, color=colour, alpha=0.6 if fill else 1.0)
    axes.set_ylabel("share per unit")
    axes.set_xlabel(f"grey: {before}, blue outline: {now}" if len(spans) > 1 else now, fontsize=7)
    side.set_xticks(range(len(spans)), [label.replace("span ", "") for _, label, _, _ in spans])
    side.set_title(f"unknown\n({codes})", fontsize=7)
    side.set_ylabel("share of rows", fontsize=7)
    figure.suptitle(title, x=0.02, ha="left", fontsize=STYLE["axes.titlesize"], color=ALERT if alert else "black")
    return image(figure, title)


@_styled
def predicted_vs_actual(grid: Dict, title: str) -> str:
    """Counts of (actual, predicted) pairs on the monitor's grid, with the diagonal of perfect predictions."""
    figure = _figure(4.2, 3.6)
    axes = _axes(figure)
    edges = np.linspace(grid["low"], grid["high"], grid["bins"] + 1)
    counts = np.zeros((grid["bins"], grid["bins"]))
    for actual, predicted, count in grid["cells"]:
        counts[actual, predicted] = count
    shown = np.ma.masked_equal(counts.T, 0)
    mesh = axes.pcolormesh(
        edges, edges, shown, cmap="viridis", rasterized=True, norm=colors.LogNorm(vmin=1, vmax=max(counts.max(), 2))
    )
    axes.plot(
        [grid["low"], grid["high"]], [grid["low"], grid["high"]], color=ALERT, linewidth=1, label="predicted = actual"
    )
    axes.set(xlabel="actual weight (lb)", ylabel="predicted weight (lb)", aspect="equal")
    axes.set_title(title, loc="left")
    axes.legend(loc="upper left")
    figure.colorbar(mesh, ax=axes, label="rows per cell")
    return image(figure, title)


@_styled
def residuals_by_slice(residuals: Dict[str, Dict], title: str) -> str:
    """Per slice: the middle 90% of residuals as a line, the middle half as a box, the median and the mean."""
    named = [(name, stats) for name, stats in residuals.items() if stats.get("n") and "quantiles" in stats]
    figure = _figure(5.6, 0.3 * len(named) + 0.9)
    axes = _axes(figure)
    for row, (_, stats) in enumerate(named):
        q = stats["quantiles"]
        axes.plot([q["0.05"], q["0.95"]], [row, row], color=BEFORE, linewidth=1)
        axes.barh(row, q["0.75"] - q["0.25"], 0.5, left=q["0.25"], color=NOW, alpha=0.35)
        axes.plot([q["0.5"]] * 2, [row - 0.25, row + 0.25], color=NOW, linewidth=1.5)
        axes.plot(stats["mean_residual"], row, "o", color=ALERT, markersize=3.5)
    axes.axvline(0, color="black", linewidth=0.6)
    axes.set_yticks(range(len(named)), [f"{name} (n={stats['n']})" for name, stats in named])
    axes.invert_yaxis()
    axes.set_xlabel("label - prediction (lb)\nline: 5-95% of rows, box: 25-75%, bar: median, dot: mean")
    axes.set_title(title, loc="left")
    return image(figure, title)


@_styled
def metrics_by_slice(
    metrics: Dict[str, Dict[str, float]], names: Dict[str, str], thresholds: Dict[str, float], title: str
) -> str:
    """Bars of each metric (`names`: metric key -> label) per slice, the blessed baseline's value as a tick and the
    metric's threshold as a line (thresholds gate the whole split: 'overall')."""
    slice_names = list(metrics)
    figure = _figure(3.0 * len(names) + 1.6, 0.28 * len(slice_names) + 1.0)
    panels = _axes(figure, 1, len(names))
    panels = np.atleast_1d(panels)
    positions = np.arange(len(slice_names))
    for axes, (key, label) in zip(panels, names.items()):
        values = np.array([metrics[s].get(key, math.nan) for s in slice_names])
        axes.barh(positions, values, 0.6, color=[NOW if s != "overall" else "#0b3d66" for s in slice_names])
        diffs = np.array([metrics[s].get(f"{key}_diff", math.nan) for s in slice_names])
        if not np.isnan(diffs).all():
            axes.plot(values - diffs, positions, "|", color="black", markersize=9, label="blessed baseline")
        for position, value in zip(positions, values):
            axes.text(value, position, f" {value:.3f}", va="center", fontsize=6.5)
        if key in thresholds:
            axes.axvline(
                thresholds[key],
                color=LIMIT,
                linestyle="--",
                linewidth=1,
                label=f"threshold {thresholds[key]:g} (overall)",
            )
        axes.set_xlabel(f"{label} (lb)")
        axes.set_yticks(positions, slice_names if axes is panels[0] else [])
        axes.invert_yaxis()
        axes.legend(loc="lower left", bbox_to_anchor=(0, 1), ncols=2)
    figure.suptitle(title, x=0.02, ha="left", fontsize=8.5)
    return image(figure, title)


@_styled
def over_runs(
    labels: Sequence[str],
    series: Dict[str, Sequence[Optional[float]]],
    title: str,
    ylabel: str,
    limits: Optional[Sequence[Optional[float]]] = None,
    band: Optional[Sequence] = None,
    band_label: str = "",
    bars: bool = False,
) -> str:
    """Values per run (x: `labels`), as lines or bars; `limits`: a threshold per run, drawn as a dashed step;
    `band`: (low, high) per run, drawn as error bars on the first series and named `band_label`."""
    figure = _figure(max(4.0, 0.32 * len(labels) + 2.0), 2.3)
    axes = _axes(figure)
    x = np.arange(len(labels))

    def floats(values: Sequence[Optional[float]]) -> np.ndarray:
        return np.array([math.nan if v is None else v for v in values], dtype=float)

    for number, (name, values) in enumerate(series.items()):
        if bars:
            axes.bar(x, floats(values), 0.6, label=name, color=NOW)
        elif band is not None and number == 0:
            low, high = floats([b[0] for b in band]), floats([b[1] for b in band])
            middle = floats(values)
            spread = np.vstack([np.maximum(middle - low, 0), np.maximum(high - middle, 0)])
            axes.errorbar(
                x,
                middle,
                yerr=spread,
                fmt="o-",
                markersize=3,
                capsize=3,
                ecolor=BEFORE,
                label=f"{name} (bars: {band_label})",
            )
        else:
            axes.plot(x, floats(values), "o-", markersize=3, label=name)
    if limits is not None and any(v is not None for v in limits):
        axes.plot(
            x, floats(limits), "_--", color=LIMIT, linewidth=1, markersize=12, drawstyle="steps-mid", label="threshold"
        )
    axes.set_xticks(x, labels, rotation=60 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center")
    axes.set_xlim(-0.6, len(labels) - 0.4)
    axes.set_ylabel(ylabel)
    axes.set_title(title, loc="left")
    if len(series) > 1 or limits is not None or band is not None:
        axes.legend(loc="best")
    return image(figure, title)


@_styled
def drift_over_runs(
    labels: Sequence[str],
    distances: Dict[str, List[Optional[float]]],
    thresholds: Dict[str, List[Optional[float]]],
    title: str,
) -> str:
    """One small panel per feature: its drift distance to the previous validated span per run, and its threshold."""
    names = list(distances)
    columns = min(3, max(len(names), 1))
    rows = max(1, math.ceil(len(names) / columns))
    figure = _figure(3.0 * columns, 1.6 * rows + 0.4)
    panels = np.atleast_1d(_axes(figure, rows, columns)).ravel()
    x = np.arange(len(labels))
    for axes, name in zip(panels, names):
        values = np.array([math.nan if v is None else v for v in distances[name]], dtype=float)
        limits = np.array([math.nan if v is None else v for v in thresholds[name]], dtype=float)
        axes.plot(x, values, "o-", markersize=2.5, color=NOW)
        axes.plot(x, limits, "_--", color=LIMIT, linewidth=1, markersize=8, drawstyle="steps-mid")
        beyond = values > limits
        axes.plot(x[beyond], values[beyond], "o", color=ALERT, markersize=4)
        axes.set_title(name, loc="left", fontsize=7.5)
        axes.set_ylim(bottom=0)  # a distance: 0 is no change
        axes.set_xticks(x, labels, rotation=90 if len(labels) > 6 else 0, fontsize=6)
        axes.set_xlim(-0.6, len(labels) - 0.4)
    for axes in panels[len(names) :]:
        axes.set_visible(False)
    figure.suptitle(title, x=0.02, ha="left", fontsize=8.5)
    return image(figure, title)
