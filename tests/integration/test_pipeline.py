"""`llamasys run` / `demo` end to end on the real small model: results, report, bad input (interrupts and resume:
test_faults.py). The demo runs once per session (tests/conftest.py `demo_run`); each test here reads one aspect."""

from __future__ import annotations

import html
import shlex
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, error_line, llamasys

pytestmark = pytest.mark.integration

DEMO = REPO / "harness" / "experiments" / "demo.toml"


@pytest.fixture(scope="module")
def env(cache_dir: Path, current_build) -> dict[str, str]:
    return {"LLAMASYS_CACHE_DIR": str(cache_dir)}


def test_demo_measures_every_variant_on_both_targets(demo_run):
    run_dir, results = demo_run.root, demo_run.results
    assert f"open the report: {(run_dir / 'report.html').resolve()}" in demo_run.result.stdout
    names = [v["name"] for v in results["variants"]]
    assert names == ["F16", "Q4_K_M-imat", "recipe"]
    assert results["missing"] == []
    for v in results["variants"]:
        assert v["quality"]["accuracy"] is not None and v["quality"]["n_questions"] >= 100
        # llama-server measures every variant; llama-cpp-python (targets.variants) only Q4_K_M-imat. Every request's
        # counts verified (none failed).
        expected = ["llama-server", "llama-cpp-python"] if v["name"] == "Q4_K_M-imat" else ["llama-server"]
        assert list(v["speeds"]) == expected
        for speed in v["speeds"].values():
            configured = [s for s in speed["steps"] if not s["probe"]]
            assert [s["users"] for s in configured] == [1, 2]
            assert all(s["requests"] > 0 and s["failures"] == 0 for s in speed["steps"])
            # Judged against demo.toml's objectives: a capacity interval that agrees with every step and probe.
            low, high = speed["capacity"]["low"], speed["capacity"]["high"]
            assert all(s["slo_passed"] == (s["users"] <= low) for s in speed["steps"] if s["users"] in (low, high))
            assert all(s["slo_passed"] for s in speed["steps"] if s["users"] <= low)
            # Where the boundary lies depends on the machine (a slow one misses even at 1 user); the reason must match.
            expected_stop = "fails at 1 user" if low == 0 else "resolution"
            assert high is None or (high - low == 1 and speed["capacity"]["stopped_by"] == expected_stop)
            assert speed["objectives"] == ["TTFT p90 <= 1 s", "TPOT p90 <= 100 ms"]
            # Each step says whether the anytime-valid test decided its verdict or its estimate judged it.
            assert all(s["slo_basis"] in ("decided", "estimated") for s in speed["steps"])
    lcp = results["variants"][1]["speeds"]["llama-cpp-python"]
    assert lcp["serializes"] and lcp["api"] == "openai"
    page = demo_run.page
    for name in names:
        assert f'data-variant="{name}"' in page
    assert 'id="targets-table"' in page and 'data-target="llama-cpp-python"' in page
    assert 'id="capacity-table"' in page and 'id="chart-kld-frontier"' in page


def test_demo_quality_verdicts_and_the_rule(demo_run):
    results = demo_run.results
    for v in results["variants"]:
        if not v["is_baseline"]:
            q = v["quality"]
            assert q["verdict"] in ("non-inferior", "worse", "inconclusive") and q["kld_mean_sigma"] is not None
            assert q["delta_ci_low"] <= q["delta"] <= q["delta_ci_high"] and q["lost"] + q["gained"] >= 0
    # The rule on the demo's actual results: 114 questions cannot rule out a 1-point loss for either 4-bit
    # variant (their intervals are several points wide), so nothing ships; the report says how many questions
    # would decide, and names the recipe, whose held-out KL divergence is shown below Q4_K_M-imat's.
    verdicts = {v["name"]: v["quality"]["verdict"] for v in results["variants"] if not v["is_baseline"]}
    assert verdicts == {"Q4_K_M-imat": "inconclusive", "recipe": "inconclusive"}
    assert all(v["quality"]["questions_needed"] > 114 and v["quality"]["decide_command"]
               for v in results["variants"] if not v["is_baseline"])  # fmt: skip
    assert results["recommendation"]["variant"] is None and results["recommendation"]["closest"] == "recipe"
    assert results["recommendation"]["headline"].startswith("Nothing to ship yet: not enough questions to decide.")
    assert results["margin_points"] == 1.0 and results["alpha"] == 0.05
    assert results["baseline_provenance"].startswith("the demo's baseline is SmolLM2-135M-Instruct's Q4_1 GGUF")
    page = demo_run.page
    assert 'id="provenance"' in page and 'id="to-decide"' in page


def test_demo_recipe_is_searched_within_the_stock_size_and_judged_paired(demo_run):
    run_dir, results = demo_run.root, demo_run.results
    stock, recipe = results["variants"][1], results["variants"][2]
    assert recipe["recipe"] == "models/recipe.tensor-types.txt" and (run_dir / recipe["recipe"]).is_file()
    search = recipe["search"]
    assert search["budget_bytes"] == stock["size_bytes"] and recipe["size_bytes"] == search["file_bytes"]
    assert search["file_bytes"] <= search["budget_bytes"] and search["excluded"] == ["Q4_1", "Q5_1"]
    assert search["groups"] == 8 and search["gap"] == 0.0
    pair = recipe["quality"]["kld_paired"]["Q4_K_M-imat"]
    assert pair["chunks"] == 8 and pair["verdict"] == "lower" and pair["ci_high"] < 0
    page = demo_run.page
    assert 'id="kld-paired-table"' in page and 'id="search-recipe"' in page and 'id="chart-kld-size"' in page


def test_demo_tunes_one_setting_against_the_defaults(demo_run):
    # How to serve it: the smallest grid (flash attention off or on) screened, the best-predicted setting
    # quality-guarded and measured against this run's defaults.
    (tuned,) = demo_run.results["tuning"]
    assert tuned["variant"] == "Q4_K_M-imat" and len(tuned["screen"]) == 2 and tuned["stopped_by"] == "survivors"
    defaults, *measured = tuned["trials"]
    assert defaults["setting"] == "(defaults)" and len(measured) + len(tuned["guards"]) >= 1
    assert all(t["complete"] and t["capacity_low"] is not None for t in tuned["trials"])
    chosen = next(t for t in tuned["trials"] if t["setting"] == tuned["chosen"])
    # The command to serve it is the chosen trial's measured command line (its binary and model named).
    assert chosen["argv"] and shlex.split(tuned["command"])[0] == "llama-server"
    assert shlex.split(tuned["command"])[3:] == chosen["argv"][3:] and "models/Q4_K_M-imat.gguf" in tuned["command"]
    assert all("-fa " in g["setting"] for g in tuned["guards"])  # of this grid, only flash attention may change them
    assert 'id="tune-Q4_K_M-imat"' in demo_run.page and html.escape(tuned["command"]) in demo_run.page


def test_demo_records_the_build_and_where_its_time_went(demo_run):
    results, manifest, page = demo_run.results, demo_run.manifest, demo_run.page
    stages = ["build", "models", "mmlu", "kld", "load", "tune", "report"]
    assert {k: v["state"] for k, v in manifest["stages"].items()} == dict.fromkeys(stages, "done")
    assert manifest["llamacpp"]["build_number"] == 11312 and manifest["hardware"]["cores_logical"] >= 1
    # Which instruction sets the build uses and why, and the proof that it ran here in the demo's weight types.
    llamacpp = manifest["llamacpp"]
    assert llamacpp["isa"]["enabled"] and llamacpp["isa_summary"].startswith(("native", "explicit"))
    assert set(llamacpp["check"]["types"]) >= {"F16", "Q4_0", "Q4_K_M"}  # a check of more types covers them
    assert all(t["ok"] and t["prompt_tps"] > 0 for t in llamacpp["check"]["types"].values())
    assert results["isa_summary"] == llamacpp["isa_summary"]
    assert html.escape(llamacpp["isa_summary"]) in page and 'id="build-check"' in page
    # The demo prints where its time went, stage by stage (manifest.json's durations), and the report repeats it.
    out = demo_run.result.stdout
    table = out[out.index("where the time went:") :]
    for stage in stages[:-1]:
        seconds = manifest["stages"][stage]["duration_s"]
        assert f"  {stage:<8} {seconds:>9,.1f}" in table, table
    assert [t["stage"] for t in results["stage_times"]] == stages[:-1]  # the report's own row is not known yet
    assert 'id="stage-times"' in page and 'data-stage="load"' in page


def test_a_finished_demo_reruns_without_redoing_anything(demo_run, env):
    run_dir = demo_run.root
    before = {
        p: p.stat().st_mtime_ns for p in run_dir.rglob("*.json") if p.parent.name in ("mmlu", "kld", "load", "tune")
    }
    again = llamasys("demo", "--run-dir", str(run_dir), "--no-progress", env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "cached: nothing to compile or check" in again.stdout


def test_bad_input_to_run(env, tmp_path: Path):
    missing = llamasys("run", str(tmp_path / "nope.toml"), env=env)
    assert missing.returncode == 2 and "experiment file not found" in error_line(missing.stderr)

    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    bad = llamasys("run", str(broken), env=env)
    assert bad.returncode == 2 and "not valid TOML" in error_line(bad.stderr)

    typo = tmp_path / "typo.toml"
    typo.write_text('[[variants]]\nname = "F16"\ntype = "F16"\n[[variants]]\nname = "x"\ntype = "Q4_Q"\n')
    wrong = llamasys("run", str(typo), env=env)
    assert wrong.returncode == 2 and "variants[1].type: unknown quant type 'Q4_Q'" in error_line(wrong.stderr)

    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    (run_dir / "experiment.toml").write_text('name = "demo"\n[model]\nsource = "hf"\nrepo = "someone/else"\n')
    clash = llamasys("run", str(DEMO), "--run-dir", str(run_dir), env=env)
    assert clash.returncode == 2
    assert f"run directory {run_dir} holds a different experiment (model differs" in error_line(clash.stderr)
