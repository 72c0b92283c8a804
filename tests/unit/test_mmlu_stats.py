"""Accuracy statistics: Wilson intervals, exact McNemar, the verdict, scoring and paired comparison."""

from __future__ import annotations

import math

import pytest

from harness.errors import MMLUError
from mmlu.dataset import Question
from mmlu.results import MMLUResult, compare, score
from mmlu.stats import (
    PairedCounts,
    mcnemar_exact,
    paired_counts,
    paired_delta_interval,
    verdict,
    wilson_interval,
)


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(8, 10), (0, 5), (5, 5), (57, 228), (1, 1)])
def test_wilson_matches_the_formula(k: int, n: int) -> None:
    low, high = wilson_interval(k, n)
    want = _wilson_by_hand(k, n)
    assert low == pytest.approx(want[0], abs=1e-9) and high == pytest.approx(want[1], abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_rejects_impossible_counts() -> None:
    with pytest.raises(MMLUError):
        wilson_interval(0, 0)
    with pytest.raises(MMLUError):
        wilson_interval(3, 2)


def test_mcnemar_exact_values() -> None:
    # 10 questions only the baseline got right, 2 only the variant: 2 * P(X <= 2 | n=12, p=1/2) = 2 * 79 / 4096.
    counts = PairedCounts(both_correct=50, baseline_only=10, variant_only=2, both_wrong=38)
    assert mcnemar_exact(counts) == pytest.approx(158 / 4096)
    assert mcnemar_exact(PairedCounts(5, 0, 0, 5)) == 1.0  # identical answers
    assert mcnemar_exact(PairedCounts(0, 3, 3, 0)) == pytest.approx(1.0)
    assert mcnemar_exact(PairedCounts(0, 1, 0, 0)) == pytest.approx(1.0)


def test_paired_counts_and_delta_interval() -> None:
    base = [True, True, False, False, True]
    var = [True, False, True, False, False]
    counts = paired_counts(base, var)
    assert counts == PairedCounts(both_correct=1, baseline_only=2, variant_only=1, both_wrong=1)
    low, high = paired_delta_interval(counts)
    assert low < -1 / 5 < high
    assert paired_delta_interval(PairedCounts(3, 0, 0, 2)) == (0.0, 0.0)
    with pytest.raises(MMLUError, match="differ in length"):
        paired_counts(base, var[:-1])


def test_verdict_text() -> None:
    assert verdict(-0.01, 0.41, 0.05) == (False, "no significant difference (p=0.41)")
    assert verdict(-0.05, 0.003, 0.05) == (True, "significant drop (p=0.003)")
    assert verdict(0.05, 0.02, 0.05) == (True, "significant gain (p=0.02)")
    assert verdict(0.0, 1.0, 0.05) == (False, "no significant difference (p=1.00)")


def _questions() -> list[Question]:
    return [Question("s1" if i < 6 else "s2", f"q{i}", ("a", "b", "c", "d"), i % 4, i) for i in range(10)]


def _result(name: str, flags: list[bool]) -> MMLUResult:
    final = 100.0 * sum(flags) / len(flags)
    return score(name, _questions(), flags, model=f"{name}.gguf", task_file="abc.bin", tool_final=final,
                 tool_final_sigma=None, random_chance=25.0, wall_time_s=1.0)  # fmt: skip


def test_score_per_subject_and_overall() -> None:
    flags = [True, False, True, True, False, False, True, True, False, True]
    result = _result("F16", flags)
    assert (result.n_questions, result.n_correct, result.accuracy) == (10, 6, 0.6)
    by_subject = {s.subject: s for s in result.subjects}
    assert (by_subject["s1"].n, by_subject["s1"].correct) == (6, 3)
    assert (by_subject["s2"].n, by_subject["s2"].correct) == (4, 3)
    assert (result.ci_low, result.ci_high) == pytest.approx(_wilson_by_hand(6, 10))
    assert [q.correct for q in result.questions] == flags
    assert result.questions[7].id == "s2/7"
    assert MMLUResult.model_validate_json(result.model_dump_json()) == result
    with pytest.raises(MMLUError, match="answers for"):
        score("x", _questions(), flags[:3], model="m", task_file="t", tool_final=0, tool_final_sigma=None,
              random_chance=None, wall_time_s=0)  # fmt: skip


def test_compare_same_answers_is_p_one() -> None:
    flags = [True, False] * 5
    cmp = compare(_result("F16", flags), _result("Q4_0", flags))
    assert (cmp.p_value, cmp.delta, cmp.significant) == (1.0, 0.0, False)
    assert cmp.verdict == "no significant difference (p=1.00)"
    assert all(s.delta == 0 for s in cmp.subjects)


def test_compare_counts_and_subject_deltas() -> None:
    base = [True] * 8 + [False] * 2
    var = [False] * 8 + [False] * 2
    cmp = compare(_result("F16", base), _result("Q4_0", var), alpha=0.05)
    assert (cmp.baseline_only, cmp.variant_only, cmp.both_wrong) == (8, 0, 2)
    assert cmp.p_value == pytest.approx(2 / 256)
    assert cmp.significant and cmp.verdict.startswith("significant drop")
    assert {s.subject: s.delta for s in cmp.subjects} == pytest.approx({"s1": -1.0, "s2": -0.5})


def test_compare_refuses_different_questions() -> None:
    a = _result("F16", [True] * 10)
    b = _result("Q4_0", [True] * 10)
    b.task_file = "other.bin"
    with pytest.raises(MMLUError, match="different questions"):
        compare(a, b)
