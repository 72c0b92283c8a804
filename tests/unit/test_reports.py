"""The results model, the recommendation, and the rendered report (escaping, self-containment, partial runs)."""

from __future__ import annotations

import json
import re

from reports.model import Results
from reports.recommend import recommend
from reports.render import render_report
from tests.factories import results


def test_recommendation_prefers_the_4bit_variant_without_a_real_drop():
    rec = recommend(results())
    assert rec.variant == "Q4_K_M-imat"  # Q8_0 is closer but not 4-bit; Q4_0 drops significantly
    assert rec.headline == (
        "Ship Q4_K_M-imat: of the 4-bit variants, its quality stays closest to F16, and it serves 2.40-2.40x "
        "the output tokens/s at 32% of the size."
    )
    text = " ".join(rec.details)
    assert "39.50% against 40.00% for F16" in text and "2.40x at 2 users" in text and "Next closest: Q4_0" in text


def test_recommendation_says_when_every_4bit_variant_loses():
    r = results()
    r.variants[3].quality.p_value = 0.001
    r.variants[3].quality.significant = True
    r.variants[3].quality.delta = -3.0
    rec = recommend(r)
    assert rec.headline.startswith("No 4-bit variant matches F16")


def test_recommendation_says_when_the_choice_is_slower():
    r = results()
    for s in r.variants[3].speed.steps:
        s.output_tps = 50.0
    assert "on this hardware it is slower (0.31-0.50x the output tokens/s)" in recommend(r).headline


def test_recommendation_without_quality_results():
    r = results()
    for v in r.variants:
        v.quality = None
    assert recommend(r).variant is None


def test_results_round_trip_through_json():
    r = results()
    r.recommendation = recommend(r)
    again = Results.model_validate_json(r.model_dump_json())
    assert again == r


def test_report_renders_every_variant_and_step(tmp_path):
    r = results()
    r.recommendation = recommend(r)
    page = render_report(r, tmp_path / "report.html").read_text()
    for name in ("F16", "Q8_0", "Q4_0", "Q4_K_M-imat"):
        assert f'data-variant="{name}"' in page
    assert page.count("<tr>") > 10
    assert 'id="chart-throughput"' in page and 'id="chart-frontier"' in page and 'id="chart-ttft"' in page
    assert "Ship Q4_K_M-imat" in page
    # Self-contained: no script or stylesheet is fetched from anywhere.
    assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', page)


def test_hostile_names_cannot_inject_markup(tmp_path):
    evil = '<script>alert("x")</script>'
    r = results(name=f"run{evil}", model=evil, experiment_toml=f'name = "{evil}"')
    r.variants[1].name = f"Q8{evil}"
    r.variants[1].quality.subjects[0].subject = evil
    r.recommendation = recommend(r)
    page = render_report(r, tmp_path / "report.html").read_text()
    assert evil not in page
    assert "&lt;script&gt;alert" in page
    # The embedded JSON copy is escaped for a script context, and still parses back to the same names.
    blob = re.search(r'<script type="application/json" id="results-data">(.*?)</script>', page, re.S).group(1)
    assert "</script" not in blob
    assert json.loads(blob)["model"] == evil


def test_partial_report_says_what_is_missing(tmp_path):
    r = results(missing=["load: Q4_0 (stage interrupted)"])
    for v in r.variants:
        v.speed = None
    page = render_report(r, tmp_path / "report.html").read_text()
    assert 'id="missing"' in page and "load: Q4_0 (stage interrupted)" in page
    assert 'id="chart-throughput"' not in page


def test_llamasys_report_rerenders_and_compares_runs(tmp_path, capsys):
    from harness.cli import main

    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        r = results(name=f"run-{name}")
        r.recommendation = recommend(r)
        (run / "results.json").write_text(r.model_dump_json())
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    page = (tmp_path / "a" / "report.html").read_text()
    assert 'id="compare"' in page and "run-b" in page and "run-a" in page
    assert f"report: {(tmp_path / 'a' / 'report.html').resolve()}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 8
    assert "no results.json" in capsys.readouterr().err
