"""Anytime-valid tests: verdicts that stay true however often the data are looked at, and whenever one stops.

Each test is an e-process: a non-negative process whose expectation is at most 1 at every stopping time while its
null hypothesis holds, so by Ville's inequality it ever reaches 1/alpha with probability at most alpha. Looking
after every request (or every block of questions) and stopping when it crosses is then valid.

- `MissRate`: a latency objective "the q-quantile of metric X is within L" is "the share of requests that miss L is
  at most 1 - q". Two one-sided tests on that share: the mixture over a truncated beta prior of the likelihood ratio
  against the boundary (Robbins 1970; the binomial case of Howard & Ramdas 2022, "Sequential estimation of
  quantiles with applications to A/B-testing and best-arm identification"): certainly within when the mixture over
  shares below 1 - q crosses, certainly missed when the one over shares above does. The e-process runs over the
  requests in the order they were sent (an order fixed before any outcome is known). A request still in flight is
  censored: it has not missed yet, but may. The test uses the requests up to the first one still open (all known:
  the e-process's own value there) or, where that says more, further ones with each open request counted against
  the claim (a miss for "within", a hit for "missed"). Each value is at most the e-process of the true outcomes at
  that point, so the claim keeps its level; the verdict does not depend on which requests happened to finish first.
- `PairedMargin`: the mean of paired differences D in {-1, 0, 1} (a variant's correctness minus the baseline's on
  the same question) against a margin: non-inferior when E[D] > -margin is shown, worse when E[D] < -margin is
  shown. Each is a betting e-process (Waudby-Smith & Ramdas 2023, "Estimating means of bounded random variables by
  betting"): the average, over a grid of bet sizes, of prod(1 + lambda (D_i + margin)) (or 1 - lambda ...), each
  product a non-negative supermartingale under its null. Inverting the same e-processes at every other value of
  the change gives its confidence sequence (`paired_interval`): an interval valid at any stopping time, the one to
  print beside a sequential verdict. `sequential_questions` plans how many questions the test needs, by simulating
  it.

Pure (numpy, scipy), tested against the mixture's definition (numerical integration) and by seeded simulation of
the error at the boundary (benchmarks/verdicts.py prints the tables docs/quality.md and docs/load.md give).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize, special

Side = Literal["below", "above"]

# A request's outcome against one objective, in the order the requests were sent.
HIT, MISS, OPEN = 0, 1, 2  # within the limit; over it (or failed); still in flight and not over it yet


def log_mixture_e(n, misses, p0: float, *, side: Side, strength: float = 10.0):  # noqa: ANN001, ANN201
    """log of the beta-mixture e-value of `misses` in `n` Bernoulli trials against a miss rate of `p0` (arrays of
    `n` and `misses` give an array).

    The mixture of the likelihood ratios (theta / p0)^s ((1 - theta) / (1 - p0))^(n - s) over a Beta(strength p0,
    strength (1 - p0)) prior truncated to theta < p0 (side "below": evidence that the rate is below p0) or theta > p0
    (side "above"). Under any rate on the other side of p0 (the null), it is a non-negative supermartingale."""
    scalar = np.ndim(n) == 0 and np.ndim(misses) == 0
    n_arr, s = (float(n), float(misses)) if scalar else (np.asarray(n, dtype=float), np.asarray(misses, dtype=float))
    bad = (s < 0 or n_arr < s) if scalar else (np.any(s < 0) or np.any(n_arr < s))
    if bad or not 0 < p0 < 1:
        raise ValueError(f"need 0 <= misses <= n and 0 < p0 < 1, got n={n}, misses={misses}, p0={p0}")
    a, b = strength * p0, strength * (1 - p0)
    f = n_arr - s
    # P(theta < p0) under the posterior Beta(a + s, b + f), and under the prior: the truncation's normalisers.
    if side == "below":
        post, prior = special.betainc(a + s, b + f, p0), special.betainc(a, b, p0)
    else:
        post, prior = special.betaincc(a + s, b + f, p0), special.betaincc(a, b, p0)
    log_bf = special.betaln(a + s, b + f) - special.betaln(a, b) - s * math.log(p0) - f * math.log1p(-p0)
    if scalar:  # the plain path: the benchmarks' threshold tables call it a million times
        return float(log_bf + math.log(post) - math.log(prior)) if post > 0 else -math.inf
    with np.errstate(divide="ignore"):
        return log_bf + np.log(post) - math.log(prior)


@dataclass(frozen=True)
class MissRate:
    """Anytime-valid verdict on one latency objective: is the miss rate below (within) or above (missed) p0?

    `alpha` is the error allowed for each of the two claims (so at most `alpha` that a level whose true quantile sits
    exactly at the limit is declared within, and at most `alpha` that it is declared missed)."""

    p0: float  # 1 - the objective's quantile: the largest share of requests that may miss the limit
    alpha: float
    strength: float = 10.0

    @property
    def _threshold(self) -> float:
        return math.log(1 / self.alpha)

    def decide(self, sent: int, misses: int, in_flight: int = 0) -> Literal["within", "missed"] | None:
        """The verdict the first `sent` requests support, `misses` of them over the limit and `in_flight` not known
        (counted against the claim); None while neither claim is shown."""
        if sent <= 0:
            return None
        if log_mixture_e(sent, misses + in_flight, self.p0, side="below", strength=self.strength) >= self._threshold:
            return "within"
        if log_mixture_e(sent, misses, self.p0, side="above", strength=self.strength) >= self._threshold:
            return "missed"
        return None

    def decide_outcomes(self, outcomes: Sequence[int] | np.ndarray) -> Literal["within", "missed"] | None:
        """The verdict of the requests in the order they were sent, each HIT, MISS or OPEN (in flight, not over the
        limit yet): the e-process at every point from the first open request on (before it, every outcome is
        known), each open one up to that point counted against the claim. None while neither claim is shown."""
        codes = np.asarray(outcomes, dtype=np.int8)
        if codes.size == 0:
            return None
        is_open = codes == OPEN
        first_open = int(np.argmax(is_open)) if is_open.any() else codes.size
        cut = np.arange(max(first_open, 1), codes.size + 1)  # how many requests each candidate point counts
        misses = np.cumsum(codes == MISS)[cut - 1]
        opens = np.cumsum(is_open)[cut - 1]
        below = log_mixture_e(cut, misses + opens, self.p0, side="below", strength=self.strength)
        if np.max(below) >= self._threshold:
            return "within"
        above = log_mixture_e(cut, misses, self.p0, side="above", strength=self.strength)
        if np.max(above) >= self._threshold:
            return "missed"
        return None

    def fewest_within(self, limit: int = 100_000) -> int | None:
        """The fewest requests that can show "within": all of them within the limit (None beyond `limit`)."""
        n = 1
        while n <= limit:
            if log_mixture_e(n, 0, self.p0, side="below", strength=self.strength) >= self._threshold:
                break
            n *= 2
        else:
            return None
        low, high = n // 2, n  # the e-value of n hits grows with n: bisect between the last miss and the first hit
        while high - low > 1:
            mid = (low + high) // 2
            shown = log_mixture_e(mid, 0, self.p0, side="below", strength=self.strength) >= self._threshold
            low, high = (low, mid) if shown else (mid, high)
        return high


# Bet sizes (as fractions of the largest bet that keeps every factor non-negative) the e-processes average over:
# small bets are patient and win when the effect is small, large ones win fast when it is large.
BET_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)


def paired_log_e(lost, tied, gained, d0: float, *, side: Literal["above", "below"]):  # noqa: ANN001, ANN201
    """log of the betting e-process after `lost` differences of -1, `tied` of 0 and `gained` of +1 (arrays give an
    array), against a mean change of `d0`: side "above" is the evidence that E[D] > d0 (the average over
    BET_FRACTIONS f of prod(1 + lambda (D_i - d0)), lambda = f / (1 + d0)), side "below" that E[D] < d0 (prod(1 -
    lambda (D_i - d0)), lambda = f / (1 - d0)). Its value depends on the counts alone: the order of the questions
    within what was answered does not matter."""
    if not -1 < d0 < 1:
        raise ValueError(f"the change tested must lie in (-1, 1), got {d0}")
    f = np.asarray(BET_FRACTIONS)
    counts = [np.asarray(c, dtype=float)[..., None] for c in (lost, tied, gained)]
    if side == "above":
        lam = f / (1 + d0)
        factors = (np.log1p(lam * (-1 - d0)), np.log1p(lam * -d0), np.log1p(lam * (1 - d0)))
    else:
        lam = f / (1 - d0)
        factors = (np.log1p(-lam * (-1 - d0)), np.log1p(lam * d0), np.log1p(-lam * (1 - d0)))
    logs = sum(c * k for c, k in zip(counts, factors, strict=True))
    out = special.logsumexp(logs, axis=-1) - math.log(len(f))
    return float(out) if np.ndim(out) == 0 else out


def paired_interval(lost: int, tied: int, gained: int, alpha: float) -> tuple[float, float]:
    """The confidence sequence of the mean change after these counts: every d0 neither e-process rejects at
    `alpha` (each side at `alpha`, so the coverage is 1 - 2 alpha at any stopping time). Its lower end is above -M
    exactly when PairedMargin(M, alpha) says non-inferior, its upper end below -M exactly when it says worse."""
    threshold = math.log(1 / alpha)
    eps = 1e-9

    def end(side: Literal["above", "below"]) -> float:
        # "above" falls as d0 rises and "below" rises: the end is where the e-process meets the threshold.
        def excess(d0: float) -> float:
            return paired_log_e(lost, tied, gained, d0, side=side) - threshold

        outer = -1 + eps if side == "above" else 1 - eps
        if excess(outer) < 0:
            return -1.0 if side == "above" else 1.0
        mean = (gained - lost) / max(lost + tied + gained, 1)
        inner = min(max(mean, -1 + 2 * eps), 1 - 2 * eps)
        lo, hi = (outer, inner) if side == "above" else (inner, outer)
        if excess(inner) >= 0:  # cannot happen for a mean inside (-1, 1); a guard against rounding at the edges
            return inner
        return float(optimize.brentq(excess, lo, hi, xtol=1e-10))

    return end("above"), end("below")


@dataclass
class PairedMargin:
    """Anytime-valid verdict on the mean paired difference against a margin: "non-inferior" once E[D] > -margin is
    shown, "worse" once E[D] < -margin is shown (each at level `alpha`). Feed it differences (-1, 0, +1) with
    `add`; `interval` is the confidence sequence of the change at the same level."""

    margin: float
    alpha: float
    lost: int = 0  # differences of -1: the baseline right, the variant wrong
    tied: int = 0
    gained: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.margin < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"need 0 < margin < 1 and 0 < alpha < 1, got {self.margin}, {self.alpha}")

    @property
    def n(self) -> int:
        return self.lost + self.tied + self.gained

    def add(self, differences: np.ndarray | list[float]) -> None:
        d = np.asarray(differences, dtype=float)
        if not np.isin(d, (-1.0, 0.0, 1.0)).all():
            raise ValueError("paired differences of correctness are -1, 0 or +1")
        self.lost += int((d == -1).sum())
        self.tied += int((d == 0).sum())
        self.gained += int((d == 1).sum())

    def _log_e(self, side: Literal["above", "below"]) -> float:
        return paired_log_e(self.lost, self.tied, self.gained, -self.margin, side=side)  # type: ignore[return-value]

    @property
    def e_non_inferior(self) -> float:
        """The e-process against "the variant loses the margin or more" (large: it does not)."""
        return math.exp(min(self._log_e("above"), 700.0))

    @property
    def e_worse(self) -> float:
        """The e-process against "the variant loses less than the margin" (large: it loses more)."""
        return math.exp(min(self._log_e("below"), 700.0))

    def verdict(self) -> Literal["non-inferior", "worse"] | None:
        threshold = math.log(1 / self.alpha)
        if self._log_e("above") >= threshold:
            return "non-inferior"
        if self._log_e("below") >= threshold:
            return "worse"
        return None

    def interval(self) -> tuple[float, float]:
        """The confidence sequence of the change (coverage 1 - 2 alpha wherever the run stopped)."""
        return paired_interval(self.lost, self.tied, self.gained, self.alpha)


def sequential_questions(
    p_lost: float, p_gained: float, *, margin: float, alpha: float, power: float, block: int,
    cap: int = 100_000, reps: int = 2000, seed: int = 0,
) -> int | None:  # fmt: skip
    """Questions by which `power` of sequential runs (PairedMargin at `alpha` per side, looked at after every
    `block`) have a verdict, when each question is lost with probability `p_lost` and gained with `p_gained`; None
    when that takes more than `cap`. A seeded simulation of `reps` runs (the same answer every time): the test's
    stopping time has no closed form, and a fixed-n formula understates it (the sequential test pays for looking)."""
    if min(p_lost, p_gained) < 0 or p_lost + p_gained > 1:
        raise ValueError(f"need probabilities, got lost {p_lost}, gained {p_gained}")
    rng = np.random.default_rng(seed)
    threshold = math.log(1 / alpha)
    probs = [p_lost, 1 - p_lost - p_gained, p_gained]
    counts = np.zeros((reps, 3))
    decided = np.zeros(reps, dtype=bool)
    needed = math.ceil(power * reps)
    for start in range(0, cap, block):
        counts += rng.multinomial(min(block, cap - start), probs, size=reps)
        lost, tied, gained = counts.T
        decided |= paired_log_e(lost, tied, gained, -margin, side="above") >= threshold
        decided |= paired_log_e(lost, tied, gained, -margin, side="below") >= threshold
        if decided.sum() >= needed:
            return min(start + block, cap)
    return None
