"""Benchmark: does a searched per-tensor recipe beat the best stock 4-bit types at the same size, on held-out text?

Runs `harness/experiments/recipe.toml` (the demo's model: F16, Q4_K_M-imat, IQ4_XS-imat and a recipe searched
within Q4_K_M-imat's file size; MMLU and KLD, no load) and prints, from its results.json: the search's wall time
(as recorded when the sensitivities were measured, and this run's), the recipe's size against the budget, the
additive prediction of its calibration KLD against the measured one, and its held-out KLD against each stock
variant, paired on the same chunks, with the interval and verdict. Cached measurements make a second run fast:
pass --fresh to measure again.

    .venv/bin/python benchmarks/recipe_search.py [--fresh]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, add_experiment_arguments, add_output_arguments, report, run_experiment  # noqa: E402

EXPERIMENT = REPO / "harness" / "experiments" / "recipe.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_arguments(parser, EXPERIMENT)
    parser.add_argument("--fresh", action="store_true", help="forget remembered sensitivities and recipes first")
    add_output_arguments(parser)
    return report(parser.parse_args(argv), run)


def run(args: argparse.Namespace) -> dict:
    if args.fresh:
        for entry in (args.cache_dir / "models").glob("sensitivity-*.json"):
            entry.unlink()
        for entry in (args.cache_dir / "models").glob("recipe-*"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    run_dir, wall = run_experiment(args, "recipe-bench")
    results = json.loads((run_dir / "results.json").read_text())
    figures: dict = {"run_wall_s": round(wall, 1), "run_dir": str(run_dir), "variants": {}, "recipes": {}}
    for v in results["variants"]:
        q = v.get("quality") or {}
        figures["variants"][v["name"]] = {
            "size_bytes": v["size_bytes"], "bpw": round(v["bits_per_weight"], 3), "kld_mean": q.get("kld_mean"),
            "kld_chunks": len(q.get("kld_chunks") or []), "mmlu_accuracy": q.get("accuracy"),
            "mmlu_verdict": q.get("verdict"),
        }  # fmt: skip
        search = v.get("search")
        if not search:
            continue
        paired = {
            other: {"difference": p["difference"], "ci": [p["ci_low"], p["ci_high"]], "verdict": p["verdict"],
                    "chunks": p["chunks"]}
            for other, p in q.get("kld_paired", {}).items() if not results_variant(results, other).get("recipe")
        }  # fmt: skip
        figures["recipes"][v["name"]] = {
            "search_wall_s": search["seconds"], "measurements": search["measurements"], "groups": search["groups"],
            "budget_bytes": search["budget_bytes"], "budget_from": search["budget_from"],
            "file_bytes": search["file_bytes"], "calibration_kld_predicted": search["predicted_kld"],
            "calibration_kld_measured": search["measured_kld"], "optimality_gap": search["gap"],
            "held_out_paired": paired,
        }  # fmt: skip
    return figures


def results_variant(results: dict, name: str) -> dict:
    return next(v for v in results["variants"] if v["name"] == name)


if __name__ == "__main__":
    raise SystemExit(main())
