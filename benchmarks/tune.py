"""Benchmark: what tuning llama-server's settings gains on the demo model, and how well llama-bench predicts it.

Runs `harness/experiments/tune.toml` (the demo's model and load on llama-server; the tune stage over 12 settings for
Q4_K_M-imat, 4 of the survivors measured under the load) in a fresh run directory and prints, from its results:
the tune stage's wall time, how many settings survived the screen, each trial's capacity interval [last pass, first
miss] within the objectives and its goodput against the defaults measured in the same run, the chosen command line,
the guard's verdicts, and the Spearman rank correlation between the screen's predicted request time and the trials'
measured E2E p50 at their first level (few trials: the correlation is reported with its p-value, not as a finding).

    .venv/bin/python benchmarks/tune.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy import stats  # noqa: E402

from benchmarks._common import REPO, add_experiment_arguments, add_output_arguments, report, run_experiment  # noqa: E402

EXPERIMENT = REPO / "harness" / "experiments" / "tune.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_arguments(parser, EXPERIMENT)
    add_output_arguments(parser)
    return report(parser.parse_args(argv), run)


def run(args: argparse.Namespace) -> dict:
    run_dir, wall = run_experiment(args, "tune-bench")
    figures: dict = {"run_wall_s": round(wall, 1), "run_dir": str(run_dir), "variants": {}}
    keep = tomllib.loads((run_dir / "experiment.toml").read_text())["tune"]["screen_keep"]
    for path in sorted((run_dir / "tune").glob("*.json")):
        tuned = json.loads(path.read_text())
        predicted = {row["setting"]: row["predicted_s"] for row in tuned["screen"]}
        trials = []
        for t in tuned["trials"]:
            summary = json.loads((run_dir / t["summary"]).read_text())
            first = summary["steps"][0] if summary["steps"] else {}
            trials.append({
                "setting": t["setting"], "capacity": [t["capacity_low"], t["capacity_high"]],
                "goodput_rps": t["goodput_rps"], "output_tps": t["output_tps"],
                "first_level": first.get("users"), "e2e_p50_s": (first.get("e2e_s") or {}).get("p50"),
                "predicted_s": predicted.get(t["setting"]),
            })  # fmt: skip
        # Trials whose first level is the same (the defaults' first miss) are comparable on E2E there.
        pairs = [(t["predicted_s"], t["e2e_p50_s"]) for t in trials
                 if t["predicted_s"] is not None and t["e2e_p50_s"] is not None]  # fmt: skip
        rho = stats.spearmanr(*zip(*pairs, strict=True)) if len(pairs) >= 3 else None
        figures["variants"][tuned["variant"]] = {
            "tune_wall_s": tuned["seconds"], "chosen": tuned["chosen"], "command": tuned["command"],
            "stopped_by": tuned["stopped_by"], "trials": trials, "screened": len(tuned["screen"]),
            "survived": sum(p <= keep * min(predicted.values()) for p in predicted.values()),
            "guards": [{"setting": g["setting"], "extra_kld": g["difference"], "upper": g["ci_high"],
                        "accepted": g["accepted"]} for g in tuned["guards"]],
            "screen_vs_load_spearman": None if rho is None else {"rho": rho.statistic, "p": rho.pvalue,
                                                                 "n": len(pairs)},
        }  # fmt: skip
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
