"""Which variant to ship: one documented rule (`RULE`), applied to numbers the report shows.

The quality verdicts come with the results (mmlu.results.compare_all: a margin, a paired interval, Holm across the
variants); this module only applies the rule to them and says in plain words what was decided and why.
"""

from __future__ import annotations

import math

from harness.loadtest.summary import StepSummary
from reports.model import Quality, Recommendation, Results, Speed, VariantResult

RULE = (
    "A variant is shipped only with an MMLU verdict against the baseline. Among the variants whose verdict is "
    "non-inferior, the fastest wins: the highest capacity (concurrent users within the latency objectives) when "
    "the run measured it, else the highest output tokens/s at the largest concurrency step; between equally fast "
    "variants, the lower KL divergence where the paired comparison on the same held-out chunks shows it (its "
    "interval of the difference excludes 0), then the smaller file. If no "
    "variant is non-inferior, nothing is shipped: the headline says whether more questions could decide "
    "(inconclusive, with how many) or every variant loses accuracy (worse), and names the variant closest to "
    "the baseline by KL divergence."
)
FOUR_BIT_PREFIXES = ("Q4_", "IQ4_")


def is_four_bit(variant: VariantResult) -> bool:
    return variant.quant_type.upper().startswith(FOUR_BIT_PREFIXES)


def speed_figure(variant: VariantResult) -> tuple[str, float] | None:
    """What "fastest" compares: the capacity within the latency objectives when the run measured one, else the
    output tokens/s at the largest configured step; nothing for a partial load (its figures are not comparable)."""
    speed = variant.speed
    if not speed or not speed.steps or not speed.complete:
        return None
    if speed.capacity is not None:
        return "capacity", float(speed.capacity.low)
    largest = max((s for s in speed.steps if not s.probe), key=lambda s: s.level)
    return f"output tokens/s at {largest.level:g} {speed.unit}", largest.output_tokens_per_s


def kld_better(a: VariantResult, b: VariantResult) -> bool:
    """True when `a`'s KL divergence is shown lower than `b`'s: the paired comparison on the same held-out chunks
    (reports.collect.pair_klds) has an interval of the difference below 0. The only case KLD tells them apart."""
    pair = a.quality.kld_paired.get(b.name) if a.quality else None
    return pair is not None and pair.verdict == "lower"


def choose(candidates: list[VariantResult]) -> VariantResult:
    """The rule's order among non-inferior variants: fastest, then KLD where it separates, then smallest."""
    figures = {v.name: speed_figure(v) for v in candidates}
    best = max((f[1] for f in figures.values() if f), default=None)
    fastest = [v for v in candidates if best is None or (figures[v.name] and figures[v.name][1] == best)]
    unbeaten = [v for v in fastest if not any(kld_better(o, v) for o in fastest if o is not v)]
    return min(unbeaten, key=lambda v: (v.size_bytes if v.size_bytes is not None else math.inf, v.name))


def closest_by_kld(variants: list[VariantResult]) -> tuple[VariantResult | None, list[str]]:
    """The variant with the lowest mean KLD, and the others it is not shown lower than (tied with it)."""
    measured = [v for v in variants if v.quality and v.quality.kld_mean is not None]
    if not measured:
        return None, []
    best = min(measured, key=lambda v: (v.quality.kld_mean, v.name))  # type: ignore[union-attr]
    tied = [v.name for v in measured if v is not best and not kld_better(best, v)]
    return best, tied


def _level(level: float, unit: str) -> str:
    return f"{level:g} {unit[:-1] if level == 1 and unit == 'users' else unit}"


def decided_pass_needs(step: StepSummary) -> str | None:
    """What a decided pass at this step would take: the requests, and the setting that gives them (in flight at the
    end, up to one request per other user cannot count)."""
    n = step.requests_to_decide
    if n is None:
        return None
    if step.rate is not None:
        return f"a decided pass needs at least {n:,} requests within the limits (load.requests_per_step = {n})"
    per_user = math.ceil((n + step.users - 1) / step.users)
    return (f"a decided pass needs at least {n:,} requests within the limits (load.requests_per_user = {per_user} at "
            f"{_level(step.users, 'users')})")  # fmt: skip


def capacity_note(speed: Speed) -> str | None:
    """When a capacity rests on a verdict the anytime-valid test did not decide (it was estimated from the step's
    quantiles when the step ended), which one and what deciding it would take; None when both ends are decided."""
    cap = speed.capacity
    if cap is None:
        return None
    notes = []
    low = speed.step(cap.low) if cap.low else None
    if low is not None and low.slo_basis == "estimated":
        need = decided_pass_needs(low)
        notes.append(f"the pass at {_level(cap.low, speed.unit)} is estimated from {low.requests} requests, not "
                     "decided" + (f": {need}" if need else ""))  # fmt: skip
    high = speed.step(cap.high) if cap.high is not None else None
    if high is not None and high.slo_basis == "estimated":
        notes.append(f"the miss at {_level(cap.high, speed.unit)} is estimated from {high.requests} requests, not "
                     "decided")  # fmt: skip
    return "; ".join(notes) or None


def _ratio_at_largest_step(variant: VariantResult, baseline: VariantResult) -> tuple[float, str] | None:
    if not (variant.speed and baseline.speed and variant.speed.steps):
        return None
    level = max(s.level for s in variant.speed.steps if not s.probe)
    mine, theirs = variant.speed.step(level), baseline.speed.step(level)
    if not mine or not theirs or theirs.output_tokens_per_s <= 0:
        return None
    return mine.output_tokens_per_s / theirs.output_tokens_per_s, f"{level:g} {variant.speed.unit}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def interval_text(q: Quality, alpha: float) -> str:
    """The interval printed beside a verdict: a sequential run's confidence sequence (valid wherever it stopped),
    else Tango's fixed-n interval."""
    shown = q.interval
    if shown is None:
        return "no interval"
    low, high, kind = shown
    if kind == "confidence sequence":
        return f"{100 * (q.cs_confidence or 1 - alpha):.3g}% confidence sequence {low:+.2f} to {high:+.2f}"
    return f"{100 * (1 - alpha):.0f}% interval {low:+.2f} to {high:+.2f}"


def _quality_detail(v: VariantResult, baseline: VariantResult, r: Results) -> str | None:
    q, bq = v.quality, baseline.quality
    if q is None or q.accuracy is None or q.delta is None or bq is None or bq.accuracy is None:
        return None
    interval = interval_text(q, r.alpha)
    return (
        f"{v.name}: MMLU {q.accuracy:.2f}% against {bq.accuracy:.2f}% for {baseline.name} on the same "
        f"{q.n_questions} questions, a change of {q.delta:+.2f} points ({interval}; "
        f"{_plural(q.lost or 0, 'question')} right -> wrong, {q.gained or 0} wrong -> right): {q.verdict}"
        + (", a real loss but within the margin" if q.drop_within_margin else "")
        + f" at a {r.margin_points:g}-point margin."
    )


def _kld_detail(v: VariantResult, baseline: VariantResult) -> str | None:
    q = v.quality
    if q is None or q.kld_mean is None:
        return None
    sigma = f" +/- {q.kld_mean_sigma:.4f}" if q.kld_mean_sigma is not None else ""
    top = f", same top token {q.same_top_pct:.1f}%" if q.same_top_pct is not None else ""
    return f"{v.name}: KL divergence from {baseline.name} {q.kld_mean:.4f}{sigma}{top}."


def recommend(results: Results) -> Recommendation:
    """Apply RULE to `results`."""
    baseline = results.variant(results.baseline)
    others = [v for v in results.variants if not v.is_baseline]
    if baseline is None or not others:
        return Recommendation(
            variant=None, rule=RULE,
            headline="Nothing to compare: the run needs a baseline and at least one quantized variant.",
        )  # fmt: skip
    judged = [v for v in others if v.quality and v.quality.verdict]
    if not judged:
        closest, _ = closest_by_kld(others)
        return Recommendation(
            variant=None, rule=RULE, closest=closest.name if closest else None,
            headline="Nothing to ship yet: no variant has an MMLU verdict against the baseline; run the MMLU stage.",
        )  # fmt: skip
    by_verdict = {
        verdict: [v for v in judged if v.quality.verdict == verdict]  # type: ignore[union-attr]
        for verdict in ("non-inferior", "inconclusive", "worse")
    }
    details = [d for v in judged for d in (_quality_detail(v, baseline, results), _kld_detail(v, baseline)) if d]
    if by_verdict["non-inferior"]:
        best = choose(by_verdict["non-inferior"])
        headline = _ship_headline(best, baseline, results)
        for v in (best, baseline):
            if v.speed and (note := capacity_note(v.speed)):
                details.append(f"{v.name}'s capacity: {note}.")
        rest = [v.name for v in by_verdict["non-inferior"] if v is not best]
        if rest:
            details.append("Also non-inferior, but " + ("slower, tied with more KL divergence, or larger: ") +
                           ", ".join(rest) + ".")  # fmt: skip
        return Recommendation(variant=best.name, headline=headline, details=details, rule=RULE)
    closest, tied = closest_by_kld(judged)
    closest_text = ""
    if closest is not None:
        closest_text = f" The closest to {baseline.name} by KL divergence is {closest.name}"
        closest_text += f" (not shown closer than {', '.join(tied)})." if tied else "."
    if by_verdict["inconclusive"]:
        undecided = by_verdict["inconclusive"]
        # A number of questions that would decide, unless more questions of this test cannot (then: why not).
        plans = [q for v in undecided if (q := v.quality) and q.questions_needed and not q.cannot_decide]
        most = max(plans, key=lambda q: q.questions_needed or 0, default=None)
        sizes = sorted({v.quality.n_questions or 0 for v in undecided if v.quality})
        on = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,} to {sizes[-1]:,}"
        verdicts = (
            f"{', '.join(v.name for v in undecided)} {'is' if len(undecided) == 1 else 'are'} inconclusive at a "
            f"{results.margin_points:g}-point margin on {on} questions"
        )

        # Why no number is given, for the first variant it applies to (named when several are undecided).
        def why(field: str) -> str | None:
            text = next(((v.name, t) for v in undecided if v.quality and (t := getattr(v.quality, field))), None)
            return None if text is None else (text[1] if len(undecided) == 1 else f"{text[0]}: {text[1]}")

        no_plan, cannot = why("no_plan"), why("cannot_decide")
        if most is not None:
            rule = f" with the {most.needed_rule} test" if most.needed_rule else ""
            available = most.questions_available
            short = (f" (more than the {available:,} MMLU holds: all of them decide it less often)"
                     if available and (most.questions_needed or 0) > available else "")  # fmt: skip
            headline = (f"Nothing to ship yet: not enough questions to decide. {verdicts}; about "
                        f"{most.questions_needed:,} would decide{rule}{short}.")  # fmt: skip
        elif no_plan:
            headline = f"Nothing to ship yet: not enough questions to decide. {verdicts}; {no_plan}."
        else:
            headline = f"Nothing to ship: MMLU cannot decide. {verdicts}" + (f"; {cannot}." if cannot else ".")
        headline += closest_text
        if by_verdict["worse"]:
            details.append("Worse than the baseline: " + ", ".join(v.name for v in by_verdict["worse"]) + ".")
    else:
        headline = (
            f"Nothing to ship: every variant loses MMLU accuracy against {baseline.name} "
            f"({', '.join(v.name for v in by_verdict['worse'])})." + closest_text
        )
    return Recommendation(
        variant=None, headline=headline, details=details, rule=RULE, closest=closest.name if closest else None
    )


def _ship_headline(best: VariantResult, baseline: VariantResult, results: Results) -> str:
    q = best.quality
    assert q is not None and q.delta is not None  # a non-inferior variant has its comparison
    kind = f"{best.quant_type}, 4-bit" if is_four_bit(best) else best.quant_type
    headline = (
        f"Ship {best.name} ({kind}): non-inferior to {baseline.name} on MMLU (a change of {q.delta:+.2f} points, "
        f"{interval_text(q, results.alpha)}, margin {results.margin_points:g})"
    )
    mine, theirs = best.speed.capacity if best.speed else None, baseline.speed.capacity if baseline.speed else None
    ratio = _ratio_at_largest_step(best, baseline)
    if mine is not None and theirs is not None:
        if mine.unit == "users":
            what = f"{mine.low:g} concurrent {'user' if mine.low == 1 else 'users'}"
        else:
            what = f"{mine.low:g} requests/s"
        # A capacity resting on a verdict the test did not decide is marked so (the details say which and why).
        estimated = {v.name: " (estimated)" if v.speed and capacity_note(v.speed) else "" for v in (best, baseline)}
        headline += (f", and it serves {what}{estimated[best.name]} within the latency objectives against "
                     f"{theirs.low:g}{estimated[baseline.name]} for {baseline.name}")  # fmt: skip
    elif ratio is not None:
        value, at = ratio
        if value >= 1:
            headline += f", and it serves {value:.2f}x the output tokens/s of {baseline.name} at {at}"
        else:
            headline += f"; on this hardware it is slower: {value:.2f}x the output tokens/s of {baseline.name} " \
                        f"at {at}"  # fmt: skip
    if best.size_bytes and baseline.size_bytes:
        headline += f", at {best.size_bytes / baseline.size_bytes:.0%} of the size"
    return headline + "."
