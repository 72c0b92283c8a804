"""Latency objectives: a request's goodness, a step's pass/fail at each quantile, and when it is already certain."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from locustfiles._slo import (
    Objective,
    evaluate,
    format_objectives,
    meets,
    parse_objectives,
    quantile,
    quantile_interval,
)

TTFT = Objective("ttft_s", 2.0, 0.9)
TPOT = Objective("tpot_s", 0.1, 0.5)


def test_a_request_is_good_only_within_every_limit():
    assert meets({"ttft_s": 1.9, "tpot_s": 0.1}, [TTFT, TPOT])
    assert not meets({"ttft_s": 2.1, "tpot_s": 0.05}, [TTFT, TPOT])
    assert not meets({"ttft_s": 1.0}, [TTFT, TPOT])  # a metric the request lacks cannot be met
    assert meets({}, [])


@pytest.mark.parametrize(("q", "passed"), [(0.5, True), (0.8, True), (0.9, False), (0.99, False)])
def test_a_step_passes_when_the_quantile_is_within_the_limit(q: float, passed: bool):
    ttfts = [1.0] * 8 + [1.5, 3.0]  # p50 1.0, p80 1.1, p90 1.65 ... numpy's linear interpolation
    verdict = evaluate({"ttft_s": ttfts}, [Objective("ttft_s", 1.5, q)])
    assert verdict.results[0].value == pytest.approx(np.percentile(ttfts, q * 100))
    assert verdict.passed is passed


def test_the_quantile_interval_is_the_order_statistics_the_binomial_covers():
    values = list(range(1, 101))  # x(i) = i
    low, high = quantile_interval(values, 0.9, 0.95)
    l_rank, u_rank = int(stats.binom.ppf(0.025, 100, 0.9)), int(stats.binom.ppf(0.975, 100, 0.9)) + 1
    assert (low, high) == (l_rank, u_rank) and l_rank < 90 < u_rank
    assert stats.binom.cdf(u_rank - 1, 100, 0.9) - stats.binom.cdf(l_rank - 1, 100, 0.9) >= 0.95
    # Too few requests to bound the top of a p90: the interval is open above.
    assert quantile_interval([1.0, 2.0, 3.0], 0.9)[1] == math.inf
    assert quantile_interval([], 0.9) == (-math.inf, math.inf)


def test_a_verdict_is_certain_only_when_the_interval_is_on_one_side():
    clearly_bad = evaluate({"ttft_s": [5.0] * 10}, [TTFT])
    assert not clearly_bad.passed and clearly_bad.certain  # even the interval's low end is over 2 s
    clearly_good = evaluate({"ttft_s": [0.5] * 100}, [TTFT])
    assert clearly_good.passed and clearly_good.certain
    few_good = evaluate({"ttft_s": [0.5] * 10}, [TTFT])
    assert few_good.passed and not few_good.certain  # 10 requests cannot bound a p90 from above
    close = evaluate({"ttft_s": list(np.linspace(1.0, 2.2, 20))}, [TTFT])  # p90 2.08, interval 1.88 .. 2.2
    assert not close.passed and not close.certain
    # One objective certainly missed settles the step, whatever the others say.
    mixed = evaluate({"ttft_s": [5.0] * 10, "tpot_s": [0.05] * 10}, [TTFT, TPOT])
    assert mixed.certain and not mixed.passed


def test_objectives_travel_as_one_option():
    objectives = parse_objectives("ttft_s=2@0.9, tpot_s=0.1@0.5,e2e_s=30")
    assert objectives == (TTFT, TPOT, Objective("e2e_s", 30.0, 0.9))
    assert parse_objectives(format_objectives(objectives)) == objectives
    assert parse_objectives("") == ()
    assert [o.describe() for o in objectives] == ["TTFT p90 <= 2 s", "TPOT p50 <= 100 ms", "E2E p90 <= 30 s"]
    with pytest.raises(ValueError, match="unknown metric 'itl_s'"):
        parse_objectives("itl_s=1")
    with pytest.raises(ValueError, match="expected METRIC=LIMIT"):
        parse_objectives("ttft_s")
    assert quantile([1.0, 2.0], 0.5) == 1.5
