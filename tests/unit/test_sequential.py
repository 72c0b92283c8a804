"""The anytime-valid tests: the mixture's closed form against its definition, and their error at the boundary under
repeated looks, by seeded simulation small enough for every test run (the full tables: benchmarks/verdicts.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from bench.sequential import (
    BET_FRACTIONS,
    MissRate,
    PairedMargin,
    log_mixture_e,
    paired_interval,
    paired_log_e,
    sequential_questions,
)


@pytest.mark.parametrize(("n", "s", "p0", "side"), [(20, 0, 0.1, "below"), (50, 12, 0.1, "above"),
                                                     (200, 15, 0.1, "below"), (7, 3, 0.5, "above")])  # fmt: skip
def test_the_closed_form_is_the_mixture_it_defines(n, s, p0, side):
    # E = integral of (theta/p0)^s ((1-theta)/(1-p0))^(n-s) over the Beta(10 p0, 10 (1-p0)) prior truncated to one
    # side of p0, by numerical integration.
    a, b = 10 * p0, 10 * (1 - p0)
    lo, hi = (0.0, p0) if side == "below" else (p0, 1.0)
    mass = stats.beta.cdf(hi, a, b) - stats.beta.cdf(lo, a, b)

    def integrand(theta: float) -> float:
        ratio = math.exp(s * math.log(theta / p0) + (n - s) * math.log((1 - theta) / (1 - p0)))
        return ratio * stats.beta.pdf(theta, a, b) / mass

    value, _ = integrate.quad(integrand, lo, hi, limit=200, points=[p0])
    assert log_mixture_e(n, s, p0, side=side) == pytest.approx(math.log(value), rel=1e-6, abs=1e-9)


def test_the_miss_rate_test_errs_at_most_alpha_however_often_it_looks():
    # A level whose true miss share is exactly 1 - q (its p90 at the limit), looked at after every request up to
    # 400: the share of runs ever declared "within" (or ever "missed") stays below alpha.
    rng = np.random.default_rng(7)
    test = MissRate(p0=0.1, alpha=0.05)
    within = missed = 0
    runs = 400
    for _ in range(runs):
        misses = np.cumsum(rng.random(400) < 0.1)
        verdicts = {test.decide(n, int(misses[n - 1])) for n in range(1, 401)}
        within += "within" in verdicts
        missed += "missed" in verdicts
    # Binomial(400, 0.05) exceeds 30 with probability about 0.5 %.
    assert within / runs <= 0.075 and missed / runs <= 0.075


def test_the_miss_rate_test_decides_a_clear_case_soon():
    test = MissRate(p0=0.1, alpha=0.025)
    # 48 fast requests show a p90 within its limit (a single look at a fixed n needs 35: 0.9^35 < 2.5 %; looking
    # after every request costs the rest), 40 do not yet.
    assert test.decide(48, 0) == "within"
    assert test.decide(40, 0) is None
    assert test.decide(10, 6) == "missed"
    assert test.decide(100, 10) is None  # exactly at the boundary: nothing is shown


def test_the_paired_margin_test_errs_at_most_alpha_at_the_margin():
    # True change exactly -margin (1 point), 10 % of the questions answered differently, looked at every 50
    # questions up to 4,000: the share of runs ever called non-inferior stays below alpha (and so for "worse" at the
    # margin from the other side).
    rng = np.random.default_rng(11)
    margin, discordant, runs = 0.01, 0.10, 200
    p_gain = (discordant - margin) / 2  # P(D = +1) - P(D = -1) = -margin
    p_loss = p_gain + margin
    wrong = 0
    for _ in range(runs):
        test = PairedMargin(margin=margin, alpha=0.05)
        for _block in range(80):
            u = rng.random(50)
            test.add(np.where(u < p_gain, 1.0, np.where(u < p_gain + p_loss, -1.0, 0.0)))
            if test.verdict() == "non-inferior":
                wrong += 1
                break
    assert wrong / runs <= 0.08  # Binomial(200, 0.05) > 16 with probability about 2 %


def test_the_paired_margin_test_decides_a_clear_case():
    no_change = PairedMargin(margin=0.05, alpha=0.05)
    no_change.add(np.zeros(2000))
    assert no_change.verdict() == "non-inferior" and no_change.n == 2000
    big_loss = PairedMargin(margin=0.01, alpha=0.05)
    big_loss.add(np.r_[-np.ones(300), np.zeros(700)])  # a 30-point loss
    assert big_loss.verdict() == "worse"
    undecided = PairedMargin(margin=0.01, alpha=0.05)
    undecided.add(np.r_[np.ones(5), -np.ones(5), np.zeros(104)])  # the demo's size: nothing is shown
    assert undecided.verdict() is None
    with pytest.raises(ValueError):
        PairedMargin(margin=0.0, alpha=0.05)


def test_the_paired_e_process_is_the_average_of_its_bets_products():
    # By its definition: the mean over the bet fractions f of prod(1 + f / (1 + d0) (D_i - d0)) ("above") and of
    # prod(1 - f / (1 - d0) (D_i - d0)) ("below"), over the differences themselves in any order.
    rng = np.random.default_rng(3)
    d = rng.choice([-1.0, 0.0, 1.0], size=300, p=[0.06, 0.9, 0.04])
    for d0 in (-0.05, -0.01, 0.0, 0.02):
        up = np.mean([np.prod(1 + f / (1 + d0) * (d - d0)) for f in BET_FRACTIONS])
        down = np.mean([np.prod(1 - f / (1 - d0) * (d - d0)) for f in BET_FRACTIONS])
        counts = ((d == -1).sum(), (d == 0).sum(), (d == 1).sum())
        assert paired_log_e(*counts, d0, side="above") == pytest.approx(math.log(up), rel=1e-9, abs=1e-12)
        assert paired_log_e(*counts, d0, side="below") == pytest.approx(math.log(down), rel=1e-9, abs=1e-12)
    test = PairedMargin(margin=0.01, alpha=0.05)
    test.add(d)
    assert test.e_non_inferior == pytest.approx(math.exp(paired_log_e(*counts, -0.01, side="above")))
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        test.add([0.5])


def test_the_confidence_sequence_inverts_the_tests_and_agrees_with_the_verdict():
    for lost, tied, gained in ((60, 9900, 40), (30, 1000, 60), (5, 104, 5), (0, 0, 2), (400, 600, 0)):
        low, high = paired_interval(lost, tied, gained, 0.025)
        assert -1 <= low <= (gained - lost) / (lost + tied + gained) <= high <= 1
        threshold = math.log(40)
        if low > -1:  # at its ends each e-process meets the threshold: everything outside is rejected
            assert paired_log_e(lost, tied, gained, low, side="above") == pytest.approx(threshold, abs=1e-6)
        if high < 1:
            assert paired_log_e(lost, tied, gained, high, side="below") == pytest.approx(threshold, abs=1e-6)
        for margin in (0.005, 0.01, 0.03, 0.2):
            test = PairedMargin(margin=margin, alpha=0.025, lost=lost, tied=tied, gained=gained)
            verdict = test.verdict()
            assert (verdict == "non-inferior") == (low >= -margin)
            assert (verdict == "worse") == (high <= -margin and low < -margin)
            assert test.interval() == (low, high)
    assert paired_interval(0, 0, 0, 0.025) == (-1.0, 1.0)


def test_the_confidence_sequence_covers_the_change_wherever_the_test_stopped():
    # A sequential run that stops at its verdict (blocks of 200, up to 6,000 questions, 20 % answered differently,
    # true change -0.5 points): the interval at the stop covers the true change in at least 1 - 2 alpha of runs.
    rng = np.random.default_rng(17)
    runs, covered = 300, 0
    for _ in range(runs):
        test = PairedMargin(margin=0.01, alpha=0.025)
        for _block in range(30):
            u = rng.random(200)
            test.add(np.where(u < 0.1025, -1.0, np.where(u < 0.2, 1.0, 0.0)))
            if test.verdict() is not None:
                break
        low, high = test.interval()
        covered += low <= -0.005 <= high
    assert covered / runs >= 0.93  # nominal 0.95; Binomial(300, 0.95) falls below 0.93 with probability ~5 %


def test_a_sequential_plan_is_the_questions_by_which_power_of_runs_decide():
    n = sequential_questions(0.05, 0.05, margin=0.01, alpha=0.025, power=0.8, block=200)
    assert n is not None and n % 200 == 0
    assert sequential_questions(0.05, 0.05, margin=0.01, alpha=0.025, power=0.8, block=200) == n  # seeded
    assert sequential_questions(0.05, 0.05, margin=0.01, alpha=0.025, power=0.9, block=200) > n
    assert sequential_questions(0.015, 0.015, margin=0.01, alpha=0.025, power=0.8, block=200) < n
    # A true change at the margin is never decided: no number, however many are allowed.
    assert sequential_questions(0.055, 0.045, margin=0.01, alpha=0.025, power=0.8, block=200, cap=20_000) is None
