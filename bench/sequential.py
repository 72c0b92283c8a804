"""Anytime-valid tests: verdicts that stay true however often the data are looked at, and whenever one stops.

Each test is an e-process: a non-negative process whose expectation is at most 1 at every stopping time while its
null hypothesis holds, so by Ville's inequality it ever reaches 1/alpha with probability at most alpha. Looking
after every request (or every block of questions) and stopping when it crosses is then valid.

- `MissRate`: a latency objective "the q-quantile of metric X is within L" is "the share of requests that miss L is
  at most 1 - q". Two one-sided tests on that share: the mixture over a truncated beta prior of the likelihood ratio
  against the boundary (Robbins 1970; the binomial case of Howard & Ramdas 2022, "Sequential estimation of
  quantiles with applications to A/B-testing and best-arm identification"): certainly within when the mixture over
  shares below 1 - q crosses, certainly missed when the one over shares above does. Requests still in flight count
  against the verdict being claimed (a miss for "within", a hit for "missed"), which can only lower the process: the
  verdict does not depend on which requests happened to finish first.
- `PairedMargin`: the mean of paired differences D in [-1, 1] (a variant's correctness minus the baseline's on the
  same question) against a margin: non-inferior when E[D] > -margin is shown, worse when E[D] < -margin is shown.
  Each is a betting e-process (Waudby-Smith & Ramdas 2023, "Estimating means of bounded random variables by
  betting"): the average, over a grid of bet sizes, of prod(1 + lambda (D_i + margin)) (or 1 - lambda ...), each
  product a non-negative supermartingale under its null.

Pure (numpy, scipy), tested against the mixture's definition (numerical integration) and by seeded simulation of
the error at the boundary (benchmarks/verdicts.py prints the table the README gives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import special

Side = Literal["below", "above"]


def log_mixture_e(n: int, misses: float, p0: float, *, side: Side, strength: float = 10.0) -> float:
    """log of the beta-mixture e-value of `misses` in `n` Bernoulli trials against a miss rate of `p0`.

    The mixture of the likelihood ratios (theta / p0)^s ((1 - theta) / (1 - p0))^(n - s) over a Beta(strength p0,
    strength (1 - p0)) prior truncated to theta < p0 (side "below": evidence that the rate is below p0) or theta > p0
    (side "above"). Under any rate on the other side of p0 (the null), it is a non-negative supermartingale."""
    if n < 0 or not 0 <= misses <= n or not 0 < p0 < 1:
        raise ValueError(f"need 0 <= misses <= n and 0 < p0 < 1, got n={n}, misses={misses}, p0={p0}")
    a, b = strength * p0, strength * (1 - p0)
    s, f = misses, n - misses
    # P(theta < p0) under the posterior Beta(a + s, b + f), and under the prior: the truncation's normalisers.
    if side == "below":
        post, prior = special.betainc(a + s, b + f, p0), special.betainc(a, b, p0)
    else:
        post, prior = special.betaincc(a + s, b + f, p0), special.betaincc(a, b, p0)
    if post <= 0:
        return -math.inf
    log_bf = special.betaln(a + s, b + f) - special.betaln(a, b) - s * math.log(p0) - f * math.log1p(-p0)
    return float(log_bf + math.log(post) - math.log(prior))


@dataclass(frozen=True)
class MissRate:
    """Anytime-valid verdict on one latency objective: is the miss rate below (within) or above (missed) p0?

    `alpha` is the error allowed for each of the two claims (so at most `alpha` that a level whose true quantile sits
    exactly at the limit is declared within, and at most `alpha` that it is declared missed)."""

    p0: float  # 1 - the objective's quantile: the largest share of requests that may miss the limit
    alpha: float
    strength: float = 10.0

    def decide(self, sent: int, misses: int, in_flight: int = 0) -> Literal["within", "missed"] | None:
        """The verdict `sent` requests support, `misses` of them finished over the limit and `in_flight` not yet
        finished (counted against the claim); None while neither claim is shown."""
        threshold = math.log(1 / self.alpha)
        if sent <= 0:
            return None
        if log_mixture_e(sent, misses + in_flight, self.p0, side="below", strength=self.strength) >= threshold:
            return "within"
        if log_mixture_e(sent, misses, self.p0, side="above", strength=self.strength) >= threshold:
            return "missed"
        return None


# Bet sizes (as fractions of the largest bet that keeps every factor non-negative) the e-processes average over:
# small bets are patient and win when the effect is small, large ones win fast when it is large.
BET_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)


@dataclass
class PairedMargin:
    """Anytime-valid verdict on the mean paired difference against a margin: "non-inferior" once E[D] > -margin is
    shown, "worse" once E[D] < -margin is shown (each at level `alpha`). Feed it differences with `add`."""

    margin: float
    alpha: float
    n: int = 0
    _log_up: np.ndarray = field(default_factory=lambda: np.zeros(len(BET_FRACTIONS)))
    _log_down: np.ndarray = field(default_factory=lambda: np.zeros(len(BET_FRACTIONS)))

    def __post_init__(self) -> None:
        if not 0 < self.margin < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"need 0 < margin < 1 and 0 < alpha < 1, got {self.margin}, {self.alpha}")
        bets = np.asarray(BET_FRACTIONS)
        self._up = bets / (1 - self.margin)  # 1 + lambda (D + margin) >= 0 for D >= -1
        self._down = bets / (1 + self.margin)  # 1 - lambda (D + margin) >= 0 for D <= 1

    def add(self, differences: np.ndarray | list[float]) -> None:
        d = np.asarray(differences, dtype=float) + self.margin
        if d.size == 0:
            return
        self._log_up += np.log1p(np.outer(d, self._up)).sum(axis=0)
        self._log_down += np.log1p(-np.outer(d, self._down)).sum(axis=0)
        self.n += int(d.size)

    @staticmethod
    def _log_mean(logs: np.ndarray) -> float:
        return float(special.logsumexp(logs) - math.log(len(logs)))

    @property
    def e_non_inferior(self) -> float:
        """The e-process against "the variant loses the margin or more" (large: it does not)."""
        return math.exp(min(self._log_mean(self._log_up), 700.0))

    @property
    def e_worse(self) -> float:
        """The e-process against "the variant loses less than the margin" (large: it loses more)."""
        return math.exp(min(self._log_mean(self._log_down), 700.0))

    def verdict(self) -> Literal["non-inferior", "worse"] | None:
        threshold = math.log(1 / self.alpha)
        if self._log_mean(self._log_up) >= threshold:
            return "non-inferior"
        if self._log_mean(self._log_down) >= threshold:
            return "worse"
        return None
