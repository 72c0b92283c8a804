"""The report in real headless Chromium: it renders, logs no console error, fetches nothing, draws its charts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from reports.recommend import recommend
from reports.render import render_report
from tests.browser import launch_chromium
from tests.factories import results, results_with_search

pytestmark = pytest.mark.browser

ARTIFACTS = Path(os.environ.get("LLAMASYS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
CHARTS = ["chart-throughput", "chart-ttft", "chart-latency", "chart-frontier", "chart-kld-frontier", "chart-kld-size"]
NUMBER = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")

# Each drawn chart as plotly laid it out: every axis's ticks (position, in decades on a log axis, and label), the
# tick labels in its SVG, and the x values of each trace drawn as a line.
READ_CHARTS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => ({
  id: gd.id,
  axes: Object.keys(gd._fullLayout).filter(k => /^[xy]axis\\d*$/.test(k)).map(k => ({
    name: k, type: gd._fullLayout[k].type,
    ticks: gd._fullLayout[k]._vals.filter(t => !t.minor).map(t => ({x: t.x, text: t.text})),
  })),
  drawn: [...gd.querySelectorAll('.xtick text, .ytick text')].map(e => e.textContent),
  lines: gd.data.filter(t => (t.mode || '').includes('lines')).map(t => ({name: t.name, x: Array.from(t.x)})),
}))"""


def open_in_chromium(report: Path, screenshot: Path) -> dict:
    """Load the report from file://, record console errors and every request, count drawn charts."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20_000)
            drawn = page.locator(".js-plotly-plot").count()
            charts = page.evaluate(READ_CHARTS)
            box = page.locator("#recommendation")
            recommendation = box.inner_text() if box.count() else ""
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "charts": drawn, "chart_data": charts,
            "recommendation": recommendation}  # fmt: skip


def assert_charts_read_right(charts: list[dict]) -> None:
    """Every tick label on a log axis is the number at its position (0.003, never a bare 3), the labels checked are
    the ones drawn, and every line runs left to right (a probe measured last sits between its neighbours)."""
    for chart in charts:
        labels = []
        for axis in chart["axes"]:
            for tick in axis["ticks"]:
                labels.append(tick["text"])
                if axis["type"] != "log":
                    continue
                text = tick["text"].replace("\u2212", "-")
                assert NUMBER.fullmatch(text), (chart["id"], axis["name"], tick)
                assert float(text) == pytest.approx(10 ** tick["x"], rel=1e-3), (chart["id"], axis["name"], tick)
        assert sorted(chart["drawn"]) == sorted(labels), chart["id"]
        for line in chart["lines"]:
            assert line["x"] == sorted(line["x"]), (chart["id"], line["name"], line["x"])


def test_report_renders_offline_without_errors(tmp_path: Path):
    r = results()
    r.recommendation = recommend(r)
    report = render_report(r, tmp_path / "report.html")
    seen = open_in_chromium(report, ARTIFACTS / "report.png")
    assert seen["errors"] == []
    assert all(url.startswith(("file://", "data:", "about:")) for url in seen["requests"]), seen["requests"]
    assert seen["charts"] == 6  # throughput, TTFT, latency, MMLU change and KLD against speed, KLD against size
    assert_charts_read_right(seen["chart_data"])
    assert "Ship Q4_K_M-imat" in seen["recommendation"]
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_charts_label_log_axes_in_full_and_draw_lines_in_level_order(tmp_path: Path):
    """A capacity search measures its probe (3 users) after 8, on two targets, beside a searched recipe variant."""
    r = results_with_search()
    report = render_report(r, tmp_path / "report.html")
    seen = open_in_chromium(report, ARTIFACTS / "report-search.png")
    assert seen["errors"] == []
    charts = {c["id"]: c for c in seen["chart_data"]}
    assert list(charts) == CHARTS and seen["charts"] == len(CHARTS)
    assert_charts_read_right(seen["chart_data"])
    for chart in ("chart-throughput", "chart-ttft", "chart-latency"):
        assert len(charts[chart]["lines"]) == 10  # 5 variants on 2 targets
        assert all(line["x"] == [1, 2, 3, 4, 8] for line in charts[chart]["lines"])
    kld = [axis for axis in charts["chart-kld-size"]["axes"] if axis["name"] == "yaxis"][0]
    assert kld["type"] == "log" and "0.01" in [t["text"] for t in kld["ticks"]]


def test_injected_script_does_not_run(tmp_path: Path):
    r = results(model="<img src=x onerror=\"console.error('pwned')\">")
    r.variants[1].name = "<script>console.error('pwned')</script>"
    report = render_report(r, tmp_path / "report.html")
    seen = open_in_chromium(report, tmp_path / "shot.png")
    assert not any("pwned" in e for e in seen["errors"])
    assert seen["errors"] == []
