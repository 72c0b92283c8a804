"""Benchmark: how often each verdict rule is wrong at the boundary, and what it costs, by seeded simulation.

Three parts, each printed as a table (the README gives them):

1. Early stop of a load level (one latency objective, p90, or two at once): the rule the project had (a one-look 95 %
   order-statistic interval checked after every request) against the anytime-valid one (bench.sequential.MissRate,
   the error split across the objectives), for a level whose true p90 sits at the limit, 5 % above it or 5 % below.
   Each rule is wrong when it declares "within" a level that is not within, or "missed" one that is not missed;
   nominal: 2.5 % each.
2. Survivor bias: 32 closed-loop users x 3 requests, independent latencies, the true E2E p90 at the limit. Counting
   only the requests that finished inside the window (the rule the project had) against counting every request sent
   inside it (the rule now): how often the level passes (an unbiased rule passes about as often as the sample p90
   of 96 requests falls below the true one).
3. MMLU: a variant whose true change is -margin, -margin/2 or 0 (margin 1 point, 10 % of the questions answered
   differently), on the whole test split (14,042 questions, blocks of 200) and at the demo's size (114): the
   sequential verdict (bench.sequential.PairedMargin) against Tango's fixed-n verdict, with the questions used.
   Wrong: non-inferior at -margin (nominal 2.5 %), worse at -margin (2.5 %).

    .venv/bin/python benchmarks/verdicts.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/verdicts.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sequential import MissRate, PairedMargin  # noqa: E402
from mmlu.stats import PairedCounts, noninferiority_p, verdict, worse_p  # noqa: E402

SIGMA = 0.5  # lognormal latencies: the p90 is exp(1.2816 sigma) times the median
Q = 0.9


# ---------------------------------------------------------------- 1. early stop


def within_missed_thresholds_new(n_max: int, alpha_claim: float) -> tuple[np.ndarray, np.ndarray]:
    """For each n, the most misses that still show "within" and the fewest that show "missed" (monotone in misses)."""
    test = MissRate(p0=1 - Q, alpha=alpha_claim)
    within = np.full(n_max + 1, -1)
    missed = np.full(n_max + 1, n_max + 10)
    for n in range(1, n_max + 1):
        lo = -1
        while lo + 1 <= n and test.decide(n, lo + 1) == "within":
            lo += 1
        within[n] = lo
        # bisection for the fewest misses that show "missed"
        a, b = 0, n + 1
        while a < b:
            mid = (a + b) // 2
            if test.decide(n, mid) == "missed":
                b = mid
            else:
                a = mid + 1
        hi = a
        missed[n] = hi if hi <= n else n_max + 10
    return within, missed


def within_missed_thresholds_old(n_max: int, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The one-look order-statistic interval: within when x(u) <= limit (misses <= n - u), missed when x(l) > limit
    (misses > n - l), with l, u the binomial(n, q) ranks of the 95 % interval."""
    within = np.full(n_max + 1, -1)
    missed = np.full(n_max + 1, n_max + 10)
    tail = (1 - confidence) / 2
    for n in range(1, n_max + 1):
        lower = int(stats.binom.ppf(tail, n, Q))
        upper = int(stats.binom.ppf(1 - tail, n, Q)) + 1
        if upper <= n:
            within[n] = n - upper
        if lower >= 1:
            missed[n] = n - lower + 1
    return within, missed


def early_stop(rng, *, min_n: int, max_n: int, objectives: int, truth: float, reps: int, rule: str) -> dict:
    """`truth`: the true p90 over the limit (1.0 at the boundary, 1.05 above, 0.95 below)."""
    p_miss = float(stats.norm.sf(stats.norm.ppf(Q) - math.log(truth) / SIGMA))  # P(latency > limit)
    if rule == "new":
        within_t, missed_t = within_missed_thresholds_new(max_n, 0.025 / objectives)
    else:
        within_t, missed_t = within_missed_thresholds_old(max_n)
    misses = np.cumsum(rng.random((reps, objectives, max_n)) < p_miss, axis=2)  # per objective, after n requests
    n = np.arange(1, max_n + 1)
    ok = n >= min_n
    within_each = (misses <= within_t[1:]) & ok  # (reps, objectives, n)
    missed_each = (misses >= missed_t[1:]) & ok
    within_all = within_each.all(axis=1)
    missed_any = missed_each.any(axis=1)
    decided = within_all | missed_any
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), max_n - 1)
    rows = np.arange(reps)
    said_within = decided.any(axis=1) & within_all[rows, first]
    said_missed = decided.any(axis=1) & missed_any[rows, first] & ~said_within
    return {
        "within": float(said_within.mean()), "missed": float(said_missed.mean()),
        "requests": float((first + 1).mean()),
    }  # fmt: skip


def part_early_stop(rng, reps: int) -> list[dict]:
    configs = [("demo (min 4, max 16)", 4, 16, 1), ("min 20, max 200", 20, 200, 1),
               ("min 36, max 1000", 36, 1000, 1), ("two objectives, min 36, max 1000", 36, 1000, 2)]  # fmt: skip
    rows = []
    for label, lo, hi, k in configs:
        for truth, where in ((1.0, "at the limit"), (1.05, "5 % above"), (0.95, "5 % below")):
            for rule in ("old", "new"):
                r = early_stop(rng, min_n=lo, max_n=hi, objectives=k, truth=truth, reps=reps, rule=rule)
                wrong = {"at the limit": max(r["within"], r["missed"]), "5 % above": r["within"],
                         "5 % below": r["missed"]}[where]  # fmt: skip
                rows.append({"config": label, "true p90": where, "rule": rule, **r, "wrong": wrong})
    return rows


# ---------------------------------------------------------------- 2. survivor bias


def part_survivor(rng, reps: int, users: int = 32, per_user: int = 3) -> dict:
    limit = 1.0
    mu = -stats.norm.ppf(Q) * SIGMA  # p90 exactly at the limit
    passes = {"finished in the window": 0, "sent in the window": 0}
    for _ in range(reps):
        latencies = rng.lognormal(mu, SIGMA, size=(users, per_user + 6))
        ends = np.cumsum(latencies, axis=1)
        starts = ends - latencies
        window_end = ends[:, per_user - 1].max()  # every user has finished per_user requests
        finished = latencies[ends <= window_end]
        sent = latencies[starts < window_end]
        passes["finished in the window"] += np.percentile(finished, 90) <= limit
        passes["sent in the window"] += np.percentile(sent, 90) <= limit
    # Reference: how often the p90 of an unbiased sample of the same size falls at or below the true p90.
    n = users * per_user
    reference = float(np.mean([np.percentile(rng.lognormal(mu, SIGMA, n), 90) <= limit for _ in range(reps)]))
    return {"pass rate": {k: v / reps for k, v in passes.items()}, f"unbiased sample of {n}": reference}


# ---------------------------------------------------------------- 3. MMLU


def part_mmlu(rng, reps: int) -> list[dict]:
    margin, discordant, alpha = 0.01, 0.10, 0.05
    rows = []
    for budget, block in ((14042, 200), (114, 114)):
        for true_delta, label in ((-margin, "-margin"), (-margin / 2, "-margin/2"), (0.0, "0")):
            p_gain = (discordant + true_delta) / 2
            p_loss = (discordant - true_delta) / 2
            outcome = {"non-inferior": 0, "worse": 0, "inconclusive": 0}
            fixed = {"non-inferior": 0, "worse": 0, "inconclusive": 0}
            used = []
            for _ in range(reps):
                u = rng.random(budget)
                d = np.where(u < p_gain, 1, np.where(u < p_gain + p_loss, -1, 0))
                test = PairedMargin(margin=margin, alpha=alpha / 2)
                n = 0
                for start in range(0, budget, block):
                    test.add(d[start : start + block].astype(float))
                    n = min(start + block, budget)
                    if test.verdict() is not None:
                        break
                outcome[test.verdict() or "inconclusive"] += 1
                used.append(n)
                b, c = int((d == -1).sum()), int((d == 1).sum())
                counts = PairedCounts(both_correct=(budget - b - c) // 2, baseline_only=b, variant_only=c,
                                      both_wrong=budget - b - c - (budget - b - c) // 2)  # fmt: skip
                fixed[verdict(noninferiority_p(counts, margin), worse_p(counts, margin), alpha)] += 1
            rows.append({
                "questions": budget, "true change": label,
                "sequential": {k: v / reps for k, v in outcome.items()}, "questions used": float(np.mean(used)),
                "fixed-n Tango": {k: v / reps for k, v in fixed.items()},
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (the tables are noisier)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    reps = 2000 if args.quick else 20000
    figures = {
        "early stop": part_early_stop(rng, reps),
        "survivor bias": part_survivor(rng, 500 if args.quick else 4000),
        "mmlu": part_mmlu(rng, 100 if args.quick else 1000),
        "seed": args.seed,
    }
    print("1. Early stop of a load level (wrong: nominal 2.5 %)")
    head = f"   {'configuration':36} {'true p90':13} {'rule':4} {'within':>7} {'missed':>7} {'wrong':>7}"
    print(head + f" {'requests':>8}")
    for r in figures["early stop"]:
        print(f"   {r['config']:36} {r['true p90']:13} {r['rule']:4} {r['within']:7.2%} {r['missed']:7.2%} "
              f"{r['wrong']:7.2%} {r['requests']:8.1f}")  # fmt: skip
    sb = figures["survivor bias"]
    print("2. Survivor bias (32 users x 3 requests, true E2E p90 at the limit): pass rate")
    for k, v in sb["pass rate"].items():
        print(f"   {k:26} {v:6.1%}")
    print(f"   {'(an unbiased sample of 96)':26} {sb['unbiased sample of 96']:6.1%}")
    print("3. MMLU verdicts (margin 1 point, 10 % discordant; wrong at -margin: non-inferior, or worse, > 2.5 %)")
    for r in figures["mmlu"]:
        s, f = r["sequential"], r["fixed-n Tango"]
        print(
            f"   {r['questions']:6} questions, true change {r['true change']:9}: sequential NI "
            f"{s['non-inferior']:6.1%} worse {s['worse']:6.1%} inconcl. {s['inconclusive']:6.1%}, "
            f"{r['questions used']:8.0f} questions used; fixed-n NI {f['non-inferior']:6.1%} worse {f['worse']:6.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
