"""Plotly figures for the report. Each figure function takes the results model and returns a figure (None when there
is nothing to draw); `all_charts` turns them into the HTML fragments the template places.

plotly.js itself is inlined once by the renderer, so the report opens from disk with no network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import plotly.graph_objects as go

from harness.loadtest.summary import Percentiles, StepSummary
from reports.model import Results, VariantResult

_LAYOUT = {"template": "plotly_white", "height": 380, "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}
# d3 format of a log axis's tick labels: the whole value (0.003, 0.02), where plotly's default names a tick between
# two decades by its bare mantissa ("3").
_LOG_TICKS = "~g"


class Line(NamedTuple):
    """One measured series, a (variant, target) pair or an external endpoint: its steps in the order of the level
    (a capacity search measures them out of order: 1, 2, 4, 8, then a probe at 3)."""

    label: str
    unit: str  # users, or requests/s
    steps: list[StepSummary]


def _series(results: Results) -> list[Line]:
    """Every measured (variant, target) pair and external endpoint, labelled; the target is named only when there
    are several."""
    several = len(results.targets) > 1
    speeds = [(f"{v.name} ({t})" if several else v.name, s) for v in results.variants for t, s in v.speeds.items()]
    speeds += [(f"{e.model} ({e.target})", e.speed) for e in results.endpoints]
    return [Line(label, s.unit, sorted(s.steps, key=lambda st: st.level)) for label, s in speeds if s.steps]


def _axis(lines: list[Line]) -> tuple[str, str]:
    """What the load axis is: concurrency (closed-loop users) or the offered rate (open-loop arrivals)."""
    if any(line.unit != "users" for line in lines):
        return "the offered rate", "offered rate (requests/s)"
    return "concurrency", "concurrent users"


def _load_axis(fig: go.Figure, lines: list[Line]) -> None:
    """The load level on a log x axis with a tick at every measured level (a probe at 3 users included), labelled
    with its value."""
    levels = sorted({s.level for line in lines for s in line.steps})
    fig.update_xaxes(title=_axis(lines)[1], type="log", tickvals=levels, ticktext=[f"{x:g}" for x in levels])


def throughput_figure(results: Results) -> go.Figure | None:
    lines = _series(results)
    if not lines:
        return None
    fig = go.Figure()
    for line in lines:
        x = [s.level for s in line.steps]
        fig.add_scatter(x=x, y=[s.output_tokens_per_s for s in line.steps], mode="lines+markers", name=line.label)
        if any(s.goodput_tps is not None for s in line.steps):
            fig.add_scatter(x=x, y=[s.goodput_tps for s in line.steps], mode="lines+markers",
                            name=f"{line.label} goodput", line={"dash": "dot"})  # fmt: skip
    fig.update_layout(title=f"Output tokens/s and goodput against {_axis(lines)[0]}", **_LAYOUT)
    _load_axis(fig, lines)
    fig.update_yaxes(title="output tokens/s", rangemode="tozero")
    return fig


def _percentile_figure(results: Results, metric: str, upper: str, what: str, y_title: str) -> go.Figure | None:
    """A latency's p50 (`metric`: a step's Percentiles, ttft_s or e2e_s) against the load, one line per series with
    a bar up to its `upper` percentile; the hover names every percentile."""
    lines = _series(results)
    fig = go.Figure()
    for line in lines:
        quantiles: list[tuple[float, Percentiles]] = [
            (s.level, getattr(s, metric)) for s in line.steps if getattr(s, metric) is not None
        ]
        if not quantiles:
            continue
        p50 = [q.p50 for _, q in quantiles]
        fig.add_scatter(
            x=[level for level, _ in quantiles], y=p50, mode="lines+markers", name=f"{line.label} p50",
            error_y={"type": "data", "symmetric": False, "arrayminus": [0] * len(p50),
                     "array": [max(getattr(q, upper) - m, 0.0) for (_, q), m in zip(quantiles, p50, strict=True)]},
            text=[f"p50 {q.p50:.3g} s, p90 {q.p90:.3g} s, p99 {q.p99:.3g} s" for _, q in quantiles],
        )  # fmt: skip
    if not fig.data:
        return None
    fig.update_layout(title=f"{what} against {_axis(lines)[0]} (p50, bar to {upper})", **_LAYOUT)
    _load_axis(fig, lines)
    fig.update_yaxes(title=y_title, rangemode="tozero")
    return fig


def ttft_figure(results: Results) -> go.Figure | None:
    return _percentile_figure(results, "ttft_s", "p90", "Time to first token", "TTFT (s)")


def latency_figure(results: Results) -> go.Figure | None:
    """E2E latency against the load, per series: where the median and the tail go as load grows."""
    return _percentile_figure(results, "e2e_s", "p99", "End-to-end latency", "E2E (s)")


def _speed_axis(results: Results) -> tuple[str, dict[str, float]]:
    """The speed each variant is placed at: its capacity within the objectives when every measured variant has one,
    else its peak output tokens/s (the first target's measurement, as the recommendation uses)."""
    speeds = {v.name: v.speed for v in results.variants if v.speed and v.speed.steps}
    if speeds and all(s.capacity is not None for s in speeds.values()):
        unit = next(iter(speeds.values())).capacity.unit  # type: ignore[union-attr]
        label = "concurrent users" if unit == "users" else "requests/s"
        return f"capacity: {label} within the objectives", {n: float(s.capacity.low) for n, s in speeds.items()}  # type: ignore[union-attr]
    return "peak output tokens/s", {n: max(st.output_tokens_per_s for st in s.steps) for n, s in speeds.items()}


class Point(NamedTuple):
    """A variant on a frontier chart, with its error bar on y (above and below)."""

    label: str  # the variant's name, "(recipe)" after a searched recipe's
    x: float
    y: float
    plus: float = 0.0
    minus: float = 0.0
    recipe: bool = False


def _point(v: VariantResult, x: float, y: float, plus: float = 0.0, minus: float | None = None) -> Point:
    label = f"{v.name} (recipe)" if v.recipe else v.name
    return Point(label, x, y, plus, plus if minus is None else minus, v.recipe is not None)


def frontier(points: list[Point], *, x_higher_is_better: bool, y_higher_is_better: bool) -> list[Point]:
    """The points no other point beats: none is at least as good on both axes and differs."""

    def as_good(a: float, b: float, higher_is_better: bool) -> bool:
        return a >= b if higher_is_better else a <= b

    return [
        p for p in points
        if not any(as_good(q.x, p.x, x_higher_is_better) and as_good(q.y, p.y, y_higher_is_better)
                   and (q.x, q.y) != (p.x, p.y) for q in points)
    ]  # fmt: skip


def _room(values: list[float], *, log: bool, below: float, above: float) -> dict:
    """Axis settings that take in `values` with room beyond them (fractions of their span) for the labels written
    beside the points. A log axis gets its range in decades, as plotly wants it: its autorange ignores `include`."""
    scaled = [math.log10(v) for v in values if v > 0] if log else values
    lo, hi = min(scaled), max(scaled)
    span = (hi - lo) or (1.0 if log else max(abs(hi), 1.0) * 0.2)
    ends = [lo - below * span, hi + above * span]
    return {"range": ends} if log else {"autorangeoptions": {"include": ends}}


def _frontier_figure(
    points: list[Point], *, x_higher_is_better: bool, y_higher_is_better: bool, y_log: bool = False
) -> go.Figure:
    """One marker per point, labelled, stars on the frontier (`frontier`), a diamond for a searched recipe, and the
    frontier as a dotted line."""
    on = frontier(points, x_higher_is_better=x_higher_is_better, y_higher_is_better=y_higher_is_better)
    fig = go.Figure()
    for p in points:
        symbol = ("star-diamond" if p.recipe else "star") if p in on else ("diamond" if p.recipe else "circle")
        fig.add_scatter(
            x=[p.x], y=[p.y], mode="markers+text", text=[p.label], textposition="top center", name=p.label,
            cliponaxis=False, marker={"size": 14 if p in on else 9, "symbol": symbol},
            error_y={"type": "data", "symmetric": False, "array": [p.plus], "arrayminus": [p.minus]}
            if p.plus or p.minus else None,
        )  # fmt: skip
    line = sorted((p.x, p.y) for p in on)
    fig.add_scatter(
        x=[x for x, _ in line], y=[y for _, y in line], mode="lines", name="frontier",
        line={"dash": "dot", "color": "grey"},
    )  # fmt: skip
    fig.update_xaxes(**_room([p.x for p in points], log=False, below=0.15, above=0.15))
    # The y axis takes in the error bars too (a log axis's autorange is replaced, not widened).
    bars = [v for p in points for v in (p.y - p.minus, p.y, p.y + p.plus)]
    fig.update_yaxes(**_room(bars, log=y_log, below=0.1, above=0.2))
    if y_log:
        fig.update_yaxes(type="log", tickformat=_LOG_TICKS)
    return fig


def frontier_figure(results: Results) -> go.Figure | None:
    """The MMLU change against the baseline (the interval beside its verdict as bars: a sequential run's confidence
    sequence, else Tango's) against speed; stars are the frontier."""
    label, speed = _speed_axis(results)
    points = []
    for v in results.variants:
        q = v.quality
        if q is None or v.name not in speed:
            continue
        if v.is_baseline and q.accuracy is not None:
            points.append(_point(v, speed[v.name], 0.0))
        elif q.delta is not None and (shown := q.interval) is not None:  # the interval beside its verdict
            points.append(_point(v, speed[v.name], q.delta, shown[1] - q.delta, q.delta - shown[0]))
    if not points:
        return None
    fig = _frontier_figure(points, x_higher_is_better=True, y_higher_is_better=True)
    fig.add_hline(y=-results.margin_points, line={"dash": "dash", "color": "#b3261e"}, annotation_text="-margin")
    fig.update_layout(title="MMLU change against speed (stars: the frontier; bars: paired interval)", **_LAYOUT)
    fig.update_xaxes(title=label)
    fig.update_yaxes(title=f"MMLU change against {results.baseline} (points)")
    return fig


def _kld_points(results: Results, x: Callable[[VariantResult], float | None]) -> list[Point]:
    """Every variant with a (positive) mean KLD and an x, its +/- as the bar."""
    points = []
    for v in results.variants:
        q, at = v.quality, x(v)
        if q is not None and q.kld_mean is not None and q.kld_mean > 0 and at is not None:
            points.append(_point(v, at, q.kld_mean, q.kld_mean_sigma or 0.0))
    return points


def kld_frontier_figure(results: Results) -> go.Figure | None:
    """KL divergence from the baseline (log scale, +/- as bars) against speed; lower is better."""
    label, speed = _speed_axis(results)
    points = _kld_points(results, lambda v: speed.get(v.name))
    if not points:
        return None
    fig = _frontier_figure(points, x_higher_is_better=True, y_higher_is_better=False, y_log=True)
    fig.update_layout(title="KL divergence against speed (stars: the frontier)", **_LAYOUT)
    fig.update_xaxes(title=label)
    fig.update_yaxes(title=f"mean KLD from {results.baseline}")
    return fig


def kld_size_figure(results: Results) -> go.Figure | None:
    """KL divergence from the baseline (log scale, +/- as bars) against file size; smaller and lower are better."""
    points = _kld_points(results, lambda v: v.size_bytes / 1e6 if v.size_bytes else None)
    if not points:
        return None
    fig = _frontier_figure(points, x_higher_is_better=False, y_higher_is_better=False, y_log=True)
    fig.update_layout(title="KL divergence against file size (stars: the frontier)", **_LAYOUT)
    fig.update_xaxes(title="file size (MB)")
    fig.update_yaxes(title=f"mean KLD from {results.baseline}")
    return fig


def tune_front_figure(results: Results) -> go.Figure | None:
    """Each tuned variant's trials (the defaults among them): capacity within the objectives against E2E p90 at that
    capacity; stars are the Pareto front (no trial serves more users at a lower latency)."""
    several = len(results.tuning) > 1
    points = [
        Point(f"{t.variant}: {tr.setting}" if several else tr.setting, tr.e2e_p90_s, float(tr.capacity_low))
        for t in results.tuning for tr in t.trials
        if tr.capacity_low is not None and tr.capacity_low > 0 and tr.e2e_p90_s is not None
    ]  # fmt: skip
    if len(points) < 2:
        return None
    fig = _frontier_figure(points, x_higher_is_better=False, y_higher_is_better=True)
    fig.update_layout(title="Server settings: capacity against latency (stars: the Pareto front)", **_LAYOUT)
    fig.update_xaxes(title="E2E p90 at its capacity (s)")
    fig.update_yaxes(title="capacity within the objectives")
    return fig


# The template's chart key -> the div id and the figure.
CHARTS: dict[str, tuple[str, Callable[[Results], go.Figure | None]]] = {
    "throughput": ("chart-throughput", throughput_figure),
    "ttft": ("chart-ttft", ttft_figure),
    "latency": ("chart-latency", latency_figure),
    "frontier": ("chart-frontier", frontier_figure),
    "kld_frontier": ("chart-kld-frontier", kld_frontier_figure),
    "kld_size": ("chart-kld-size", kld_size_figure),
    "tune_front": ("chart-tune-front", tune_front_figure),
}


def _html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def all_charts(results: Results) -> dict[str, str]:
    figures = {key: (div_id, figure(results)) for key, (div_id, figure) in CHARTS.items()}
    return {key: _html(fig, div_id) for key, (div_id, fig) in figures.items() if fig is not None}
