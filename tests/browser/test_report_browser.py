"""The report in real headless Chromium: it renders, logs no console error, fetches nothing, draws its charts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reports.recommend import recommend
from reports.render import render_report
from tests.browser import launch_chromium
from tests.factories import results

pytestmark = pytest.mark.browser

ARTIFACTS = Path(os.environ.get("LLAMASYS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


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
            box = page.locator("#recommendation")
            recommendation = box.inner_text() if box.count() else ""
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "charts": drawn, "recommendation": recommendation}


def test_report_renders_offline_without_errors(tmp_path: Path):
    r = results()
    r.recommendation = recommend(r)
    report = render_report(r, tmp_path / "report.html")
    seen = open_in_chromium(report, ARTIFACTS / "report.png")
    assert seen["errors"] == []
    assert all(url.startswith(("file://", "data:", "about:")) for url in seen["requests"]), seen["requests"]
    assert seen["charts"] == 5  # throughput, TTFT, latency, MMLU change and KLD against speed
    assert "Ship Q4_K_M-imat" in seen["recommendation"]
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_injected_script_does_not_run(tmp_path: Path):
    r = results(model="<img src=x onerror=\"console.error('pwned')\">")
    r.variants[1].name = "<script>console.error('pwned')</script>"
    report = render_report(r, tmp_path / "report.html")
    seen = open_in_chromium(report, tmp_path / "shot.png")
    assert not any("pwned" in e for e in seen["errors"])
    assert seen["errors"] == []
