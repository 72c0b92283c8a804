"""Typed records of the quality stage and the pure functions that fill them.

`score` turns per-question correctness into a variant's `MMLUResult`; `compare` pairs a variant with the baseline
on the same questions (exact McNemar test); `KLDResult` carries the KL-divergence statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from harness.errors import MMLUError
from harness.records import Record, StageRecord
from mmlu import stats
from mmlu.dataset import Question
from mmlu.kld import KLDStats
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
    subject: str
    n: int
    baseline_accuracy: float
    variant_accuracy: float
    delta: float


class Comparison(Record):
    """A variant against the baseline on the same questions: accuracy delta and the exact McNemar test."""

    variant: str
    baseline: str
    n_questions: int
    baseline_accuracy: float
    variant_accuracy: float
    delta: float  # variant - baseline, fraction
    delta_ci_low: float  # normal approximation for paired proportions, 95 %
    delta_ci_high: float
    both_correct: int
    baseline_only: int  # baseline right, variant wrong
    variant_only: int
    both_wrong: int
    p_value: float  # exact McNemar (binomial test on the discordant pairs), two-sided
    alpha: float
    significant: bool
    verdict: str
    subjects: list[SubjectDelta]
    test: str = "exact McNemar (scipy.stats.binomtest on discordant pairs), two-sided"


def compare(baseline: MMLUResult, variant: MMLUResult, *, alpha: float = 0.05) -> Comparison:
    """Pair two results question by question; they must come from the same task file."""
    if baseline.task_file != variant.task_file or [q.id for q in baseline.questions] != [
        q.id for q in variant.questions
    ]:
        raise MMLUError(
            f"{variant.variant} and {baseline.variant} were scored on different questions "
            f"({variant.task_file} vs {baseline.task_file}); re-run the MMLU stage"
        )
    counts = stats.paired_counts(baseline.correct_flags, variant.correct_flags)
    delta = variant.accuracy - baseline.accuracy
    low, high = stats.paired_delta_interval(counts)
    p = stats.mcnemar_exact(counts)
    significant, text = stats.verdict(delta, p, alpha)
    base_subjects = {s.subject: s for s in baseline.subjects}
    subjects = [
        SubjectDelta(subject=s.subject, n=s.n, baseline_accuracy=base_subjects[s.subject].accuracy,
                     variant_accuracy=s.accuracy, delta=s.accuracy - base_subjects[s.subject].accuracy)
        for s in variant.subjects
    ]  # fmt: skip
    return Comparison(
        variant=variant.variant, baseline=baseline.variant, n_questions=counts.n,
        baseline_accuracy=baseline.accuracy, variant_accuracy=variant.accuracy, delta=delta,
        delta_ci_low=low, delta_ci_high=high, both_correct=counts.both_correct, baseline_only=counts.baseline_only,
        variant_only=counts.variant_only, both_wrong=counts.both_wrong, p_value=p, alpha=alpha,
        significant=significant, verdict=text, subjects=subjects,
    )  # fmt: skip


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
