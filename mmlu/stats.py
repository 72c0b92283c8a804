"""Statistics of MMLU accuracy: Wilson intervals, the paired comparison of a variant with the baseline, its verdict.

A variant and the baseline answer the same questions, so their comparison is paired: what matters is where they
disagree (b = baseline right and variant wrong, c = variant right and baseline wrong, of n questions; the change
in accuracy is delta = (c - b) / n). Each variant gets one of three verdicts against a margin M (the largest loss
of accuracy the user accepts):

- non-inferior: the data rule out a loss of M or more (one-sided score test of delta <= -M rejected at alpha/2;
  for one variant, exactly when the two-sided 1 - alpha interval lies above -M);
- worse: the data show a loss of more than M (delta >= -M rejected at alpha/2: the interval lies below -M);
- inconclusive: neither (a loss may be shown, the interval below 0, without being placed against the margin);
  `questions_to_decide` says how many questions would decide, planned from an upper bound of the discordance,
  for the rule the run uses: Nam's formula for this fixed-n test, a seeded simulation of the sequential test
  (bench.sequential.sequential_questions) for a sequential run, which needs more.

The interval and the tests are Tango's asymptotic score method for paired proportions (Tango 1998, Stat Med
17:891; it stays inside [-1, 1] and behaves with few discordant pairs), the two being exact duals; with several
variants against one baseline the p-values are adjusted with Holm's step-down method (statsmodels). The exact
McNemar test (two-sided, scipy) is kept beside them. The sample size is Nam's score-test formula for paired
non-inferiority (Nam 1997, Biometrics 53:1422; with M = 0 it is Connor's 1987 McNemar formula). Each formula is
tested against published worked examples in tests/unit/test_mmlu_stats.py.

At the margin these asymptotic tests are not exact: benchmarks/verdicts.py enumerates their error exactly
(docs/quality.md gives the figures; "worse" exceeds alpha / 2 slightly at a low discordance, by at most a few tenths of
a point from 1,000 questions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests

from bench.sequential import paired_log_e, sequential_questions
from harness.errors import MMLUError

CONFIDENCE = 0.95
CI_METHOD = "wilson"
PAIRED_METHOD = "Tango score interval and tests (Tango 1998), Holm-adjusted across variants"
Verdict = Literal["non-inferior", "worse", "inconclusive"]
Rule = Literal["fixed-n", "sequential"]
# A plan stops here (the sequential simulation runs no further): beyond it, "more than" this. MMLU's test split
# holds 14,042 questions.
PLAN_CAP = 100_000


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion correct/n, as fractions."""
    if n <= 0:
        raise MMLUError("an accuracy interval needs at least one question")
    if not 0 <= correct <= n:
        raise MMLUError(f"{correct} correct out of {n} is impossible")
    ci = stats.binomtest(correct, n).proportion_ci(confidence_level=confidence, method=CI_METHOD)
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class PairedCounts:
    """Answers of the baseline and a variant on the same questions, cross-tabulated."""

    both_correct: int
    baseline_only: int  # b: baseline right, variant wrong (a right -> wrong flip)
    variant_only: int  # c: variant right, baseline wrong (a wrong -> right flip)
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_correct + self.baseline_only + self.variant_only + self.both_wrong

    @property
    def discordant(self) -> int:
        return self.baseline_only + self.variant_only

    @property
    def delta(self) -> float:
        """Variant accuracy minus baseline accuracy, as a fraction."""
        if self.n == 0:
            raise MMLUError("a paired comparison needs at least one question")
        return (self.variant_only - self.baseline_only) / self.n


def paired_counts(baseline: Sequence[bool], variant: Sequence[bool]) -> PairedCounts:
    if len(baseline) != len(variant):
        raise MMLUError(f"paired answers differ in length: {len(baseline)} vs {len(variant)} questions")
    both = sum(1 for b, v in zip(baseline, variant, strict=True) if b and v)
    b_only = sum(1 for b, v in zip(baseline, variant, strict=True) if b and not v)
    v_only = sum(1 for b, v in zip(baseline, variant, strict=True) if v and not b)
    return PairedCounts(both, b_only, v_only, len(baseline) - both - b_only - v_only)


def mcnemar_exact(counts: PairedCounts) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2 (1.0 if none)."""
    if counts.discordant == 0:
        return 1.0
    return float(stats.binomtest(counts.variant_only, counts.discordant, 0.5).pvalue)


def score_statistic(counts: PairedCounts, d0: float) -> float:
    """Tango's score statistic for H0: delta = d0 (positive when the data say delta > d0).

    The variance uses the maximum-likelihood estimate of P(baseline only) under the null, the root of
    A q^2 + B q + C = 0 with A = 2n, B = -b - c + (2n - c + b) d0, C = -b d0 (1 - d0).
    """
    n, b, c = counts.n, counts.baseline_only, counts.variant_only
    if n == 0:
        raise MMLUError("a paired comparison needs at least one question")
    big_a = 2 * n
    big_b = -b - c + (2 * n - c + b) * d0
    big_c = -b * d0 * (1 - d0)
    q = (math.sqrt(max(big_b * big_b - 4 * big_a * big_c, 0.0)) - big_b) / (2 * big_a)
    variance = n * (2 * q + d0 * (1 - d0))
    numerator = c - b - n * d0
    if variance <= 0:  # only at d0 = the estimate with no discordant pair
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def paired_delta_interval(counts: PairedCounts, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's score interval of delta: every d0 the two-sided score test at 1 - confidence does not reject."""
    if counts.n == 0:
        raise MMLUError("a paired comparison needs at least one question")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    estimate = counts.delta
    eps = 1e-12
    low = -1.0 if estimate <= -1 else optimize.brentq(lambda d: score_statistic(counts, d) - z, -1 + eps, estimate,
                                                        xtol=1e-12)  # fmt: skip
    high = 1.0 if estimate >= 1 else optimize.brentq(lambda d: score_statistic(counts, d) + z, estimate, 1 - eps,
                                                       xtol=1e-12)  # fmt: skip
    return float(low), float(high)


def noninferiority_p(counts: PairedCounts, margin: float) -> float:
    """One-sided p-value of H0: delta <= -margin (small: the variant loses less than the margin)."""
    return float(stats.norm.sf(score_statistic(counts, -margin)))


def worse_p(counts: PairedCounts, margin: float = 0.0) -> float:
    """One-sided p-value of H0: delta >= -margin (small: the variant loses more than the margin; with margin 0,
    that it loses accuracy at all)."""
    return float(stats.norm.cdf(score_statistic(counts, -margin)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control across the variants), in the given order."""
    if not p_values:
        return []
    _, adjusted, _, _ = multipletests(list(p_values), method="holm")
    return [float(p) for p in adjusted]


def verdict(p_noninferior: float, p_worse: float, alpha: float) -> Verdict:
    """The three-way verdict from (adjusted) one-sided p-values against the margin, each tested at alpha / 2:
    `p_noninferior` of "loses the margin or more", `p_worse` of "loses less than the margin" (worse_p with the
    margin). Both cannot be small at once (they test the two sides of the same point)."""
    if p_noninferior < alpha / 2:
        return "non-inferior"
    if p_worse < alpha / 2:
        return "worse"
    return "inconclusive"


def verdict_of_interval(low: float, high: float, margin: float) -> Verdict:
    """The verdict a (1 - alpha) interval of the change gives for one variant: above -margin, below -margin, or
    across it (whatever it says of 0)."""
    if low > -margin:
        return "non-inferior"
    if high < -margin:
        return "worse"
    return "inconclusive"


def drop_within_margin(p_noninferior: float, p_loss: float, alpha: float) -> bool:
    """Non-inferior, yet a real loss (smaller than the margin): `p_loss` is worse_p with no margin."""
    return p_noninferior < alpha / 2 and p_loss < alpha / 2


def questions_for_noninferiority(psi: float, delta: float, margin: float, alpha: float, power: float) -> float:
    """Questions a paired non-inferiority score test needs (Nam 1997): discordance rate `psi`, true change `delta`
    (> -margin), one-sided level `alpha`, `power`. With margin = 0 this is Connor's (1987) McNemar formula."""
    if delta <= -margin:
        raise MMLUError(f"non-inferiority cannot be shown when the true change {delta:+g} is at or below {-margin:+g}")
    p_c, p_b = (psi + delta) / 2, (psi - delta) / 2
    d0 = -margin
    big_b = -p_c - p_b + (2 - p_c + p_b) * d0
    big_c = -p_b * d0 * (1 - d0)
    q0 = (math.sqrt(big_b * big_b - 8 * big_c) - big_b) / 4
    sigma0 = math.sqrt(2 * q0 + d0 * (1 - d0))
    sigma1 = math.sqrt(max(psi - delta**2, 0.0))
    z_alpha, z_power = stats.norm.ppf(1 - alpha), stats.norm.ppf(power)
    return float((z_alpha * sigma0 + z_power * sigma1) ** 2 / (delta + margin) ** 2)


@dataclass(frozen=True)
class QuestionsPlan:
    """How many questions would decide an inconclusive comparison, for which rule, and towards which verdict; no
    number (`questions` None) when none is planned to, with `why`: `exceeds` PLAN_CAP when the plan runs past it,
    None when no number can be planned at all (a change observed exactly at the margin)."""

    questions: int | None
    towards: Verdict
    rule: Rule
    why: str | None = None
    exceeds: int | None = None


def questions_to_decide(
    counts: PairedCounts, margin: float, alpha: float, power: float, comparisons: int = 1, *,
    rule: Rule = "fixed-n", block: int = 200,
) -> QuestionsPlan:  # fmt: skip
    """How many questions would give a verdict with probability `power`, if the discordance were its upper bound.

    A small pilot's observed discordance is too uncertain to plan from (after 114 questions, running the number it
    gives decided only a third to a half of the time): the plan uses the upper end of the discordance rate's
    one-sided 95 % Clopper-Pearson bound, so it is conditional on that rate and errs long. Nor is its observed
    change: planned from it, a pilot that happened to lose a point planned for a loss at the margin (no number, or
    more than MMLU holds) and one that lost two planned towards "worse", so that after a 114-question pilot with no
    true change the sequential rerun decided 68 % of the time, not 80 % (benchmarks/verdicts.py). So the plan is for
    no change, towards non-inferior, unless the data show a loss (the rule's own one-sided test of "no loss" at
    its level: Tango's score test, or the sequential e-process); a loss shown is planned at its observed size,
    towards non-inferior above -margin and towards worse at or below it. Each test is one-sided at alpha / 2,
    split Bonferroni-wise over `comparisons` variants. `rule` is the one the questions will be scored by:
    "fixed-n" (Nam's formula for the score test at the end) or "sequential" (the anytime-valid test looked at after
    every `block`, simulated: it needs more). A loss shown exactly at the margin plans no number: no true change at
    the margin can be decided."""
    if counts.n < 2:
        raise MMLUError(f"{counts.n} question(s) cannot plan a comparison; score at least a few dozen first")
    x, n = counts.discordant, counts.n
    psi = 1.0 if x == n else float(stats.beta.ppf(0.95, x + 1, n - x))  # Clopper-Pearson upper bound
    delta = counts.delta
    level = alpha / 2 / max(comparisons, 1)
    if rule == "sequential":
        tied = counts.both_correct + counts.both_wrong
        lossy = paired_log_e(counts.baseline_only, tied, counts.variant_only, 0.0, side="below") >= -math.log(level)
    else:
        lossy = worse_p(counts) < level
    planned = delta if lossy else 0.0
    towards: Verdict = "non-inferior" if planned > -margin else "worse"
    if planned == -margin:
        return QuestionsPlan(None, towards, rule, f"the observed change equals -margin ({-margin * 100:+.2f} points)")
    too_many = f"the {rule} test would need more than {PLAN_CAP:,} questions"
    if rule == "sequential":
        found = sequential_questions((psi - planned) / 2, (psi + planned) / 2, margin=margin, alpha=level,
                                     power=power, block=block, cap=PLAN_CAP)  # fmt: skip
        return QuestionsPlan(found, towards, rule) if found else QuestionsPlan(None, towards, rule, too_many, PLAN_CAP)
    if towards == "non-inferior":
        needed = questions_for_noninferiority(psi, planned, margin, level, power)
    else:  # mirrored: showing delta < -margin is showing -delta > margin, i.e. non-inferiority at margin -margin
        needed = questions_for_noninferiority(psi, -planned, -margin, level, power)
    if needed > PLAN_CAP:
        return QuestionsPlan(None, towards, rule, too_many, PLAN_CAP)
    return QuestionsPlan(math.ceil(needed), towards, rule)
