"""The report in real headless Chromium: it renders, logs no console error, fetches nothing, draws its charts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from reports.recommend import recommend
from reports.render import render_report
from tests.browser import launch_chromium
from tests.factories import edge_case_run, results, results_with_search

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


def test_the_demos_own_report_renders_offline_without_errors(demo_run):
    # The report of the session's real demo run (tests/conftest.py), not a made-up one: the same checks.
    seen = open_in_chromium(demo_run.root / "report.html", ARTIFACTS / "report-demo.png")
    assert seen["errors"] == []
    assert all(url.startswith(("file://", "data:", "about:")) for url in seen["requests"]), seen["requests"]
    assert seen["charts"] >= 4
    assert_charts_read_right(seen["chart_data"])
    assert seen["recommendation"].startswith("Nothing to ship yet")


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


# At 1,300 px: the page never scrolls sideways; a table fits its box or scrolls inside it (its own overflow), never
# past the text column; each speed-table row stays a line or two (the objectives' detail is a list below it).
READ_LAYOUT = """() => {
  const column = document.body.getBoundingClientRect().right - parseFloat(getComputedStyle(document.body).paddingRight);
  return {
    page: [document.documentElement.scrollWidth, window.innerWidth],
    tables: [...document.querySelectorAll('table')].map(t => ({
      id: t.id || t.className, right: t.getBoundingClientRect().right, column: column,
      fits: t.scrollWidth <= t.clientWidth + 1, scrolls: ['auto', 'scroll'].includes(getComputedStyle(t).overflowX),
    })),
    rows: [...document.querySelectorAll('.speed-table tr[data-level]')].map(r => r.getBoundingClientRect().height),
    first: [...document.querySelectorAll('#recommendation, #missing, #facts, #quality')].map(e => [e.id || e.tagName,
      e.getBoundingClientRect().top + window.scrollY]),
    text: document.body.innerText,
    setup: document.querySelector('#isa').innerText,
  };
}"""


def test_the_report_of_every_edge_case_renders_fits_1300_px_and_puts_the_decision_first(tmp_path: Path):
    """MMLU variants that answer every question differently (after 2, 20 and 114), one exactly at the margin, one
    with no question; load steps passed by their estimate beside decided ones; wide speed tables on two targets; the
    AMX machine's instruction-set line. Collected from run records by the pipeline's collector, opened in Chromium."""
    from playwright.sync_api import sync_playwright

    r = edge_case_run(tmp_path)
    report = render_report(r, tmp_path / "report.html")
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report.as_uri(), wait_until="load")
            layout = page.evaluate(READ_LAYOUT)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report-edges-first-screen.png"))
            page.screenshot(path=str(ARTIFACTS / "report-edges.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    width, viewport = layout["page"]
    assert width <= viewport, "the page scrolls sideways"
    for table in layout["tables"]:
        assert table["right"] <= table["column"] + 1, table
        assert table["fits"] or table["scrolls"], table
    assert any(not t["fits"] for t in layout["tables"])  # the speed tables are wider than the page: they scroll
    assert max(layout["rows"]) < 70, "a speed-table row wraps into a tall cell"
    # The first screen: the decision with its figures, before the partial-run notice and everything else.
    tops = dict(layout["first"])
    assert tops["recommendation"] < 200 and tops["recommendation"] < tops["missing"] < tops["facts"] < tops["quality"]
    text = layout["text"]
    assert "Nothing to ship yet: not enough questions to decide." in text
    # The instruction sets are said once, in the set-up, with the reason they are off said once too.
    assert text.count("killed by SIGILL") == 1 and "amx_tile, amx_int8, amx_bf16 (llama-perplexity" in layout["setup"]
    # Every MMLU edge is on the page, as the collector judged it.
    for name in ("all-differ-2", "all-differ-20", "all-differ-114", "all-differ", "at-margin", "none-scored"):
        assert name in text
    assert "no number of questions can be promised to decide it: the observed change equals -margin" in text
    assert "--0.01" not in text and "NaN" not in text and "822,055,822" not in text
    # The undecided steps say so, and what would decide them.
    assert "met (estimated)" in text and "missed (decided)" in text
    assert "Estimated, not decided: the pass at 2 users is estimated from 4 requests" in text
    assert "a decided pass needs at least 56 requests within the limits (load.requests_per_user = 56 at 1 user)" in text
