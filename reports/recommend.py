"""Which variant to ship: the 4-bit variant whose quality stays closest to the baseline, and what it buys.

Closeness is judged first by whether MMLU shows a real drop (paired exact McNemar, p below the experiment's alpha,
carried in the results), then by KL
divergence against the baseline (the most sensitive measure), then by the MMLU change; speed and size decide
only between variants that are otherwise equal.
"""

from __future__ import annotations

import math

from reports.model import Recommendation, Results, VariantResult

FOUR_BIT_PREFIXES = ("Q4_", "IQ4_")


def is_four_bit(variant: VariantResult) -> bool:
    return variant.quant_type.upper().startswith(FOUR_BIT_PREFIXES)


def significant_drop(variant: VariantResult) -> bool:
    q = variant.quality
    return bool(q and q.significant and q.delta is not None and q.delta < 0)


def _closeness(variant: VariantResult) -> tuple:
    q = variant.quality
    kld = q.kld_mean if q and q.kld_mean is not None else math.inf
    delta = -(q.delta if q and q.delta is not None else -math.inf)  # smaller drop first
    speed = -(peak_output_tps(variant) or 0.0)
    size = variant.size_bytes or math.inf
    return (significant_drop(variant), kld, delta, speed, size)


def peak_output_tps(variant: VariantResult) -> float | None:
    if not variant.speed or not variant.speed.steps:
        return None
    return max(s.output_tps for s in variant.speed.steps)


def speed_ratio(variant: VariantResult, baseline: VariantResult, users: int) -> float | None:
    if not (variant.speed and baseline.speed):
        return None
    mine, theirs = variant.speed.step(users), baseline.speed.step(users)
    if not mine or not theirs or theirs.output_tps <= 0:
        return None
    return mine.output_tps / theirs.output_tps


def recommend(results: Results) -> Recommendation:
    baseline = results.variant(results.baseline)
    quantized = [v for v in results.variants if not v.is_baseline]
    if baseline is None or not quantized:
        return Recommendation(
            variant=None, headline="Nothing to compare: the run needs a baseline and at least one quantized variant."
        )
    candidates = [v for v in quantized if is_four_bit(v)] or quantized
    measured = [v for v in candidates if v.quality and (v.quality.accuracy is not None or v.quality.kld_mean)]
    if not measured:
        return Recommendation(
            variant=None, headline="No quality results yet: run the MMLU stage before choosing a variant."
        )
    best = min(measured, key=_closeness)
    q = best.quality
    assert q is not None  # measured variants have quality
    details: list[str] = []
    bq = baseline.quality
    if q.accuracy is not None and bq and bq.accuracy is not None:
        verdict = q.verdict or ("a real drop" if significant_drop(best) else "no significant difference")
        details.append(
            f"MMLU {q.accuracy:.2f}% against {bq.accuracy:.2f}% for {baseline.name} "
            f"({q.delta:+.2f} points on the same {q.n_questions} questions: {verdict})."
        )
    if q.kld_mean is not None:
        top = f", same top token {q.same_top_pct:.1f}% of the time" if q.same_top_pct is not None else ""
        details.append(f"KL divergence from {baseline.name}: mean {q.kld_mean:.4f}{top}.")
    steps = [s.users for s in (best.speed.steps if best.speed else [])]
    gains = [(u, speed_ratio(best, baseline, u)) for u in steps]
    gains = [(u, r) for u, r in gains if r is not None]
    if gains:
        parts = ", ".join(f"{r:.2f}x at {u} user{'s' if u > 1 else ''}" for u, r in gains)
        details.append(f"Output tokens/s against {baseline.name}: {parts}.")
    if best.size_bytes and baseline.size_bytes:
        details.append(
            f"File size {best.size_bytes / 2**20:.0f} MiB, {best.size_bytes / baseline.size_bytes:.0%} of "
            f"{baseline.name}" + (f" ({best.bits_per_weight:.2f} bits per weight)." if best.bits_per_weight else ".")
        )
    if significant_drop(best):
        headline = (
            f"No 4-bit variant matches {baseline.name}: every one loses MMLU accuracy beyond noise. "
            f"The closest is {best.name}."
        )
    else:
        headline = f"Ship {best.name}: of the 4-bit variants, its quality stays closest to {baseline.name}"
        ratios = [r for _, r in gains]
        if ratios and min(ratios) >= 1:
            headline += f", and it serves {min(ratios):.2f}-{max(ratios):.2f}x the output tokens/s"
        elif ratios and max(ratios) < 1:
            headline += f"; on this hardware it is slower ({min(ratios):.2f}-{max(ratios):.2f}x the output tokens/s)"
        elif ratios:
            headline += f"; its output tokens/s range from {min(ratios):.2f}x to {max(ratios):.2f}x"
        if best.size_bytes and baseline.size_bytes:
            headline += f" at {best.size_bytes / baseline.size_bytes:.0%} of the size"
        headline += "."
    others = sorted((v for v in measured if v is not best), key=_closeness)
    if others:
        details.append("Next closest: " + ", ".join(v.name for v in others) + ".")
    return Recommendation(variant=best.name, headline=headline, details=details)
