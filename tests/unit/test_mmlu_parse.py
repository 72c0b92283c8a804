"""Parsers of llama-perplexity output, on output captured from the real binaries of both eras (tests/data/mmlu).

The captures come from tests/data/mmlu/capture.py: 8 invented tasks answered right, wrong, right, wrong, ...
by SmolLM2-135M, a task too long for its context, and a KL-divergence run of a Q4_0 re-quantization.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import MMLUError
from harness.kld import paired_kld, parse_kld_output, parse_ppl_output
from harness.tools import strip_log_prefix
from mmlu.multiple_choice import (
    MultipleChoiceOutput,
    check_against_final,
    correctness_from_running,
    parse_multiple_choice_output,
    task_line,
)

DATA = Path(__file__).parents[1] / "data" / "mmlu"
ERAS = ["current", "legacy"]
# What the capture's model answered, task by task (see capture.py: labels 2, 4, 6 and 7 point at noise).
EXPECTED = [True, False, True, False, True, False, False, True]


def _read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("era", ERAS)
def test_multiple_choice_output(era: str) -> None:
    output = parse_multiple_choice_output(_read(f"mc-{era}.txt"))
    assert len(output.running) == 8
    assert output.running[:3] == [100.0, 50.0, 66.66666667]
    assert (output.final, output.final_sigma, output.random_chance) == (50.0, 18.8982, 25.0)
    assert output.problems == []


@pytest.mark.parametrize("era", ERAS)
def test_per_question_recovery_matches_the_final_line(era: str) -> None:
    output = parse_multiple_choice_output(_read(f"mc-{era}.txt"))
    correct = correctness_from_running(output.running)
    assert correct == EXPECTED
    check_against_final(correct, output)  # raises if the recovered answers disagree with the tool
    with pytest.raises(MMLUError, match="differs from llama-perplexity's final"):
        check_against_final([not c for c in correct[:1]] + correct[1:], output)


@pytest.mark.parametrize("era", ERAS)
def test_too_long_task_is_reported(era: str) -> None:
    output = parse_multiple_choice_output(_read(f"mc-too-long-{era}.txt"))
    assert output.final is None and len(output.running) == 1
    assert any("does not fit in the context window" in p for p in output.problems)
    with pytest.raises(MMLUError, match="no 'Final result'"):
        check_against_final([True], output)


def test_recovery_rejects_inconsistent_lines() -> None:
    with pytest.raises(MMLUError, match="inconsistent"):
        correctness_from_running([100.0, 100.0, 33.33333333])  # 3 right -> 1 right is impossible
    with pytest.raises(MMLUError, match="inconsistent"):
        correctness_from_running([50.0])  # half a question
    # Large N: one more right answer moves the percentage by far more than the 8 printed decimals resolve.
    running = [100.0 * (n // 2) / n for n in range(1, 14043)]
    flags = correctness_from_running(running)
    assert sum(flags) == 14042 // 2 and flags[:4] == [False, True, False, True]


def test_task_numbers_must_follow_each_other() -> None:
    with pytest.raises(MMLUError, match="task 3 after task 1"):
        parse_multiple_choice_output("task\tacc_norm\n1\t100.00000000\n3\t100.00000000\n")


def test_task_lines_only_after_the_header() -> None:
    text = "7\t12.5\ntask\tacc_norm\n1\t0.00000000\n\n Final result: 0.0000 +/- nan\n"
    output = parse_multiple_choice_output(text)
    assert output.running == [0.0] and output.final == 0.0
    assert output.final_sigma is None  # nan: one task has no spread
    assert task_line("12\t41.66666667") == (12, 41.66666667) and task_line("[1]12.3,") is None
    assert strip_log_prefix("0.13.645.535 I Final result: 1") == "Final result: 1"
    assert isinstance(output, MultipleChoiceOutput)


@pytest.mark.parametrize("era", ERAS)
def test_kld_output(era: str) -> None:
    stats = parse_kld_output(_read(f"kld-{era}.txt"))
    assert stats.chunks == 3
    assert 0.3 < stats.mean_kld < 0.4 and stats.mean_kld_sigma is not None and 0 < stats.mean_kld_sigma < 0.05
    assert stats.kld_median < stats.kld_p99 < stats.kld_max
    assert 0.6 < stats.same_top_p < 0.7 and stats.same_top_p_sigma == pytest.approx(0.034, abs=0.002)
    assert stats.ppl_ratio == pytest.approx(stats.ppl / stats.ppl_base, rel=1e-4)
    assert 0.1 < stats.rms_delta_p < 0.2
    # "RMS Δp    : 13.604 ± 1.412 %" (current) and "13.318 ± 1.365 %" (b3661 era): the +/- comes along, as a fraction.
    assert stats.rms_delta_p_sigma == pytest.approx(0.01412 if era == "current" else 0.01365)
    if era == "current":
        assert (stats.mean_kld, stats.kld_p99, stats.same_top_p) == pytest.approx((0.328612, 1.043873, 0.66138))
    else:  # b3661 prints "99.0%   KLD" twice (where 95 % should be): the first one is the 99th percentile
        assert (stats.mean_kld, stats.kld_p99, stats.same_top_p) == pytest.approx((0.325944, 1.110475, 0.67196))


@pytest.mark.parametrize("era", ERAS)
def test_per_chunk_kld_is_recovered_from_the_running_means(era: str) -> None:
    # The captured lines' KLD column (running means after chunks 1, 2, 3): current 0.36660, 0.33108, 0.32861;
    # b3661 era 0.35807, 0.32795, 0.32594. Chunk k = k m_k - (k - 1) m_(k-1).
    stats = parse_kld_output(_read(f"kld-{era}.txt"))
    expected = {"current": [0.36660, 0.29556, 0.32367], "legacy": [0.35807, 0.29783, 0.32192]}[era]
    assert stats.chunk_kld == pytest.approx(expected, abs=1e-9)
    # Their mean is the last running mean, which the final "Mean KLD" line repeats to one more decimal.
    assert sum(stats.chunk_kld) / 3 == pytest.approx(stats.mean_kld, abs=1e-5)


def test_chunks_missing_a_kld_column_give_no_per_chunk_values() -> None:
    lines = [ln for ln in _read("kld-current.txt").splitlines() if not ln.lstrip().startswith("2 ")]
    assert parse_kld_output("\n".join(lines)).chunk_kld == []


def test_paired_kld_matches_students_sleep_data() -> None:
    # R's worked example, t.test(extra ~ group, data = sleep, paired = TRUE): mean difference -1.58, t = -4.0621,
    # df = 9, 95 percent confidence interval -2.4598858 -0.7001142 (Cushny and Peebles' data as Student used it).
    drug1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    pair = paired_kld(drug1, drug2, alpha=0.05)
    assert pair is not None and pair.chunks == 10 and pair.difference == pytest.approx(-1.58)
    assert (pair.ci_low, pair.ci_high) == pytest.approx((-2.4598858, -0.7001142), abs=1e-7)
    assert pair.verdict == "lower" and paired_kld(drug2, drug1, alpha=0.05).verdict == "higher"  # type: ignore[union-attr]
    # An interval that reaches past 0: no difference shown; fewer than 2 chunks: nothing to say.
    assert paired_kld([0.1, 0.3, 0.2], [0.2, 0.2, 0.2], alpha=0.05).verdict == "no different"  # type: ignore[union-attr]
    assert paired_kld([0.1], [0.2], alpha=0.05) is None
    # The same difference on every chunk has no spread: the interval is that difference.
    same = paired_kld([0.1, 0.2, 0.3], [0.2, 0.3, 0.4], alpha=0.05)
    assert same is not None and same.ci_low == same.ci_high == pytest.approx(-0.1) and same.verdict == "lower"


@pytest.mark.parametrize("era", ERAS)
def test_kld_base_perplexity(era: str) -> None:
    ppl, sigma = parse_ppl_output(_read(f"kld-base-{era}.txt"))
    assert ppl == {"current": 41.7614, "legacy": 41.6842}[era] and sigma > 0


def test_kld_nan_uncertainty_becomes_none() -> None:
    # A model against itself: no spread in the PPL ratio, which llama-perplexity prints as nan.
    text = _read("kld-current.txt").replace("1.298817 ±   0.086649", "1.000003 ±        nan")
    stats = parse_kld_output(text)
    assert stats.ppl_ratio == 1.000003 and stats.ppl_ratio_sigma is None


def test_kld_failures_are_clear() -> None:
    with pytest.raises(MMLUError, match="no statistics"):
        parse_kld_output(_read("mc-current.txt"))
    with pytest.raises(MMLUError, match="no final perplexity"):
        parse_ppl_output(_read("mc-current.txt"))
