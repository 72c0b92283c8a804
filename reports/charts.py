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
        fig.add_scatter(x=[s.users for s in steps], y=[s.output_tps for s in steps], mode="lines+markers", name=label)
    fig.update_layout(title="Output tokens/s (all users) against concurrency", **_LAYOUT)
    fig.update_xaxes(title="concurrent users", type="log", dtick=0.30103)
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
            x=[s.users for s in steps],
            y=p50,
            mode="lines+markers",
            name=f"{label} p50",
            error_y={"type": "data", "symmetric": False, "array": upper, "arrayminus": [0] * len(steps)},
        )
    fig.update_layout(title="Time to first token against concurrency (p50, bar to p90)", **_LAYOUT)
    fig.update_xaxes(title="concurrent users", type="log", dtick=0.30103)
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
            label = f"{name} @{s.users}"
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


def frontier_chart(results: Results) -> str | None:
    """MMLU accuracy against peak output tokens/s; the variants no other variant beats on both are the frontier."""
    points = []
    for v in results.variants:
        if v.quality and v.quality.accuracy is not None and v.speed and v.speed.steps:
            points.append((v, max(s.output_tps for s in v.speed.steps), v.quality.accuracy))
    if not points:
        return None
    frontier = {
        v.name for v, x, y in points if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for _, x2, y2 in points)
    }
    fig = go.Figure()
    for v, x, y in points:
        q = v.quality
        err = {}
        if q and q.ci_low is not None and q.ci_high is not None:
            err = {"type": "data", "symmetric": False, "array": [q.ci_high - y], "arrayminus": [y - q.ci_low]}
        fig.add_scatter(
            x=[x],
            y=[y],
            mode="markers+text",
            text=[v.name],
            textposition="top center",
            name=v.name,
            error_y=err,
            marker={"size": 14 if v.name in frontier else 9, "symbol": "star" if v.name in frontier else "circle"},
        )
    line = sorted((x, y) for v, x, y in points if v.name in frontier)
    fig.add_scatter(
        x=[p[0] for p in line],
        y=[p[1] for p in line],
        mode="lines",
        name="frontier",
        line={"dash": "dot", "color": "grey"},
    )
    fig.update_layout(title="Quality against speed (stars: on the frontier; bars: 95% interval)", **_LAYOUT)
    fig.update_xaxes(title="peak output tokens/s")
    fig.update_yaxes(title="MMLU accuracy (%)")
    return _html(fig, "chart-frontier")


def all_charts(results: Results) -> dict[str, str]:
    charts = {
        "throughput": throughput_chart(results),
        "ttft": ttft_chart(results),
        "latency": latency_chart(results),
        "frontier": frontier_chart(results),
    }
    return {k: v for k, v in charts.items() if v}
