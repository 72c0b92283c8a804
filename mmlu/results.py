"""Typed records of the quality stage and the pure functions that fill them.

`score` turns per-question correctness into a variant's `MMLUResult`; `compare_all` pairs every variant with the
baseline on the same questions (paired interval, non-inferiority and worse tests, Holm across variants, the
three-way verdict); `KLDResult` carries the KL-divergence statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from bench.sequential import paired_interval
from harness.errors import MMLUError
from harness.kld import KLDStats
from harness.records import Record, StageRecord
from mmlu import stats
from mmlu.dataset import Question
from mmlu.multiple_choice import MultipleChoicePlan


class QuestionResult(Record):
    id: str  # "<subject>/<position within the subject in the source>"
    subject: str
    answer: int
    correct: bool


class SubjectAccuracy(Record):
    subject: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float


class SequentialRun(Record):
    """How a variant's sequential MMLU run ended: its anytime-valid verdict, the questions it used of the budget, and
    its e-processes against each null (a verdict when one reached `threshold`)."""

    verdict: stats.Verdict
    questions_used: int
    questions_budget: int
    block_questions: int
    margin: float
    alpha: float  # the one-sided level of each test (alpha / 2, Bonferroni over `comparisons`)
    comparisons: int
    e_non_inferior: float
    e_worse: float

    @property
    def threshold(self) -> float:
        return 1 / self.alpha

    @property
    def saved(self) -> int:
        return self.questions_budget - self.questions_used


class MMLUResult(StageRecord):
    """One variant's MMLU run: per-question correctness, per-subject and overall accuracy (fractions, Wilson 95 %)."""

    variant: str
    model: str
    task_file: str  # the task file's name: its content hash
    n_questions: int
    n_correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    subjects: list[SubjectAccuracy]
    questions: list[QuestionResult]
    # llama-perplexity's own final line (percent, normal-approximation sigma), checked equal to `accuracy`
    tool_final: float
    tool_final_sigma: float | None
    random_chance: float | None
    wall_time_s: float
    ci_method: str = stats.CI_METHOD
    confidence: float = stats.CONFIDENCE
    plan: MultipleChoicePlan | None = None
    selection: dict[str, Any] = Field(default_factory=dict)
    build: dict[str, Any] = Field(default_factory=dict)
    sequential: SequentialRun | None = None  # a variant of a sequential run: how it stopped

    @property
    def correct_flags(self) -> list[bool]:
        return [q.correct for q in self.questions]


def score(
    variant: str,
    questions: Sequence[Question],
    correct: Sequence[bool],
    *,
    model: str,
    task_file: str,
    tool_final: float,
    tool_final_sigma: float | None,
    random_chance: float | None,
    wall_time_s: float,
    plan: MultipleChoicePlan | None = None,
    selection: Mapping[str, Any] | None = None,
    build: Mapping[str, Any] | None = None,
) -> MMLUResult:
    """Per-question correctness (task-file order) -> per-subject and overall accuracy with Wilson intervals."""
    if len(questions) != len(correct):
        raise MMLUError(f"{len(correct)} answers for {len(questions)} questions")
    if not questions:
        raise MMLUError("no questions were scored")
    per_subject: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct, strict=True):
        per_subject.setdefault(q.subject, []).append(bool(ok))
    subjects = []
    for subject in sorted(per_subject):
        flags = per_subject[subject]
        low, high = stats.wilson_interval(sum(flags), len(flags))
        subjects.append(
            SubjectAccuracy(
                subject=subject,
                n=len(flags),
                correct=sum(flags),
                accuracy=sum(flags) / len(flags),
                ci_low=low,
                ci_high=high,
            )
        )
    n_correct = sum(bool(c) for c in correct)
    low, high = stats.wilson_interval(n_correct, len(correct))
    return MMLUResult(
        variant=variant, model=model, task_file=task_file, n_questions=len(correct), n_correct=n_correct,
        accuracy=n_correct / len(correct), ci_low=low, ci_high=high, subjects=subjects,
        questions=[
            QuestionResult(id=q.id, subject=q.subject, answer=q.answer, correct=bool(c))
            for q, c in zip(questions, correct, strict=True)
        ],
        tool_final=tool_final, tool_final_sigma=tool_final_sigma, random_chance=random_chance,
        wall_time_s=wall_time_s, plan=plan, selection=dict(selection or {}), build=dict(build or {}),
    )  # fmt: skip


class SubjectDelta(Record):
    """One subject's change against the baseline, with its flips (descriptive: too few questions to test)."""

    subject: str
    n: int
    baseline_accuracy: float
    variant_accuracy: float
    delta: float
    lost: int = 0  # right -> wrong: the baseline answered right, the variant wrong
    gained: int = 0  # wrong -> right


class Comparison(Record):
    """A variant against the baseline on the same questions: the change with its paired interval, the
    non-inferiority and worse tests (Holm-adjusted across the variants), the verdict, and what would decide it."""

    variant: str
    baseline: str
    n_questions: int
    baseline_accuracy: float
    variant_accuracy: float
    delta: float  # variant - baseline, fraction
    delta_ci_low: float  # Tango score interval at `confidence` (unadjusted): a fixed-n interval
    delta_ci_high: float
    confidence: float
    # A sequential run: the confidence sequence of its own e-processes at the stop (valid wherever it stopped, at
    # `cs_confidence` = 1 - 2 x each test's level), the interval beside its verdict.
    cs_low: float | None = None
    cs_high: float | None = None
    cs_confidence: float | None = None
    both_correct: int
    baseline_only: int  # right -> wrong flips
    variant_only: int  # wrong -> right flips
    both_wrong: int
    margin: float  # the largest accepted loss, fraction
    alpha: float
    power: float
    comparisons: int  # variants compared with the baseline: the Holm family
    p_noninferior: float  # one-sided score test of delta <= -margin, before adjustment
    p_worse: float  # one-sided score test of delta >= -margin, before adjustment
    p_noninferior_adjusted: float  # Holm
    p_worse_adjusted: float
    mcnemar_p: float  # exact McNemar, two-sided, unadjusted (the classic test of "any difference")
    verdict: stats.Verdict  # the sequential test's when the run was sequential, else Tango's
    fixed_n_verdict: stats.Verdict | None = None  # Tango's, on the questions answered
    sequential: SequentialRun | None = None
    drop_within_margin: bool  # a real loss, but smaller than the margin
    questions_needed: int | None = None  # inconclusive: questions that would decide at `power`
    needed_for: stats.Verdict | None = None  # the verdict those questions would most likely give
    needed_rule: stats.Rule | None = None  # the rule they are planned for: the one the run uses
    needed_why: str | None = None  # inconclusive with no number planned: why
    needed_exceeds: int | None = None  # ... because the plan runs past this many questions
    subjects: list[SubjectDelta]
    method: str = stats.PAIRED_METHOD


def _check_paired(baseline: MMLUResult, variant: MMLUResult) -> None:
    """The variant answered the baseline's questions, or (a sequential run that stopped early) their first ones."""
    ids = [q.id for q in variant.questions]
    if variant.sequential is None and baseline.task_file != variant.task_file:
        ids = []
    if not ids or ids != [q.id for q in baseline.questions[: len(ids)]]:
        raise MMLUError(
            f"{variant.variant} and {baseline.variant} were scored on different questions "
            f"({variant.task_file} vs {baseline.task_file}); re-run the MMLU stage"
        )


def _prefix(baseline: MMLUResult, n: int) -> list[bool]:
    return baseline.correct_flags[:n]


def _subject_deltas(baseline: MMLUResult, variant: MMLUResult) -> list[SubjectDelta]:
    base_questions = baseline.questions[: variant.n_questions]
    base_subjects = {}
    for q in base_questions:
        done, right = base_subjects.get(q.subject, (0, 0))
        base_subjects[q.subject] = (done + 1, right + q.correct)
    flips: dict[str, list[int]] = {}
    for b, v in zip(base_questions, variant.questions, strict=True):
        lost_gained = flips.setdefault(b.subject, [0, 0])
        lost_gained[0] += b.correct and not v.correct
        lost_gained[1] += v.correct and not b.correct
    out = []
    for s in variant.subjects:
        n, right = base_subjects[s.subject]
        out.append(
            SubjectDelta(
                subject=s.subject,
                n=s.n,
                baseline_accuracy=right / n,
                variant_accuracy=s.accuracy,
                delta=s.accuracy - right / n,
                lost=flips[s.subject][0],
                gained=flips[s.subject][1],
            )
        )
    return out  # fmt: skip


def compare_all(
    baseline: MMLUResult, variants: Sequence[MMLUResult], *, alpha: float, margin: float, power: float
) -> dict[str, Comparison]:
    """Every variant against the baseline on the same questions; the verdicts are Holm-adjusted across them.

    `margin` is a fraction of accuracy (1 point = 0.01).
    """
    variants = [v for v in variants if v.variant != baseline.variant and v.n_questions > 0]
    for variant in variants:
        _check_paired(baseline, variant)
    counts = [stats.paired_counts(_prefix(baseline, v.n_questions), v.correct_flags) for v in variants]
    p_ni = [stats.noninferiority_p(c, margin) for c in counts]
    p_worse = [stats.worse_p(c, margin) for c in counts]
    p_loss = [stats.worse_p(c) for c in counts]
    ni_adjusted, worse_adjusted, loss_adjusted = stats.holm(p_ni), stats.holm(p_worse), stats.holm(p_loss)
    comparisons = {}
    for i, (variant, c) in enumerate(zip(variants, counts, strict=True)):
        low, high = stats.paired_delta_interval(c, 1 - alpha)
        fixed_n = stats.verdict(ni_adjusted[i], worse_adjusted[i], alpha)
        # A sequential run's verdict is its anytime-valid test's (valid wherever it stopped); Tango's fixed-n
        # verdict is kept beside it (valid as such only for a run that answered every question).
        seq = variant.sequential
        verdict = seq.verdict if seq else fixed_n
        cs = paired_interval(c.baseline_only, c.both_correct + c.both_wrong, c.variant_only, seq.alpha) if seq else None
        plan = None
        if verdict == "inconclusive" and c.n >= 2:
            plan = stats.questions_to_decide(
                c, margin, alpha, power, comparisons=len(variants), rule="sequential" if seq else "fixed-n",
                block=seq.block_questions if seq else 200,
            )  # fmt: skip
        comparisons[variant.variant] = Comparison(
            variant=variant.variant, baseline=baseline.variant, n_questions=c.n,
            baseline_accuracy=baseline.accuracy, variant_accuracy=variant.accuracy, delta=c.delta,
            delta_ci_low=low, delta_ci_high=high, confidence=1 - alpha, both_correct=c.both_correct,
            baseline_only=c.baseline_only, variant_only=c.variant_only, both_wrong=c.both_wrong, margin=margin,
            alpha=alpha, power=power, comparisons=len(variants), p_noninferior=p_ni[i], p_worse=p_worse[i],
            p_noninferior_adjusted=ni_adjusted[i], p_worse_adjusted=worse_adjusted[i],
            mcnemar_p=stats.mcnemar_exact(c), verdict=verdict, fixed_n_verdict=fixed_n,
            sequential=seq, cs_low=cs[0] if cs else None, cs_high=cs[1] if cs else None,
            cs_confidence=1 - 2 * seq.alpha if seq else None,
            drop_within_margin=stats.drop_within_margin(ni_adjusted[i], loss_adjusted[i], alpha),
            questions_needed=plan.questions if plan else None, needed_for=plan.towards if plan else None,
            needed_rule=plan.rule if plan else None, needed_why=plan.why if plan else None,
            needed_exceeds=plan.exceeds if plan else None,
            subjects=_subject_deltas(baseline, variant),
        )  # fmt: skip
    return comparisons


class KLDResult(StageRecord):
    """A variant's KL divergence against the baseline over the KLD corpus."""

    variant: str
    baseline: str
    model: str
    corpus: str
    ctx_size: int
    stats: KLDStats


class QualityResults(Record):
    """Everything the quality stage produced, keyed by variant name."""

    baseline: str
    mmlu: dict[str, MMLUResult]
    comparisons: dict[str, Comparison]
    kld: dict[str, KLDResult]
