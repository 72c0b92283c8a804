"""Plotly figures for the report. Each function takes the results model and returns an HTML fragment.

plotly.js itself is inlined once by the renderer, so the report opens from disk with no network.
"""

from __future__ import annotations

import plotly.graph_objects as go

from reports.model import Results, Speed

_LAYOUT = {"template": "plotly_white", "height": 380, "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}


def _html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _series(results: Results) -> list[tuple[str, Speed]]:
    """Every measured (variant, target) pair and external endpoint, labelled; the target is named only when there
    are several."""
    several = len(results.targets) > 1
    out = []
    for v in results.variants:
        for target, speed in v.speeds.items():
            if speed.steps:
                out.append((f"{v.name} ({target})" if several else v.name, speed))
    out += [(f"{e.model} ({e.target})", e.speed) for e in results.endpoints if e.speed.steps]
    return out


def throughput_chart(results: Results) -> str | None:
    series = _series(results)
    if not series:
        return None
    fig = go.Figure()
    for label, speed in series:
        steps = speed.steps
        fig.add_scatter(x=[s.level for s in steps], y=[s.output_tps for s in steps], mode="lines+markers", name=label)
        if any(s.goodput_tps is not None for s in steps):
            fig.add_scatter(x=[s.level for s in steps], y=[s.goodput_tps for s in steps], mode="lines+markers",
                            name=f"{label} goodput", line={"dash": "dot"})  # fmt: skip
    fig.update_layout(title=f"Output tokens/s and goodput against {_axis(series)[0]}", **_LAYOUT)
    fig.update_xaxes(title=_axis(series)[1], type="log", dtick=0.30103)
    fig.update_yaxes(title="output tokens/s", rangemode="tozero")
    return _html(fig, "chart-throughput")


def ttft_chart(results: Results) -> str | None:
    series = _series(results)
    if not series:
        return None
    fig = go.Figure()
    for label, speed in series:
        steps = [s for s in speed.steps if s.ttft_s]
        if not steps:
            continue
        p50 = [s.ttft_s.get("p50") for s in steps]
        p90 = [s.ttft_s.get("p90") for s in steps]
        upper = [(b or 0) - (a or 0) for a, b in zip(p50, p90, strict=True)]
        fig.add_scatter(
            x=[s.level for s in steps],
            y=p50,
            mode="lines+markers",
            name=f"{label} p50",
            error_y={"type": "data", "symmetric": False, "array": upper, "arrayminus": [0] * len(steps)},
        )
    fig.update_layout(title=f"Time to first token against {_axis(series)[0]} (p50, bar to p90)", **_LAYOUT)
    fig.update_xaxes(title=_axis(series)[1], type="log", dtick=0.30103)
    fig.update_yaxes(title="TTFT (s)", rangemode="tozero")
    return _html(fig, "chart-ttft")


def latency_chart(results: Results) -> str | None:
    """E2E latency percentiles per variant at each step: where the tail goes as load grows."""
    series = _series(results)
    if not series:
        return None
    fig = go.Figure()
    for name, speed in series:
        for s in speed.steps:
            if not s.e2e_s:
                continue
            label = f"{name} @{s.level:g}"
            fig.add_box(
                name=label,
                x=[label],
                q1=[s.e2e_s.get("p50")],
                median=[s.e2e_s.get("p50")],
                q3=[s.e2e_s.get("p90")],
                lowerfence=[s.e2e_s.get("min", s.e2e_s.get("p50"))],
                upperfence=[s.e2e_s.get("p99")],
                showlegend=False,
            )
    fig.update_layout(title="End-to-end latency per request: p50, p90 (box), p99 (whisker)", **_LAYOUT)
    fig.update_yaxes(title="E2E (s)", rangemode="tozero")
    return _html(fig, "chart-latency")


def _axis(series: list[tuple[str, Speed]]) -> tuple[str, str]:
    """What the load axis is: concurrency (closed-loop users) or the offered rate (open-loop arrivals)."""
    if any(speed.unit != "users" for _, speed in series):
        return "the offered rate", "offered rate (requests/s)"
    return "concurrency", "concurrent users"


def _speed_axis(results: Results) -> tuple[str, dict[str, float]]:
    """The speed each variant is placed at: its capacity within the objectives when every measured variant has one,
    else its peak output tokens/s (the first target's measurement, as the recommendation uses)."""
    speeds = {v.name: v.speed for v in results.variants if v.speed and v.speed.steps}
    if speeds and all(s.capacity is not None for s in speeds.values()):
        unit = next(iter(speeds.values())).capacity.unit  # type: ignore[union-attr]
        label = "concurrent users" if unit == "users" else "requests/s"
        return f"capacity: {label} within the objectives", {n: float(s.capacity.low) for n, s in speeds.items()}  # type: ignore[union-attr]
    return "peak output tokens/s", {n: max(st.output_tps for st in s.steps) for n, s in speeds.items()}


def _frontier_figure(points: list[tuple[str, float, float, dict]], *, higher_is_better: bool) -> go.Figure:
    """Points (name, speed, quality, error bars); a point is on the frontier when no other is at least as fast and
    at least as good (higher or lower quality, as said) and differs."""

    def better(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    frontier = {
        name for name, x, y, _ in points
        if not any(x2 >= x and better(y2, y) and (x2, y2) != (x, y) for _, x2, y2, _ in points)
    }  # fmt: skip
    fig = go.Figure()
    for name, x, y, err in points:
        on = name in frontier
        fig.add_scatter(
            x=[x], y=[y], mode="markers+text", text=[name], textposition="top center", name=name, error_y=err,
            marker={"size": 14 if on else 9, "symbol": "star" if on else "circle"},
        )  # fmt: skip
    line = sorted((x, y) for name, x, y, _ in points if name in frontier)
    fig.add_scatter(
        x=[p[0] for p in line], y=[p[1] for p in line], mode="lines", name="frontier",
        line={"dash": "dot", "color": "grey"},
    )  # fmt: skip
    return fig


def frontier_chart(results: Results) -> str | None:
    """The MMLU change against the baseline (paired interval as bars) against speed; stars are the frontier."""
    label, speed = _speed_axis(results)
    points = []
    for v in results.variants:
        q = v.quality
        if q is None or v.name not in speed:
            continue
        if v.is_baseline and q.accuracy is not None:
            points.append((v.name, speed[v.name], 0.0, {}))
        elif q.delta is not None and q.delta_ci_low is not None and q.delta_ci_high is not None:
            err = {"type": "data", "symmetric": False, "array": [q.delta_ci_high - q.delta],
                   "arrayminus": [q.delta - q.delta_ci_low]}  # fmt: skip
            points.append((v.name, speed[v.name], q.delta, err))
    if not points:
        return None
    fig = _frontier_figure(points, higher_is_better=True)
    fig.add_hline(y=-results.margin_points, line={"dash": "dash", "color": "#b3261e"}, annotation_text="-margin")
    fig.update_layout(title="MMLU change against speed (stars: the frontier; bars: paired interval)", **_LAYOUT)
    fig.update_xaxes(title=label)
    fig.update_yaxes(title=f"MMLU change against {results.baseline} (points)")
    return _html(fig, "chart-frontier")


def kld_frontier_chart(results: Results) -> str | None:
    """KL divergence from the baseline (log scale, +/- as bars) against speed; lower is better."""
    label, speed = _speed_axis(results)
    points = []
    for v in results.variants:
        q = v.quality
        if q is not None and q.kld_mean is not None and q.kld_mean > 0 and v.name in speed:
            err = {"type": "data", "array": [q.kld_mean_sigma or 0.0]}
            points.append((v.name, speed[v.name], q.kld_mean, err))
    if not points:
        return None
    fig = _frontier_figure(points, higher_is_better=False)
    fig.update_layout(title="KL divergence against speed (stars: the frontier)", **_LAYOUT)
    fig.update_xaxes(title=label)
    fig.update_yaxes(title=f"mean KLD from {results.baseline}", type="log")
    return _html(fig, "chart-kld-frontier")


def all_charts(results: Results) -> dict[str, str]:
    charts = {
        "throughput": throughput_chart(results),
        "ttft": ttft_chart(results),
        "latency": latency_chart(results),
        "frontier": frontier_chart(results),
        "kld_frontier": kld_frontier_chart(results),
    }
    return {k: v for k, v in charts.items() if v}
