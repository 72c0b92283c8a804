"""Benchmark: how often each verdict rule is wrong at the boundary, and what it costs, by seeded simulation.

Seven parts, each printed as a table (docs/quality.md and docs/load.md give them, with the command that prints each):

1. early-stop: early stop of a load level, one request at a time (one latency objective, p90, or two at once): the
   rule the project had (a one-look 95 % order-statistic interval checked after every request) against the
   anytime-valid one (bench.sequential.MissRate, the error split across the objectives), for a level whose true
   p90 sits at the limit, 5 % above it or 5 % below. Wrong: "within" a level that is not, or "missed" one that is
   not; nominal 2.5 % each.
2. concurrency: the same test with 1-32 closed-loop users, requests in flight at every look: counted as misses
   (the rule the controller had) or censored in the order sent (the one it has); what a pass costs (p90 at half the
   limit) and how often each is wrong at the limit, for an E2E objective (a miss is known once a request has run
   past the limit) and a TTFT one (known only when it ends). Checked against bench.slo on a few runs.
3. survivor: 32 closed-loop users x 3 requests, independent latencies, the true E2E p90 at the limit: counting
   only the requests that finished inside the window against every request sent inside it.
4. mmlu: a variant whose true change is -margin, -margin/2 or 0 (margin 1 point, 10 % of the questions answered
   differently), on the whole test split (14,042 questions, blocks of 200) and at the demo's size (114): the
   sequential verdict (bench.sequential.PairedMargin) against Tango's fixed-n verdict, with the questions used.
5. coverage: the interval printed at a sequential stop: the confidence sequence of the same e-processes against
   Tango's fixed-n interval, at 3, 10 and 20 % discordance; how often each covers the true change.
6. exact: Tango's fixed-n verdicts at a true change of exactly -margin, by exact enumeration.
7. pilot: after a 114-question pilot, the questions the report asks for (mmlu.stats.questions_to_decide, planned
   for the fixed-n rule or the sequential one), run with the sequential test: how often they decide.

    .venv/bin/python benchmarks/verdicts.py                      # every part: about 7 minutes on 2 cores
    .venv/bin/python benchmarks/verdicts.py --part concurrency   # one part (each has its own seeded stream)
    .venv/bin/python benchmarks/verdicts.py --quick              # fewer repetitions
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sequential import MissRate, PairedMargin, paired_interval, paired_log_e  # noqa: E402
from mmlu.stats import (  # noqa: E402
    PLAN_CAP,
    PairedCounts,
    noninferiority_p,
    paired_delta_interval,
    questions_to_decide,
    score_statistic,
    verdict,
    worse_p,
)

SIGMA = 0.5  # lognormal latencies: the p90 is exp(1.2816 sigma) times the median
Q = 0.9


# ---------------------------------------------------------------- 1. early stop


@functools.cache
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


# ---------------------------------------------------------------- 2. early stop under concurrency


def _closed_loop(rng, reps: int, users: int, n_max: int, p90_over_limit: float, kind: str) -> dict[str, np.ndarray]:
    """`users` closed-loop users sending back to back, `reps` runs, the first n_max + users requests of each in the
    order they were sent (the limit is 1). Each request's objective metric is lognormal with its p90 at
    `p90_over_limit`; kind "e2e": the request lasts that long, so a miss is known once it has run past the limit;
    kind "ttft": the request lasts 4 times its TTFT, and its outcome is known only when it ends."""
    per_user = n_max // users + 3
    mu = math.log(p90_over_limit) - stats.norm.ppf(Q) * SIGMA
    metric = rng.lognormal(mu, SIGMA, size=(reps, users, per_user))
    duration = metric if kind == "e2e" else 4 * metric
    ends = np.cumsum(duration, axis=2)
    sent = ends - duration
    known = sent + np.minimum(duration, 1.0) if kind == "e2e" else ends
    order = np.argsort(sent.reshape(reps, -1), axis=1, kind="stable")[:, : n_max + users]

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a.reshape(reps, -1), order, axis=1)

    return {"sent": take(sent), "ends": take(ends), "known": take(known), "metric": take(metric),
            "looks": np.sort(ends.reshape(reps, -1), axis=1)}  # fmt: skip


def _decide(runs: dict[str, np.ndarray], rows: np.ndarray, t: np.ndarray, rule: str) -> tuple[np.ndarray, ...]:
    """At time t (per run), "within" and "missed" by the rule the controller had ("old": every request in flight a
    miss against "within", a hit against "missed", at the count sent) or the one it has ("new",
    MissRate.decide_outcomes: in the order sent, the known prefix and any point after it, the requests open there
    counted against the claim; a request past an E2E limit a known miss)."""
    within_t, missed_t = within_missed_thresholds_new(runs["sent"].shape[1], 0.025)
    t = t[:, None]
    sent = runs["sent"][rows] < t
    over = runs["metric"][rows] > 1.0
    n = sent.sum(axis=1)
    if rule == "old":
        finished = runs["ends"][rows] <= t
        misses = (finished & over).sum(axis=1)
        return misses + (sent & ~finished).sum(axis=1) <= within_t[n], misses >= missed_t[n]
    known = sent & (runs["known"][rows] <= t)
    miss, is_open = known & over, sent & ~known
    first_open = np.where(is_open.any(axis=1), is_open.argmax(axis=1), n)
    cols = np.arange(1, sent.shape[1] + 1)
    in_range = (cols >= np.maximum(first_open, 1)[:, None]) & (cols <= n[:, None])
    within = (in_range & (np.cumsum(miss | is_open, axis=1) <= within_t[cols])).any(axis=1)
    missed = (in_range & (np.cumsum(miss, axis=1) >= missed_t[cols])).any(axis=1)
    return within, missed


def _concurrent_stop(runs: dict[str, np.ndarray], *, min_n: int, n_max: int, rule: str) -> dict:
    """Look after every finished request (from min_n on) until n_max; the claim each run made, and when."""
    reps = runs["sent"].shape[0]
    claim = np.zeros(reps, dtype=np.int8)  # 0 undecided, 1 within, 2 missed
    used = np.full(reps, n_max)
    for look in range(min_n - 1, n_max):
        live = np.flatnonzero(claim == 0)
        if not live.size:
            break
        within, missed = _decide(runs, live, runs["looks"][live, look], rule)
        decided = within | missed
        claim[live[decided]] = np.where(within[decided], 1, 2)
        used[live[decided]] = look + 1
    return {"within": float((claim == 1).mean()), "missed": float((claim == 2).mean()),
            "requests": float(used.mean()), "requests_if_within": float(used[claim == 1].mean())
            if (claim == 1).any() else None}  # fmt: skip


def _check_against_the_controllers_rule(runs: dict[str, np.ndarray], reps: int = 4, looks: int = 90) -> None:
    """The vectorised rule is the project's: on a few E2E runs, at every look, the controller's own bench.slo
    (SentRequests in the order sent, evaluate at that time) gives the same verdict (an AssertionError otherwise)."""
    from bench.slo import Objective, SentRequests, evaluate

    e2e = [Objective("e2e_s", 1.0, Q)]
    for r in range(reps):
        for look in range(8, looks):
            t = runs["looks"][r, look]
            ledger = SentRequests()
            for i in np.flatnonzero(runs["sent"][r] < t):
                ledger.sent(i, at=runs["sent"][r, i])
                if runs["ends"][r, i] <= t:
                    ledger.finished(i, {"e2e_s": runs["metric"][r, i]}, at=runs["ends"][r, i])
            theirs = evaluate({}, e2e, sent=ledger, now=t).decided
            within, missed = _decide(runs, np.array([r]), np.array([t]), "new")
            assert theirs == ("within" if within[0] else "missed" if missed[0] else None), (r, look, theirs)


def part_concurrency(rng, reps: int) -> list[dict]:
    """Per user count: what a pass costs when every request is well within (p90 at half the limit: the fewest
    requests that decide), and how often each rule is wrong at the limit (min 8, max 300 requests)."""
    rows = []
    for kind, user_counts in (("e2e", (1, 2, 4, 8, 16, 32)), ("ttft", (8, 32))):
        for users in user_counts:
            for truth, where, n_max, n_reps in ((0.5, "p90 at half the limit", 1000, max(reps // 10, 50)),
                                                (1.0, "at the limit", 300, reps)):  # fmt: skip
                runs = _closed_loop(rng, n_reps, users, n_max, truth, kind)
                if kind == "e2e" and users == 8:
                    _check_against_the_controllers_rule(runs)
                for rule in ("old", "new"):
                    r = _concurrent_stop(runs, min_n=8, n_max=n_max, rule=rule)
                    rows.append({"objective": kind, "users": users, "truth": where, "rule": rule, "runs": n_reps, **r})
    return rows


# ---------------------------------------------------------------- 3. survivor bias


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


def _sequential_runs(rng, reps: int, psi: float, delta: float, *, margin: float, level: float, budget: int,
                     block: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`reps` sequential runs (PairedMargin at `level` per side, looked at after every block), vectorised: each
    run's counts (lost, tied, gained) where it stopped, and its verdict (0 none, 1 non-inferior, 2 worse)."""
    threshold = math.log(1 / level)
    probs = [(psi - delta) / 2, 1 - psi, (psi + delta) / 2]
    counts = np.zeros((reps, 3))
    verdict_ = np.zeros(reps, dtype=np.int8)
    for start in range(0, budget, block):
        live = verdict_ == 0
        if not live.any():
            break
        counts[live] += rng.multinomial(min(block, budget - start), probs, size=int(live.sum()))
        lost, tied, gained = counts[live].T
        ni = paired_log_e(lost, tied, gained, -margin, side="above") >= threshold
        worse = ~ni & (paired_log_e(lost, tied, gained, -margin, side="below") >= threshold)
        verdict_[np.flatnonzero(live)] = np.where(ni, 1, np.where(worse, 2, 0))
    return counts, verdict_


def _tango_statistic(n: np.ndarray, b: np.ndarray, c: np.ndarray, d0: float) -> np.ndarray:
    """mmlu.stats.score_statistic over arrays (checked equal to it below)."""
    big_a, big_b, big_c = 2 * n, -b - c + (2 * n - c + b) * d0, -b * d0 * (1 - d0)
    q = (np.sqrt(np.maximum(big_b * big_b - 4 * big_a * big_c, 0.0)) - big_b) / (2 * big_a)
    variance = n * (2 * q + d0 * (1 - d0))
    numerator = c - b - n * d0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = numerator / np.sqrt(variance)
        return np.where(variance > 0, t, np.where(numerator == 0, 0.0, np.sign(numerator) * np.inf))


def part_coverage(rng, reps: int) -> list[dict]:
    """The interval beside a sequential verdict: the confidence sequence of its own e-processes against Tango's
    fixed-n interval, both at the stop of runs on the whole split (blocks of 200), how often each covers the true
    change (nominal 95 %; among all runs and among those that stopped with a verdict), and the cost of stopping."""
    margin, level, budget, block = 0.01, 0.025, 14042, 200
    z = float(stats.norm.ppf(0.975))
    rows = []
    for psi in (0.03, 0.10, 0.20):
        for delta, label in ((0.0, "0"), (-margin / 2, "-margin/2"), (-margin, "-margin")):
            counts, said = _sequential_runs(rng, reps, psi, delta, margin=margin, level=level, budget=budget,
                                            block=block)  # fmt: skip
            lost, tied, gained = counts.T
            n = counts.sum(axis=1)
            cs = (paired_log_e(lost, tied, gained, delta, side="above") < math.log(1 / level)) & (
                paired_log_e(lost, tied, gained, delta, side="below") < math.log(1 / level))  # fmt: skip
            tango = np.abs(_tango_statistic(n, lost, gained, delta)) < z
            decided = said > 0
            widths = [(paired_interval(int(a), int(t), int(g), level), paired_delta_interval(
                PairedCounts(int(t), int(a), int(g), 0), 0.95)) for a, t, g in counts[:200]]  # fmt: skip
            rows.append({
                "discordance": psi, "true change": label, "cs covers": float(cs.mean()),
                "tango covers": float(tango.mean()),
                "cs covers, decided": float(cs[decided].mean()) if decided.any() else None,
                "tango covers, decided": float(tango[decided].mean()) if decided.any() else None,
                "decided": float(decided.mean()), "mean share used": float(n.mean() / budget),
                "median used": float(np.median(n)), "within 20 %": float((n <= 0.2 * budget).mean()),
                "cs width": float(np.mean([w[0][1] - w[0][0] for w in widths])),
                "tango width": float(np.mean([w[1][1] - w[1][0] for w in widths])),
            })  # fmt: skip
    # The vectorised runs are PairedMargin's: a few replayed block by block through the class give the same counts.
    check = np.random.default_rng(99)
    counts, said = _sequential_runs(check, 5, 0.1, 0.0, margin=margin, level=level, budget=budget, block=block)
    for (lost, tied, gained), verdict_ in zip(counts, said, strict=True):
        test = PairedMargin(margin=margin, alpha=level, lost=int(lost), tied=int(tied), gained=int(gained))
        assert {0: None, 1: "non-inferior", 2: "worse"}[int(verdict_)] == test.verdict() or gained + lost + tied \
            == budget  # fmt: skip
    return rows


def part_fixed_n_exact(margin: float = 0.01, alpha: float = 0.05) -> list[dict]:
    """Tango's fixed-n verdicts at a true change of exactly -margin, by exact enumeration (no simulation error):
    P(non-inferior) and P(worse), each nominally alpha / 2 = 2.5 %, over (b, c) ~ multinomial(n; (psi + M) / 2,
    (psi - M) / 2)."""
    z = float(stats.norm.ppf(1 - alpha / 2))
    for n, b, c in ((114, 6, 5), (1000, 60, 40), (14042, 700, 560), (20, 10, 10)):  # the vectorised statistic
        counts = PairedCounts(n - b - c, b, c, 0)
        assert abs(_tango_statistic(np.float64(n), np.float64(b), np.float64(c), -margin)
                   - score_statistic(counts, -margin)) < 1e-9  # fmt: skip
        said = verdict(noninferiority_p(counts, margin), worse_p(counts, margin), alpha)
        mine = _tango_statistic(np.float64(n), np.float64(b), np.float64(c), -margin)
        assert said == ("non-inferior" if mine > z else "worse" if mine < -z else "inconclusive")
    rows = []
    for n in (114, 1000, 5000, 14042):
        for psi in (0.02, 0.05, 0.10, 0.20):
            p_lost, p_gained = (psi + margin) / 2, (psi - margin) / 2
            low, high = (int(x) for x in stats.binom.ppf([1e-13, 1 - 1e-13], n, psi))
            ni = worse = 0.0
            for k in range(max(low, 0), min(high, n) + 1):
                c = np.arange(k + 1, dtype=float)
                t = _tango_statistic(np.float64(n), k - c, c, -margin)
                weights = stats.binom.pmf(k, n, psi) * stats.binom.pmf(c, k, p_gained / psi)
                ni += float(weights[t > z].sum())
                worse += float(weights[t < -z].sum())
            rows.append({"questions": n, "discordance": psi, "non-inferior": ni, "worse": worse,
                         "lost": p_lost, "gained": p_gained})  # fmt: skip
    return rows


def part_pilot(rng, reps: int) -> list[dict]:
    """After a 114-question pilot (10 % of the questions answered differently, no true change, or half the
    margin lost), the questions the report gives, run with the sequential test: how often they decide, against the
    80 % promised. The pilot's outcomes are enumerated exactly (with their probabilities); each plan is the
    project's questions_to_decide, for the fixed-n rule (as before) and for the sequential one; a rerun of n
    questions decides with the probability that the sequential test's stopping time, simulated at the truth, is at
    most n."""
    margin, alpha, power, pilot, block, psi = 0.01, 0.05, 0.8, 114, 200, 0.10
    rows = []
    for delta, label in ((0.0, "0"), (-margin / 2, "-margin/2")):
        p = [(psi - delta) / 2, (psi + delta) / 2]
        # The sequential test's stopping time at the truth, up to the plans' cap (blocks of 200).
        counts = np.zeros((reps, 3))
        stop = np.full(reps, np.inf)
        for start in range(0, PLAN_CAP, block):
            live = ~np.isfinite(stop)
            if not live.any():
                break
            counts[live] += rng.multinomial(block, [p[0], 1 - psi, p[1]], size=int(live.sum()))
            lost, tied, gained = counts[live].T
            hit = (paired_log_e(lost, tied, gained, -margin, side="above") >= math.log(1 / (alpha / 2))) | (
                paired_log_e(lost, tied, gained, -margin, side="below") >= math.log(1 / (alpha / 2)))  # fmt: skip
            stop[np.flatnonzero(live)[hit]] = start + block
        stop.sort()
        result: dict = {"true change": label}
        for rule in ("fixed-n", "sequential"):
            decided = beyond = mass = 0.0
            for b in range(0, 30):
                for c in range(0, 30):
                    weight = float(stats.multinomial.pmf([b, c, pilot - b - c], pilot, [p[0], p[1], 1 - psi]))
                    if weight < 1e-6:
                        continue
                    mass += weight
                    plan = _plan(b, c, pilot, rule, margin, alpha, power, block)
                    if plan is None or plan > 14042:
                        beyond += weight
                    if plan is not None:
                        decided += weight * float(np.searchsorted(stop, plan, side="right") / reps)
            result[rule] = {"decided": decided / mass, "plan beyond the split": beyond / mass}
        rows.append(result)
    return rows


@functools.cache
def _plan(b: int, c: int, n: int, rule: str, margin: float, alpha: float, power: float, block: int) -> int | None:
    """The project's plan after a pilot of n questions with b lost and c gained (the same for every truth)."""
    counts = PairedCounts(n - b - c, b, c, 0)
    return questions_to_decide(counts, margin, alpha, power, rule=rule, block=block).questions  # type: ignore[arg-type]


PARTS = ("early-stop", "concurrency", "survivor", "mmlu", "coverage", "exact", "pilot")


def _print(part: str, rows) -> None:  # noqa: ANN001
    pct = "{:7.2%}".format
    if part == "early-stop":
        print("1. Early stop of a load level, one request at a time (wrong: nominal 2.5 %)")
        print(f"   {'configuration':36} {'true p90':13} {'rule':4} {'within':>7} {'missed':>7} {'wrong':>7} requests")
        for r in rows:
            print(f"   {r['config']:36} {r['true p90']:13} {r['rule']:4} {pct(r['within'])} {pct(r['missed'])} "
                  f"{pct(r['wrong'])} {r['requests']:8.1f}")  # fmt: skip
    elif part == "concurrency":
        print("2. Early stop under concurrency (p90 objective, min 8 requests; at the limit: max 300, wrong <= 2.5 %)")
        print(f"   {'objective':9} {'users':>5} {'truth':22} {'rule':4} {'within':>7} {'missed':>7} requests"
              " (if within)")  # fmt: skip
        for r in rows:
            within = f"{r['requests_if_within']:8.1f}" if r["requests_if_within"] is not None else "       -"
            print(f"   {r['objective']:9} {r['users']:5} {r['truth']:22} {r['rule']:4} {pct(r['within'])} "
                  f"{pct(r['missed'])} {r['requests']:8.1f} {within}")  # fmt: skip
    elif part == "survivor":
        print("3. Survivor bias (32 users x 3 requests, true E2E p90 at the limit): pass rate")
        for k, v in rows["pass rate"].items():
            print(f"   {k:26} {v:6.1%}")
        print(f"   {'(an unbiased sample of 96)':26} {rows['unbiased sample of 96']:6.1%}")
    elif part == "mmlu":
        print("4. MMLU verdicts (margin 1 point, 10 % discordant; wrong at -margin: non-inferior, or worse, > 2.5 %)")
        for r in rows:
            s, f = r["sequential"], r["fixed-n Tango"]
            print(f"   {r['questions']:6} questions, true change {r['true change']:9}: sequential NI "
                  f"{s['non-inferior']:6.1%} worse {s['worse']:6.1%} inconcl. {s['inconclusive']:6.1%}, "
                  f"{r['questions used']:8.0f} questions used; fixed-n NI {f['non-inferior']:6.1%} "
                  f"worse {f['worse']:6.1%}")  # fmt: skip
    elif part == "coverage":
        print("5. The interval at a sequential stop (14,042 questions, blocks of 200; nominal coverage 95 %)")
        print("   discord. change     CS covers (decided)  Tango covers (decided)  decided  share used  median"
              "  within 20 %  CS / Tango width (points)")  # fmt: skip
        for r in rows:
            dec = [f"{r[k]:6.1%}" if r[k] is not None else "     -" for k in ("cs covers, decided",
                                                                          "tango covers, decided")]  # fmt: skip
            print(f"   {r['discordance']:6.0%} {r['true change']:9} {r['cs covers']:7.1%} ({dec[0]})    "
                  f"{r['tango covers']:7.1%} ({dec[1]})     {r['decided']:6.1%}  {r['mean share used']:9.1%}  "
                  f"{r['median used']:6.0f}  {r['within 20 %']:10.1%}   {100 * r['cs width']:.2f} / "
                  f"{100 * r['tango width']:.2f}")  # fmt: skip
    elif part == "exact":
        print("6. Tango's fixed-n verdicts at a true change of -margin, exact (nominal 2.5 % each)")
        for r in rows:
            print(f"   {r['questions']:6} questions, {r['discordance']:4.0%} discordant: non-inferior "
                  f"{r['non-inferior']:.2%}, worse {r['worse']:.2%}")  # fmt: skip
    elif part == "pilot":
        print("7. The questions a 114-question pilot asks for (10 % discordant), rerun with the sequential test: "
              "share decided (promised 80 %)")  # fmt: skip
        for r in rows:
            for rule in ("fixed-n", "sequential"):
                print(f"   true change {r['true change']:9} planned for the {rule:10} rule: decided "
                      f"{r[rule]['decided']:6.1%}, plan beyond the 14,042 of the test split "
                      f"{r[rule]['plan beyond the split']:6.1%}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (the tables are noisier)")
    parser.add_argument("--part", choices=PARTS, action="append", help="only these parts (repeatable; default all)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    quick = args.quick
    runs = {
        "early-stop": lambda rng: part_early_stop(rng, 2000 if quick else 20000),
        "concurrency": lambda rng: part_concurrency(rng, 800 if quick else 4000),
        "survivor": lambda rng: part_survivor(rng, 500 if quick else 4000),
        "mmlu": lambda rng: part_mmlu(rng, 100 if quick else 1000),
        "coverage": lambda rng: part_coverage(rng, 1000 if quick else 10000),
        "exact": lambda rng: part_fixed_n_exact(),
        "pilot": lambda rng: part_pilot(rng, 1000 if quick else 4000),
    }
    figures: dict = {"seed": args.seed, "quick": quick}
    for index, part in enumerate(PARTS):
        if args.part and part not in args.part:
            continue
        # Each part draws from its own stream: one part run alone gives the figures it gives in the whole run.
        figures[part] = runs[part](np.random.default_rng([args.seed, index]))
        _print(part, figures[part])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
