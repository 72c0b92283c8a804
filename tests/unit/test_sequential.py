"""The anytime-valid tests: the mixture's closed form against its definition, and their error at the boundary under
repeated looks, by seeded simulation small enough for every test run (the full tables: benchmarks/verdicts.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from bench.sequential import MissRate, PairedMargin, log_mixture_e


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
