"""The results model, the recommendation, and the rendered report (escaping, self-containment, partial runs)."""

from __future__ import annotations

import json
import math
import re

import pytest

from reports.collect import pair_klds
from reports.model import SCHEMA_VERSION, Results
from reports.recommend import RULE, recommend
from reports.render import render_report
from tests.factories import results, results_with_search, variant


def test_ships_the_fastest_non_inferior_variant():
    rec = recommend(results())
    # Q4_0 is faster but worse; of the two non-inferior variants Q4_K_M-imat serves more tokens/s.
    assert rec.variant == "Q4_K_M-imat" and rec.closest is None
    assert rec.headline == (
        "Ship Q4_K_M-imat (Q4_K_M, 4-bit): non-inferior to F16 on MMLU (a change of -0.50 points, 95% interval "
        "-2.00 to +1.00, margin 1), and it serves 2.40x the output tokens/s of F16 at 2 users, at 32% of the size."
    )
    text = " ".join(rec.details)
    assert "Q4_K_M-imat: MMLU 39.50% against 40.00% for F16 on the same 200 questions" in text
    assert "6 questions right -> wrong, 5 wrong -> right" in text and "Q4_0: MMLU 36.00%" in text
    assert "KL divergence from F16 0.0200 +/- 0.0010" in text
    assert rec.rule == RULE and "non-inferior" in RULE


def test_says_4_bit_only_when_it_is():
    r = results()
    r.variants[1].speeds = results().variants[3].model_copy(deep=True).speeds  # Q8_0 as fast as Q4_K_M-imat ...
    for s in r.variants[1].speed.steps:
        s.output_tokens_per_s *= 2  # ... and then faster
    rec = recommend(r)
    assert rec.variant == "Q8_0" and rec.headline.startswith("Ship Q8_0 (Q8_0): non-inferior")
    assert "4-bit" not in rec.headline


def test_equal_speed_kld_decides_only_where_the_paired_comparison_shows_it():
    r = results()
    r.variants[1].speeds = r.variants[3].model_copy(deep=True).speeds  # Q8_0 exactly as fast as Q4_K_M-imat
    q8, q4 = r.variants[1].quality, r.variants[3].quality
    # Per-chunk KLD that varies a lot from chunk to chunk (each variant's own interval is wide, and the two overlap)
    # but Q8_0 is lower on every chunk: paired, it is shown lower, and wins although its file is larger.
    q8.kld_chunks, q4.kld_chunks = [0.001, 0.011, 0.021, 0.031], [0.002, 0.0125, 0.0225, 0.032]
    q8.kld_mean_sigma = q4.kld_mean_sigma = 0.01
    pair_klds(r.variants, alpha=r.alpha)
    assert q8.kld_paired["Q4_K_M-imat"].verdict == "lower" and q4.kld_paired["Q8_0"].verdict == "higher"
    assert recommend(r).variant == "Q8_0"
    # Lower on some chunks and higher on others: no difference shown, so the smaller file wins.
    q8.kld_chunks = [0.0, 0.0245, 0.0, 0.0445]
    pair_klds(r.variants, alpha=r.alpha)
    assert q8.kld_paired["Q4_K_M-imat"].verdict == "no different"
    assert recommend(r).variant == "Q4_K_M-imat"
    # Without per-chunk values (a KLD record of an older run) nothing is shown: tied, the smaller file wins.
    for v in r.variants:
        v.quality.kld_paired = {}
    assert recommend(r).variant == "Q4_K_M-imat"


def test_never_ships_a_variant_without_an_mmlu_verdict():
    r = results()
    fast = variant("Q5_K_M", "Q5_K_M", acc=40.0, kld=0.0001, tps=900, size=100)  # KLD, speed, no MMLU verdict
    r.variants.append(fast)
    assert recommend(r).variant == "Q4_K_M-imat"
    for v in r.variants:
        if not v.is_baseline:
            v.quality.verdict = None
    rec = recommend(r)
    assert rec.variant is None and "no variant has an MMLU verdict" in rec.headline


def test_inconclusive_says_how_many_questions_would_decide_and_names_the_closest():
    r = results()
    for v, needed in zip(r.variants[1:], (3000, None, 12400), strict=True):
        v.quality.verdict, v.quality.questions_needed = ("inconclusive", needed) if needed else ("worse", None)
    rec = recommend(r)
    assert rec.variant is None and rec.closest == "Q8_0"
    assert rec.headline == (
        "Nothing to ship yet: not enough questions to decide. Q8_0, Q4_K_M-imat are inconclusive at a 1-point "
        "margin on 200 questions; about 12,400 would decide. The closest to F16 by KL divergence is Q8_0."
    )
    assert "Worse than the baseline: Q4_0." in rec.details


def test_every_variant_worse_says_so_and_ties_on_kld_are_named():
    r = results()
    for v in r.variants[1:]:
        v.quality.verdict = "worse"
    # Paired on the held-out chunks, Q8_0 is not shown lower than Q4_K_M-imat (lower on two chunks, higher on two);
    # it is shown lower than Q4_0 (0.08 on every chunk).
    r.variants[1].quality.kld_chunks = [0.0, 0.04, 0.0, 0.04]
    r.variants[3].quality.kld_chunks = [0.02] * 4
    r.variants[2].quality.kld_chunks = [0.08] * 4
    pair_klds(r.variants, alpha=r.alpha)
    rec = recommend(r)
    assert rec.variant is None and rec.closest == "Q8_0"
    assert rec.headline == (
        "Nothing to ship: every variant loses MMLU accuracy against F16 (Q8_0, Q4_0, Q4_K_M-imat). The closest to "
        "F16 by KL divergence is Q8_0 (not shown closer than Q4_K_M-imat)."
    )


def test_alpha_and_margin_come_from_the_results():
    rec = recommend(results(alpha=0.1, margin_points=2.5))
    assert "90% interval" in rec.headline and "margin 2.5" in rec.headline


def test_says_when_the_choice_is_slower():
    r = results()
    for v, tps in ((r.variants[1], 40.0), (r.variants[3], 50.0)):  # both non-inferior variants slower than F16
        for s in v.speed.steps:
            s.output_tokens_per_s = tps
    assert "on this hardware it is slower: 0.31x the output tokens/s of F16 at 2 users" in recommend(r).headline


def test_nothing_to_compare_without_a_quantized_variant():
    r = results(variants=results().variants[:1])
    rec = recommend(r)
    assert rec.variant is None and rec.headline.startswith("Nothing to compare") and "4-bit" not in rec.headline


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
    # The verdicts, flips, KLD with its +/- and the rule are on the page.
    assert page.count('class="l verdict noninferior"') == 2 and 'class="l verdict worse"' in page
    assert 'data-variant-kld="Q4_0"' in page and "0.0800" in page and RULE[:60] in page
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
        v.speeds = {}
    page = render_report(r, tmp_path / "report.html").read_text()
    assert 'id="missing"' in page and "load: Q4_0 (stage interrupted)" in page
    assert 'id="chart-throughput"' not in page


def test_a_partial_load_and_a_restarted_server_are_shown_not_compared(tmp_path):
    from harness.loadtest.summary import Attempt
    from reports.recommend import speed_figure

    r = results()
    speed = r.variants[2].speed
    speed.complete, speed.error = False, "interrupted (Ctrl-C)"
    assert speed_figure(r.variants[2]) is None  # steps 1..4 of 8 cannot stand beside a whole run
    restarted = r.variants[1].speed
    restarted.attempts = [
        Attempt(number=1, run_id="r1", steps_digest="d", outcome="server died", started_at=1.7e9, steps=[1, 2],
                server_exit_code=-9, server_log_tail=["srv  update_slots: <last line>"], failed_requests=2),
        Attempt(number=2, run_id="r2", steps_digest="d", outcome="complete", started_at=1.7e9 + 60, steps=[4, 8]),
    ]  # fmt: skip
    r.recommendation = recommend(r)
    page = render_report(r, tmp_path / "report.html").read_text()
    assert page.count('class="bad partial-load"') == 1 and "interrupted (Ctrl-C)" in page
    assert page.count('class="attempts"') == 1 and "server died (killed by SIGKILL: out of memory?" in page
    assert "srv  update_slots: &lt;last line&gt;" in page


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


def test_a_results_json_of_an_older_schema_is_collected_again_from_the_runs_records(tmp_path, capsys):
    from harness.cli import main
    from harness.config import Experiment
    from harness.manifest import ManifestRecord

    run = tmp_path / "old"
    run.mkdir()
    (run / "experiment.toml").write_text(Experiment(name="old", run_dir=run).to_toml())
    (run / "manifest.json").write_text(ManifestRecord(name="old", created="2026-01-01T00:00:00Z").model_dump_json())
    old = results(name="old").model_dump(mode="json")
    old["schema_version"] = 4
    for step in old["variants"][0]["speeds"]["llama-server"]["steps"]:  # schema 4's StepResult copy
        step["output_tps"] = step.pop("output_tokens_per_s")
        del step["step"], step["unmeasured"]
    (run / "results.json").write_text(json.dumps(old))
    assert main(["report", str(run)]) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["schema_version"] == SCHEMA_VERSION and again["name"] == "old"
    assert "written by another version: collecting it again" in capsys.readouterr().err
    assert (run / "report.html").is_file()


def test_targets_side_by_side_and_an_external_endpoint(tmp_path):
    from reports.model import EndpointResult, TargetResult

    r = results()
    r.targets.append(TargetResult(name="llama-cpp-python", kind="llama-cpp-python", api="openai", serializes=True))
    for v in r.variants:
        slow = v.speeds["llama-server"].model_copy(deep=True, update={"target": "llama-cpp-python", "serializes": True})
        v.speeds["llama-cpp-python"] = slow
    endpoint = r.variants[0].speeds["llama-server"].model_copy(update={"target": "vllm"})
    r.endpoints.append(EndpointResult(target="vllm", url="http://127.0.0.1:8000", model="m", speed=endpoint))
    r.recommendation = recommend(r)
    assert r.recommendation.variant == "Q4_K_M-imat"  # the first target is the one the rule compares
    page = render_report(r, tmp_path / "report.html").read_text()
    assert 'id="targets-table"' in page and page.count('data-target="llama-cpp-python"') == 4
    assert "This server handles one request at a time" in page
    assert "m on vllm (http://127.0.0.1:8000)" in page


def test_capacity_is_the_speed_figure_when_the_run_measured_it():
    from bench.records import Capacity as CapacityResult

    r = results()
    capacities = {"F16": 2, "Q8_0": 6, "Q4_0": 9, "Q4_K_M-imat": 6}
    for v in r.variants:
        v.speed.capacity = CapacityResult(low=capacities[v.name], high=capacities[v.name] + 1, stopped_by="resolution",
                                          bound=16)  # fmt: skip
    # Q8_0 and Q4_K_M-imat serve 6 users each (Q4_0, 9, is worse): equal capacity, KLD apart -> Q8_0, although
    # Q4_K_M-imat streams more tokens/s.
    rec = recommend(r)
    assert rec.variant == "Q8_0"
    assert "it serves 6 concurrent users within the latency objectives against 2 for F16" in rec.headline
    r.variants[1].quality.kld_chunks = [0.0, 0.04, 0.0, 0.04]  # against 0.02 per chunk: not shown lower
    r.variants[3].quality.kld_chunks = [0.02] * 4
    pair_klds(r.variants, alpha=r.alpha)  # tied on KLD: the smaller file wins
    assert recommend(r).variant == "Q4_K_M-imat"


def test_a_step_missed_for_failures_shows_the_verdicts_own_figure(tmp_path):
    """Percentiles leave failed requests out, the objectives do not: the page prints the verdict's own figure under
    it, so a TTFT p90 of 1.9 s beside a 2 s limit and "missed" is explained on the page, not only in a tooltip."""
    from bench.slo import FAILED, Objective, evaluate

    r = results()
    speed = r.variants[1].speed
    speed.objectives = ["TTFT p90 <= 2 s"]
    ok = speed.steps[0]
    ok.slo_passed, ok.slo_detail = True, evaluate({"ttft_s": [1.0] * 20}, [Objective("ttft_s", 2.0, 0.9)]).describe()
    bad = speed.steps[1]
    # 18 successful requests whose p90 is 1.9 s and 2 failed ones: the successful requests' percentile is under the
    # limit, the step's (over every measured request) falls on the failures.
    verdict = evaluate({"ttft_s": [1.0] * 17 + [1.9, FAILED, FAILED]}, [Objective("ttft_s", 2.0, 0.9)])
    bad.failures, bad.ttft_s.p90 = 2, 1.9
    bad.slo_passed, bad.slo_detail = verdict.passed, verdict.describe()
    assert bad.slo_passed is False
    page = render_report(r, tmp_path / "report.html").read_text()
    assert ('<div class="slo-detail muted">TTFT p90 &lt;= 2 s: failed requests (missed; 2 of 20 over the limit, 2 '
            "failed)</div>") in page  # fmt: skip
    assert '<div class="slo-detail muted">TTFT p90 &lt;= 2 s: 1 s (ok; 0 of 20 over the limit)</div>' in page
    assert "Latency percentiles are of the requests that succeeded" in page


def test_load_charts_draw_each_line_in_the_order_of_the_level():
    from reports.charts import latency_figure, throughput_figure, ttft_figure

    r = results_with_search()  # steps 1, 2, 4, 8, then the search's probe at 3
    for figure in (throughput_figure, ttft_figure, latency_figure):
        fig = figure(r)
        assert {t.type for t in fig.data} == {"scatter"}  # lines, not a box per step
        lines = [t for t in fig.data if "lines" in t.mode]
        assert len(lines) == 10 and all(list(t.x) == [1, 2, 3, 4, 8] for t in lines)  # 5 variants on 2 targets
        assert list(fig.layout.xaxis.tickvals) == [1, 2, 3, 4, 8]  # a tick at every measured level, the probe's too
        assert list(fig.layout.xaxis.ticktext) == ["1", "2", "3", "4", "8"]
    # Each point is its own step's: F16 on llama-server at 3 users serves 2x its 1-user rate, between 2 and 4 users.
    assert list(throughput_figure(r).data[0].y) == pytest.approx([100, 160, 200, 220, 240])
    ttft = ttft_figure(r).data[0]
    assert list(ttft.y) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.6]) and ttft.name == "F16 (llama-server) p50"
    assert list(ttft.error_y.array) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.8])  # up to p90
    e2e = latency_figure(r).data[0]
    assert list(e2e.y) == [2.0] * 5 and list(e2e.error_y.array) == [1.0] * 5  # p50, bar to p99
    assert e2e.text[0] == "p50 2 s, p90 2.5 s, p99 3 s"


def test_kld_size_chart_marks_the_frontier_and_the_recipe():
    from reports.charts import kld_size_figure

    r = results_with_search()
    r.variants.append(variant("Q5_0", "Q5_0", acc=40.0, delta=0.0, kld=0.01, size=1_200_000_000))
    fig = kld_size_figure(r)
    points = {t.name: t for t in fig.data if t.mode == "markers+text"}
    assert set(points) == {"Q8_0", "Q4_0", "Q4_K_M-imat", "Q4_K-mix (recipe)", "Q5_0"}  # F16 is the reference
    # Smaller and lower are better: Q4_K-mix beats Q4_K_M-imat on both, Q8_0 beats Q5_0.
    symbols = {name: t.marker.symbol for name, t in points.items()}
    assert symbols == {"Q8_0": "star", "Q4_0": "star", "Q4_K-mix (recipe)": "star-diamond", "Q4_K_M-imat": "circle",
                       "Q5_0": "circle"}  # fmt: skip
    mix = points["Q4_K-mix (recipe)"]
    assert mix.x == (640.0,) and mix.text == ("Q4_K-mix (recipe)",) and mix.error_y.array == (0.001,)
    assert mix.cliponaxis is False  # its label may reach past the plot's edge
    line = next(t for t in fig.data if t.name == "frontier")
    assert list(line.x) == [600.0, 640.0, 1100.0] and list(line.y) == [0.08, 0.015, 0.0005]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.tickformat == "~g"
    # The y range (in decades) takes in every point and bar, with room above the top one (Q4_0) for its label.
    low, high = fig.layout.yaxis.range
    assert low < math.log10(0.0005) and high > math.log10(0.08 + 0.001) + 0.4


def test_the_frontier_is_one_rule_whichever_way_each_axis_is_better():
    from reports.charts import frontier_figure, kld_frontier_figure

    def stars(fig):
        return {t.name for t in fig.data if t.mode == "markers+text" and t.marker.symbol.startswith("star")}

    r = results()  # peak tokens/s: F16 160, Q8_0 240, Q4_K_M-imat 384, Q4_0 416
    assert stars(frontier_figure(r)) == {"Q8_0", "Q4_K_M-imat", "Q4_0"}  # F16 is slower than Q8_0 and no better
    assert stars(kld_frontier_figure(r)) == {"Q8_0", "Q4_K_M-imat", "Q4_0"}
    r.variants[3].quality.kld_mean = 0.1  # Q4_K_M-imat: now slower than Q4_0 and further from F16
    assert stars(kld_frontier_figure(r)) == {"Q8_0", "Q4_0"}


def test_a_searched_recipe_is_linked_and_drawn_against_size(tmp_path):
    page = render_report(results_with_search(), tmp_path / "report.html").read_text()
    assert page.count('class="recipe"') == 1 and '<a class="recipe" href="recipes/Q4_K-mix.txt"' in page
    assert 'id="chart-kld-size"' in page and 'id="wrap-kld_size"' in page


def test_the_recipe_is_compared_paired_with_every_stock_variant_and_its_search_is_shown(tmp_path):
    from reports.model import SearchSummary

    r = results_with_search()
    recipe = r.variant("Q4_K-mix")
    recipe.search = SearchSummary(
        budget_bytes=650_000_000, budget_from="the size of Q4_K_M-imat", granularity="block", types=["Q4_K", "Q6_K"],
        groups=15, measurements=30, chosen={"token_embd.weight": "Q6_K", "blk.0-14.ffn_down.weight": "Q4_K"},
        predicted_kld=0.0091, measured_kld=0.0088, file_bytes=640_000_000, gap=0.0, seconds=384.0,
    )  # fmt: skip
    # The recipe against each stock variant (never a stock variant against the recipe twice), each stock pair once.
    pairs = [(a, b) for a, b, _ in r.kld_pairs()]
    assert [p for p in pairs if "Q4_K-mix" in p] == [("Q4_K-mix", n) for n in ("Q8_0", "Q4_0", "Q4_K_M-imat")]
    assert ("Q8_0", "Q4_0") in pairs and ("Q4_0", "Q8_0") not in pairs and len(pairs) == 6
    # Chunks 0.9, 1.1, 0.95, 1.05 x the mean: 0.015 against Q4_K_M-imat's 0.02 is lower on every chunk.
    assert recipe.quality.kld_paired["Q4_K_M-imat"].verdict == "lower"
    page = render_report(r, tmp_path / "report.html").read_text()
    assert 'id="kld-paired-table"' in page and 'data-pair="Q4_K-mix|Q4_K_M-imat"' in page
    row = re.search(r'data-pair="Q4_K-mix\|Q4_K_M-imat">(.*?)</tr>', page, re.S).group(1)
    assert "-0.00500" in row and ">lower<" in row
    assert 'id="search-Q4_K-mix"' in page and "30 measurements of 15 tensor groups" in page
    assert "predicted by the sum 0.00910, measured 0.00880" in page and "(proven optimal)" in page
    assert "--tensor-type-file recipes/Q4_K-mix.txt" in page


def test_the_tuned_command_line_its_trials_guards_and_screen_are_shown(tmp_path):
    from harness.tune import Guard, ScreenRow, Trial, TuneResult
    from reports.charts import Point, frontier

    row = ScreenRow(setting="-t 2 -b 2048 -ub 512 -ctk q8_0 -ctv q8_0 -fa on", threads=2, batch=2048, ubatch=512,
                    flash_attn=True, cache_k="q8_0", cache_v="q8_0", pp_tps=480.0, tg_tps=150.0,
                    predicted_s=0.75)  # fmt: skip
    trials = [
        Trial(setting="(defaults)", server_args=[], threads=1, capacity_low=1, capacity_high=2, goodput_rps=0.4,
              output_tps=12.0, summary="load/llama-server/Q4_K_M-imat/summary.json", e2e_p90_s=20.0),
        Trial(setting="-t 2 -b 2048 -ub 512", server_args=["-b", "2048", "-ub", "512"], threads=2, capacity_low=3,
              capacity_high=4, goodput_rps=0.9, output_tps=30.0, summary="tune/Q4_K_M-imat/t_2/load/summary.json",
              e2e_p90_s=30.0),
        Trial(setting="-t 1 -b 2048 -ub 128", server_args=["-b", "2048", "-ub", "128"], threads=1, capacity_low=1,
              capacity_high=2, goodput_rps=0.3, output_tps=10.0, summary="tune/Q4_K_M-imat/t_1/load/summary.json",
              e2e_p90_s=25.0),
    ]  # fmt: skip
    rejected = Guard(setting=row.setting, kld=0.03, default_kld=0.02, difference=0.01, ci_high=0.012, chunks=16,
                     margin=0.005, accepted=False,
                     why="extra KLD +0.01000 (up to +0.01200) not shown within the margin")  # fmt: skip
    r = results()
    r.tuning = [TuneResult(variant="Q4_K_M-imat", target="llama-server", screen=[row], guards=[rejected], trials=trials,
                           chosen=trials[1].setting, command="llama-server -m m.gguf -np 4 -t 2 -b 2048 -ub 512",
                           stopped_by="survivors", seconds=300.0)]  # fmt: skip
    page = render_report(r, tmp_path / "report.html").read_text()
    assert 'id="tune-Q4_K_M-imat"' in page and "llama-server -m m.gguf -np 4 -t 2 -b 2048 -ub 512" in page
    assert '<tr class="chosen"><td class="l">-t 2 -b 2048 -ub 512</td><td>3</td>' in page
    assert "rejected: extra KLD +0.01000 (up to +0.01200) not shown within the margin" in page
    assert 'href="tune/Q4_K_M-imat/t_2/load/summary.json"' in page and "0.750" in page
    # The Pareto front of capacity against latency: the defaults (1 user at 20 s) and -t 2 (3 users at 30 s) are on
    # it; -t 1 -ub 128 (1 user at 25 s) is beaten by the defaults.
    assert 'id="chart-tune-front"' in page
    points = [Point(tr.setting, tr.e2e_p90_s, tr.capacity_low) for tr in trials]
    on = frontier(points, x_higher_is_better=False, y_higher_is_better=True)
    assert [p.label for p in on] == ["(defaults)", "-t 2 -b 2048 -ub 512"]


def test_energy_per_output_token_is_shown_where_the_counters_gave_it_and_why_not_elsewhere(tmp_path):
    r = results()
    measured = r.variants[1].speed
    measured.energy = "RAPL (package-0)"
    measured.steps[0].joules_per_output_token = 0.125
    r.variants[2].speed.energy = "not available (no RAPL powercap zones (/sys/class/powercap/intel-rapl:N))"
    page = render_report(r, tmp_path / "report.html").read_text()
    assert page.count("<th>J / output token</th>") == 1 and "<td>0.125</td>" in page
    assert "Energy: RAPL (package-0): joules per output token are the" in page
    assert "Energy: not available (no RAPL powercap zones" in page


def test_more_questions_are_suggested_only_where_this_test_can_use_them(tmp_path):
    from harness.config import Experiment
    from harness.rundir import RunDir
    from reports.collect import plan_more_questions
    from reports.model import Quality

    run = RunDir(tmp_path)
    pilot = Experiment(name="pilot", run_dir=tmp_path, mmlu={"per_subject": 2})
    small = Quality(verdict="inconclusive", n_questions=114, questions_needed=3000, needed_rule="sequential")
    plan_more_questions(pilot, run, small)
    assert small.decide_command.endswith("--set mmlu.per_subject=53") and small.cannot_decide is None
    # A plan beyond the split (at the discordance's upper bound: a plan, not a verdict) runs all of it, and says so.
    beyond = Quality(verdict="inconclusive", n_questions=114, questions_needed=24_400, needed_rule="sequential")
    plan_more_questions(pilot, run, beyond)
    assert beyond.cannot_decide is None and beyond.questions_available == 14_042
    assert beyond.decide_command.startswith("the whole MMLU test split (14,042 questions): llamasys mmlu")
    r = results()
    r.variants[1].quality.verdict, r.variants[3].quality.verdict = "inconclusive", "worse"
    r.variants[1].quality = r.variants[1].quality.model_copy(update=beyond.model_dump(include={
        "questions_needed", "needed_rule", "decide_command", "questions_available"}))  # fmt: skip
    r.variants[2].quality.verdict = "worse"
    assert "about 24,400 would decide with the sequential test (more than the 14,042 MMLU holds: all of them " \
           "decide it less often)." in recommend(r).headline  # fmt: skip
    # A run that used the whole split (a sequential one that ran to its last question): never "run it again".
    whole = Quality(verdict="inconclusive", n_questions=14_042, questions_needed=9_000, needed_rule="sequential")
    plan_more_questions(Experiment(name="all", run_dir=tmp_path), run, whole)
    assert whole.decide_command is None and whole.cannot_decide.startswith(
        "the whole MMLU test split (14,042 questions) was used and left it undecided: more questions of this test"
    )
    at_margin = Quality(verdict="inconclusive", n_questions=114)
    plan_more_questions(pilot, run, at_margin, "the observed change equals -margin (-1.00 points)")
    assert at_margin.cannot_decide is None and at_margin.decide_command is None
    assert at_margin.no_plan == ("no number of questions can be promised to decide it: the observed change equals "
                                 "-margin (-1.00 points)")  # fmt: skip
    capped = Quality(verdict="inconclusive", n_questions=114, needed_rule="sequential")
    plan_more_questions(pilot, run, capped, "the sequential test would need more than 100,000 questions",
                        exceeds=100_000)  # fmt: skip
    assert capped.cannot_decide == ("the sequential test would need more than 100,000 questions, more than the whole "
                                    "MMLU test split (14,042 questions) holds: more questions of this test cannot "
                                    "be expected to decide it")  # fmt: skip
    r = results()
    for v in r.variants[1:]:
        v.quality.verdict, v.quality.cannot_decide = "inconclusive", whole.cannot_decide
    assert recommend(r).headline.startswith(
        "Nothing to ship: MMLU cannot decide. Q8_0, Q4_0, Q4_K_M-imat are inconclusive at a 1-point margin on 200 "
        "questions; Q8_0: the whole MMLU test split (14,042 questions) was used and left it undecided"
    )
    assert "would decide" not in recommend(r).headline


def test_a_sequential_verdict_is_shown_with_its_confidence_sequence_and_tango_only_beside_fixed_n(tmp_path):
    r = results()
    q = r.variants[3].quality  # Q4_K_M-imat, sequential: decided after 600 of 14,042
    q.questions_budget, q.n_questions, q.e_non_inferior, q.e_worse, q.e_threshold = 14042, 600, 45.0, 0.01, 40.0
    q.delta_cs_low, q.delta_cs_high, q.cs_confidence, q.fixed_n_verdict = -0.9, 0.2, 0.95, "non-inferior"
    r.variants[1].quality.verdict = "inconclusive"  # Q8_0: fixed-n, Tango's -1.50 to +1.50
    rec = recommend(r)
    assert "(a change of -0.50 points, 95% confidence sequence -0.90 to +0.20, margin 1)" in rec.headline
    assert "Q8_0: MMLU 40.00% against 40.00% for F16 on the same 200 questions, a change of +0.00 points (95% " \
           "interval -1.50 to +1.50;" in " ".join(rec.details)  # fmt: skip
    r.recommendation = rec
    page = render_report(r, tmp_path / "report.html").read_text()
    row = re.search(r'<tr data-variant-quality="Q4_K_M-imat">.*?</tr>', page, re.S).group(0)
    assert 'data-interval="confidence sequence">-0.90 to +0.20' in row and "-2.00 to +1.00" not in row
    assert 'data-interval="Tango">-1.50 to +1.50' in page
    seq = re.search(r'<li data-sequential="Q4_K_M-imat">.*?</li>', page, re.S).group(0)
    assert "decided after\n600 of 14,042 questions (13,442 saved)" in seq
    assert "Fixed-n on the same questions: non-inferior, Tango's\n95% interval -2.00 to +1.00" in seq


def test_each_step_says_whether_its_verdict_was_decided_or_estimated(tmp_path):
    """The demo's case: capacity 1 user resting on 2 requests at 1 user, which the anytime-valid test cannot decide
    (a pass needs at least 56 at two p90 objectives): the step, the capacity and the headline say "estimated"."""
    from bench.records import Capacity as CapacityResult
    from bench.records import RequestRecord, StepRecord
    from bench.slo import Objective
    from harness.loadtest.summary import summarize_step

    objectives = (Objective("ttft_s", 2.0, 0.9), Objective("tpot_s", 0.1, 0.9))
    record = StepRecord(step=0, users=1, epoch=1, run="r", started_at=0.0, ended_at=4.0, drained_at=4.0,
                        measured_requests=2, unmeasured_requests=0, slo_passed=True)  # fmt: skip
    requests = [RequestRecord(user_id="u", seq=i, api="native", route="/completion", sent_at=2.0 * i,
                              ended_at=2.0 * i + 1.5, prompt_tokens_asked=8, output_tokens_asked=4, ok=True,
                              run="r", epoch=1, measured=True, ttft_s=0.5, tpot_s=0.05, e2e_s=1.5)
                for i in range(2)]  # fmt: skip
    estimated = summarize_step(record, requests, objectives=objectives)
    assert estimated.slo_passed and estimated.slo_basis == "estimated" and estimated.requests_to_decide == 56
    decided = summarize_step(record.model_copy(update={"slo_decided": "missed", "early_stop": True}), requests,
                             objectives=objectives)  # fmt: skip
    assert decided.slo_passed is False and decided.slo_basis == "decided"
    assert json.loads(estimated.model_dump_json())["slo_basis"] == "estimated"  # in results.json, with the step

    r = results()
    for v in r.variants:
        steps = v.speed.steps
        steps[0] = estimated.model_copy(update={"output_tokens_per_s": steps[0].output_tokens_per_s})
        steps[1] = decided.model_copy(update={"users": 2, "step": 1})
        v.speed.objectives = [o.describe() for o in objectives]
        v.speed.capacity = CapacityResult(low=1, high=2, stopped_by="resolution", bound=8)
    rec = recommend(r)
    assert "it serves 1 concurrent user (estimated) within the latency objectives against 1 (estimated) for F16" \
        in rec.headline  # fmt: skip
    assert (
        "Q8_0's capacity: the pass at 1 user is estimated from 2 requests, not decided: a decided pass "
        "needs at least 56 requests within the limits (load.requests_per_user = 56 at 1 user)."
    ) in rec.details
    r.recommendation = rec
    page = render_report(r, tmp_path / "report.html").read_text()
    table = re.search(r'<table class="speed-table" data-variant="Q4_K_M-imat".*?</table>', page, re.S).group(0)
    assert '<td class="l slo good" data-basis="estimated">met (estimated)' in table
    assert '<td class="l slo bad" data-basis="decided">missed (decided)' in table
    assert "Estimated, not decided: the pass at 1 user is estimated from 2 requests" in page
    assert 'data-variant-capacity="Q4_K_M-imat"><td class="l">Q4_K_M-imat</td>\n' in page
    assert '<td>1 <span class="estimated">(estimated)</span></td>' in page
