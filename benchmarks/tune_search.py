"""Benchmark (seeded simulation): how often the tune search measures the best setting within its budget.

The tune stage measures at most `tune.survivors` settings under the load. When the screen's survivors are more,
`harness.tune.search` lets optuna's TPE sampler choose them (its first trial the screen's best). This simulation asks
whether that beats the two plain rules, on made-up capacity landscapes over the 36-setting grid of
`candidates([1, 2, 4], [512, 2048], [128, 512], [False, True], ["f16", "q8_0"])`:

- the landscape: capacity = a*log2(threads) + b*flash_attn + c*(ubatch == 512) + d*(cache q8_0) + e*(batch 2048),
  coefficients drawn from N(0, 1) per run, rounded to whole users;
- the screen's prediction: the true capacity plus N(0, noise) (noise 0: the screen ranks perfectly; large: it ranks
  no better than chance, as the tune benchmark found on the demo model, Spearman 0.0 with n = 4);
- the rules, each with the same budget: the screen's top `budget`; the screen's best then random others; `search`
  (the screen's best-predicted half of the budget, then optuna's TPE sampler for the rest).

It prints, per noise level, the share of runs whose measured settings include one of the best capacity (with a
95 % Wilson interval). Made-up landscapes, not measurements: it says which rule to prefer when the screen is or is
not informative, not by how much llama-server gains.

    .venv/bin/python benchmarks/tune_search.py [--runs 300] [--budget 4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from statsmodels.stats.proportion import proportion_confint  # noqa: E402

from harness.tune import Setting, candidates, search  # noqa: E402

GRID = candidates([1, 2, 4], [512, 2048], [128, 512], [False, True], ["f16", "q8_0"])


def landscape(rng: np.random.Generator) -> dict[Setting, float]:
    a, b, c, d, e = rng.normal(size=5)
    return {
        s: float(round(1 + 2 * abs(a) * math.log2(s.threads) + 2 * b * bool(s.flash_attn) + c * (s.ubatch == 512)
                       + d * (s.cache_k == "q8_0") + e * (s.batch == 2048)))
        for s in GRID
    }  # fmt: skip


def one_run(seed: int, noise: float, budget: int) -> dict[str, bool]:
    rng = np.random.default_rng(seed)
    truth = landscape(rng)
    best = max(truth.values())
    predicted = {s: v + rng.normal(0, noise) for s, v in truth.items()}
    ranked = sorted(GRID, key=lambda s: (-predicted[s], s))
    others = [ranked[i] for i in rng.permutation(len(ranked) - 1)[: budget - 1] + 1]
    chosen = search(ranked, budget, lambda s: truth[s], stop=lambda: False, seed=seed)
    return {
        "screen top": max(truth[s] for s in ranked[:budget]) == best,
        "screen best + random": max(truth[s] for s in [ranked[0], *others]) == best,
        "search (optuna TPE)": max(truth[s] for s in chosen) == best,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    figures: dict = {"runs": args.runs, "budget": args.budget, "settings": len(GRID), "noise": {}}
    for noise in (0.0, 1.0, 3.0, 100.0):
        hits: dict[str, int] = {}
        for seed in range(args.runs):
            for rule, hit in one_run(seed, noise, args.budget).items():
                hits[rule] = hits.get(rule, 0) + hit
        figures["noise"][f"{noise:g}"] = {
            rule: {"found_best": round(n / args.runs, 3),
                   "ci95": [round(x, 3) for x in proportion_confint(n, args.runs, method="wilson")]}
            for rule, n in hits.items()
        }  # fmt: skip
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
