"""Statistics of MMLU accuracy: Wilson intervals, the exact McNemar test on paired answers, the report's verdict.

All through scipy. The interval is the Wilson score interval (95 %), which stays inside [0, 1] and behaves on the
small per-subject counts a stratified subset gives; llama-perplexity's own "+/-" is the normal-approximation
standard error and is kept only as a cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

from harness.errors import MMLUError

CONFIDENCE = 0.95
CI_METHOD = "wilson"


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
    baseline_only: int  # baseline right, variant wrong
    variant_only: int  # variant right, baseline wrong
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_correct + self.baseline_only + self.variant_only + self.both_wrong

    @property
    def discordant(self) -> int:
        return self.baseline_only + self.variant_only


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


def paired_delta_interval(counts: PairedCounts, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Normal-approximation interval of the paired accuracy difference (variant - baseline), as fractions."""
    n = counts.n
    if n == 0:
        raise MMLUError("a paired difference needs at least one question")
    delta = (counts.variant_only - counts.baseline_only) / n
    var = (counts.discordant / n - delta**2) / n
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * math.sqrt(max(var, 0.0))
    return delta - half, delta + half


def verdict(delta: float, p_value: float, alpha: float) -> tuple[bool, str]:
    """(significant, text) for the report: 'no significant difference (p=0.41)', 'significant drop (p=0.003)'."""
    text_p = f"p={p_value:.2g}" if p_value < 0.01 else f"p={p_value:.2f}"
    if p_value >= alpha:
        return False, f"no significant difference ({text_p})"
    return True, f"significant {'drop' if delta < 0 else 'gain'} ({text_p})"
