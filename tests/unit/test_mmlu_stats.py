"""Accuracy statistics: Wilson intervals, exact McNemar, the paired interval and tests against published worked
examples, the sample size, Holm, the three-way verdict, scoring and the paired comparison of several variants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from bench.sequential import PairedMargin, paired_interval
from harness.errors import MMLUError
from mmlu.dataset import Question
from mmlu.results import MMLUResult, compare_all, score
from mmlu.stats import (
    PLAN_CAP,
    PairedCounts,
    QuestionsPlan,
    holm,
    mcnemar_exact,
    noninferiority_p,
    paired_counts,
    paired_delta_interval,
    questions_for_noninferiority,
    questions_to_decide,
    verdict,
    verdict_of_interval,
    wilson_interval,
    worse_p,
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
    assert counts.delta == pytest.approx(-1 / 5)
    low, high = paired_delta_interval(counts)
    assert -1 <= low < -1 / 5 < high <= 1
    # No disagreement: the interval is centred on 0 and narrows with more questions.
    few, many = paired_delta_interval(PairedCounts(3, 0, 0, 2)), paired_delta_interval(PairedCounts(300, 0, 0, 200))
    assert few[0] == pytest.approx(-few[1]) and 0 < many[1] < few[1]


# Tango's score interval for the paired difference, against the values published for it. The sources give the
# 2x2 table as (n11, n12, n21, n22) with theta = (n12 - n21) / N; here n12 is "variant right only" (c) and n21
# "baseline right only" (b), so theta is our delta.
@pytest.mark.parametrize(
    ("n11", "n12", "n21", "n22", "low", "high", "places"),
    [
        # Fagerland, Lydersen & Laake (2014), Stat Med 33:2850, Table II data (Bentur et al.): Tango -0.5172 -0.0260.
        (1, 1, 7, 12, -0.5172, -0.0260, 4),
        # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017) ch. 8 (Cavo et al.).
        (59, 6, 16, 80, -0.1240, -0.0054, 4),
        # PSIAIMS/CAMIS "CI for paired proportions" (SAS %PAIRBINCI), artificial data: 0.000419 to 0.377185.
        (20, 15, 6, 5, 0.000419, 0.377185, 6),
    ],
)
def test_tango_interval_matches_published_examples(n11, n12, n21, n22, low, high, places) -> None:
    counts = PairedCounts(both_correct=n11, baseline_only=n21, variant_only=n12, both_wrong=n22)
    got = paired_delta_interval(counts, 0.95)
    assert round(got[0], places) == pytest.approx(low, abs=10**-places)
    assert round(got[1], places) == pytest.approx(high, abs=10**-places)


def test_the_score_tests_are_the_intervals_duals() -> None:
    counts = PairedCounts(both_correct=20, baseline_only=6, variant_only=15, both_wrong=5)
    low, high = paired_delta_interval(counts, 0.95)
    # The one-sided non-inferiority p at a margin equal to -low is exactly alpha / 2 = 0.025 ...
    assert noninferiority_p(counts, -low) == pytest.approx(0.025, abs=1e-9)
    # ... and the "worse" test turns significant only when the whole interval is below 0.
    assert worse_p(counts) > 0.5 and high > 0
    losing = PairedCounts(both_correct=1, baseline_only=7, variant_only=1, both_wrong=12)
    assert paired_delta_interval(losing)[1] < 0 and worse_p(losing) < 0.025


def test_sample_size_matches_published_examples() -> None:
    # Connor (1987), Biometrics 43:207, p. 209: p10 = 0.45, p01 = 0.05, one-sided alpha 0.05, power 0.90 -> 22.81.
    # Nam's non-inferiority formula with no margin is Connor's formula.
    assert questions_for_noninferiority(0.50, 0.40, 0.0, 0.05, 0.90) == pytest.approx(22.80907053, abs=1e-6)
    # Chow, Shao & Wang, Sample Size Calculations in Clinical Research, Example (McNemar): p01 = 0.2, p10 = 0.5,
    # two-sided alpha 0.05, power 0.8 -> 59 pairs.
    assert math.ceil(questions_for_noninferiority(0.70, 0.30, 0.0, 0.025, 0.80)) == 59
    # A margin lowers what is needed; no margin left (true loss at the margin) is refused.
    assert questions_for_noninferiority(0.2, 0.0, 0.05, 0.025, 0.8) < questions_for_noninferiority(
        0.2, 0.0, 0.03, 0.025, 0.8
    )
    with pytest.raises(MMLUError, match="cannot be shown"):
        questions_for_noninferiority(0.2, -0.05, 0.05, 0.025, 0.8)


def test_questions_to_decide_leans_the_way_the_data_do() -> None:
    even = PairedCounts(both_correct=40, baseline_only=5, variant_only=5, both_wrong=50)  # no change, 10% disagree
    plan = questions_to_decide(even, margin=0.01, alpha=0.05, power=0.8)
    needed, towards = plan.questions, plan.towards
    # Planned from the discordance's one-sided 95 % Clopper-Pearson upper bound (10 of 100: 16.4 %, the upper end of
    # statsmodels' two-sided 90 % "beta" interval), not the observed 10 %: a pilot this small cannot pin it down.
    upper = stats.beta.ppf(0.95, 11, 90)
    assert upper == pytest.approx(proportion_confint(10, 100, alpha=0.10, method="beta")[1], rel=1e-9)
    assert upper == pytest.approx(0.1637, abs=1e-4)
    assert towards == "non-inferior" and plan.rule == "fixed-n"
    assert needed == math.ceil(questions_for_noninferiority(upper, 0.0, 0.01, 0.025, 0.8))
    assert needed > math.ceil(questions_for_noninferiority(0.1, 0.0, 0.01, 0.025, 0.8))
    # More variants against the same baseline: a stricter level, more questions.
    assert questions_to_decide(even, margin=0.01, alpha=0.05, power=0.8, comparisons=3).questions > needed
    # An observed gain is not counted on: planned as no change, it needs as many questions as an even split.
    gaining = PairedCounts(both_correct=40, baseline_only=3, variant_only=7, both_wrong=50)  # +4 points
    assert questions_to_decide(gaining, margin=0.01, alpha=0.05, power=0.8) == plan
    # Nor is an observed loss the data do not show (its one-sided test of "no loss" not rejected): a pilot that lost
    # a point or six by chance is planned as no change, towards non-inferior (from the 10 % discordant of 100).
    slipping = PairedCounts(both_correct=40, baseline_only=6, variant_only=5, both_wrong=49)  # -1 point
    losing = PairedCounts(both_correct=40, baseline_only=9, variant_only=3, both_wrong=48)  # -6 points
    assert worse_p(slipping) > 0.025 and worse_p(losing) > 0.025
    for chance in (slipping, losing):
        upper = stats.beta.ppf(0.95, chance.discordant + 1, 100 - chance.discordant)
        at_no_change = questions_for_noninferiority(upper, 0.0, 0.01, 0.025, 0.8)
        assert questions_to_decide(chance, margin=0.01, alpha=0.05, power=0.8) == QuestionsPlan(
            math.ceil(at_no_change), "non-inferior", "fixed-n"
        )
    # A loss shown is planned at its size: within the margin it needs more than no change; beyond it, towards worse.
    shown = PairedCounts(both_correct=9000, baseline_only=1100, variant_only=900, both_wrong=9000)  # -1 of 2 points
    assert worse_p(shown) < 0.025
    assert (
        questions_to_decide(shown, margin=0.02, alpha=0.05, power=0.8).questions
        > questions_to_decide(PairedCounts(9000, 1000, 1000, 9000), margin=0.02, alpha=0.05, power=0.8).questions
    )
    lost = PairedCounts(both_correct=40, baseline_only=20, variant_only=3, both_wrong=37)  # -17 points
    assert questions_to_decide(lost, margin=0.01, alpha=0.05, power=0.8).towards == "worse"
    # No discordant pair yet: the plan still uses a rate the data allow (not 0 questions, nor a tiny number).
    silent = PairedCounts(both_correct=60, baseline_only=0, variant_only=0, both_wrong=54)
    assert questions_to_decide(silent, margin=0.01, alpha=0.05, power=0.8).questions > 1000
    with pytest.raises(MMLUError, match="cannot plan"):
        questions_to_decide(PairedCounts(1, 0, 0, 0), margin=0.01, alpha=0.05, power=0.8)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.005, 0.03, "non-inferior"),  # above 0: a gain, and above -margin
        (-0.005, 0.02, "non-inferior"),  # across 0, above -margin
        (-0.008, -0.002, "non-inferior"),  # a real loss, within the margin
        (-0.02, 0.01, "inconclusive"),  # across -margin and 0
        (-0.02, -0.005, "inconclusive"),  # a loss shown, not yet placed against the margin (was "worse")
        (-0.03, -0.011, "worse"),  # a loss shown beyond the margin
    ],
)
def test_the_verdict_names_every_region_of_the_interval_against_the_margin(low, high, expected) -> None:
    assert verdict_of_interval(low, high, margin=0.01) == expected


def test_worse_means_a_loss_beyond_the_margin() -> None:
    # 1,000 questions, a 2-point loss with 100 disagreements: the loss is shown (the interval below 0) but not that
    # it exceeds a 1-point margin, so the verdict is inconclusive, with the questions that would decide.
    counts = PairedCounts(both_correct=500, baseline_only=60, variant_only=40, both_wrong=400)
    low, high = paired_delta_interval(counts)
    assert high < 0 and low < -0.01 < high
    assert worse_p(counts) < 0.025 and worse_p(counts, 0.01) > 0.025
    assert verdict(noninferiority_p(counts, 0.01), worse_p(counts, 0.01), 0.05) == "inconclusive"
    assert questions_to_decide(counts, margin=0.01, alpha=0.05, power=0.8).towards == "worse"


def test_no_question_is_a_clear_error() -> None:
    with pytest.raises(MMLUError, match="at least one question"):
        paired_delta_interval(PairedCounts(0, 0, 0, 0))
    with pytest.raises(MMLUError, match="at least one question"):
        _ = PairedCounts(0, 0, 0, 0).delta


@pytest.mark.parametrize("n", [2, 20, 114])
@pytest.mark.parametrize("rule", ["fixed-n", "sequential"])
def test_every_question_answered_differently_plans_without_crashing(n, rule) -> None:
    # b + c = n: the discordance's Clopper-Pearson upper bound is 1 (scipy's beta.ppf(0.95, n + 1, 0) is NaN).
    counts = PairedCounts(0, n // 2, n - n // 2, 0)
    low, high = paired_delta_interval(counts)
    assert -1 <= low <= counts.delta <= high <= 1
    plan = questions_to_decide(counts, margin=0.01, alpha=0.05, power=0.8, rule=rule)
    assert plan.towards == "non-inferior" and plan.rule == rule
    assert plan.questions is None or plan.questions > n
    assert (plan.questions is None) == (plan.why is not None)


@pytest.mark.parametrize("rule", ["fixed-n", "sequential"])
def test_a_change_exactly_at_the_margin_plans_without_crashing(rule) -> None:
    # -1 point exactly, on 100 and 5,700 questions: it raised "... at or below --0.01". Not shown to be a loss, it is
    # planned as no change; a loss of exactly the margin that the data do show plans no number, and says why.
    for chance in (PairedCounts(80, 6, 5, 9), PairedCounts(4000, 600, 543, 557)):
        assert chance.delta == -0.01
        plan = questions_to_decide(chance, margin=0.01, alpha=0.05, power=0.8, rule=rule)
        assert plan.towards == "non-inferior" and plan.questions is not None
    shown = PairedCounts(5000, 57, 0, 643)
    assert shown.delta == -0.01 and worse_p(shown) < 0.025
    plan = questions_to_decide(shown, margin=0.01, alpha=0.05, power=0.8, rule=rule)
    assert plan.questions is None and plan.why == "the observed change equals -margin (-1.00 points)"


def test_a_loss_a_hair_inside_the_margin_plans_no_meaningless_figure() -> None:
    # 14,042 questions, 140 more lost than gained: -0.997 points against a 1-point margin. Nam's formula asked for
    # 822,055,822 questions; a plan beyond PLAN_CAP is "more than" it, for either rule.
    counts = PairedCounts(7000, 700, 560, 14042 - 8260)
    for rule in ("fixed-n", "sequential"):
        plan = questions_to_decide(counts, margin=0.01, alpha=0.05, power=0.8, rule=rule)
        assert plan.questions is None and f"more than {PLAN_CAP:,} questions" in plan.why
    with pytest.raises(MMLUError, match=r"true change \+0.01 is at or below \+0.01"):
        questions_for_noninferiority(0.1, 0.01, -0.01, 0.025, 0.8)  # the mirrored call: no double minus


def test_the_sequential_plan_is_for_the_sequential_test_and_asks_more_than_the_fixed_n_one() -> None:
    even = PairedCounts(both_correct=400, baseline_only=25, variant_only=25, both_wrong=550)  # 5 % disagree
    fixed = questions_to_decide(even, margin=0.01, alpha=0.05, power=0.8)
    sequential = questions_to_decide(even, margin=0.01, alpha=0.05, power=0.8, rule="sequential")
    assert sequential.rule == "sequential" and sequential.questions % 200 == 0  # looked at after every block
    assert sequential.questions > 1.2 * fixed.questions
    # Its own promise: PairedMargin run on that many questions at the planned rates decides in 80 % of runs (the
    # same simulation, seeded apart; 400 runs: a standard error of 2 points).
    psi = stats.beta.ppf(0.95, 51, 951)
    rng = np.random.default_rng(5)
    decided = 0
    for _ in range(400):
        test = PairedMargin(margin=0.01, alpha=0.025)
        for _block in range(sequential.questions // 200):
            u = rng.random(200)
            test.add(np.where(u < psi / 2, -1.0, np.where(u < psi, 1.0, 0.0)))
            if test.verdict() is not None:
                decided += 1
                break
    assert 0.74 <= decided / 400 <= 0.86


def test_holm_and_the_three_way_verdict() -> None:
    # Holm by hand: sorted .005 .01 .03 .04 -> x4 .02, x3 .03, x2 .06, x1 .04 -> running maximum .02 .03 .06 .06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == []
    assert verdict(0.001, 0.9, alpha=0.05) == "non-inferior"
    assert verdict(0.9, 0.001, alpha=0.05) == "worse"
    assert verdict(0.03, 0.03, alpha=0.05) == "inconclusive"  # one-sided tests at alpha / 2 = 0.025
    assert verdict(0.03, 0.9, alpha=0.1) == "non-inferior"


def _questions(n: int = 10) -> list[Question]:
    return [Question("s1" if i < 0.6 * n else "s2", f"q{i}", ("a", "b", "c", "d"), i % 4, i) for i in range(n)]


def _result(name: str, flags: list[bool]) -> MMLUResult:
    final = 100.0 * sum(flags) / len(flags)
    return score(name, _questions(len(flags)), flags, model=f"{name}.gguf", task_file="abc.bin", tool_final=final,
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


def _compare(base_flags, *variants, alpha=0.05, margin=0.01, power=0.8):
    results = [_result(f"V{i}", flags) for i, flags in enumerate(variants)]
    return compare_all(_result("F16", base_flags), results, alpha=alpha, margin=margin, power=power)


def test_compare_same_answers_is_inconclusive_on_few_questions() -> None:
    flags = [True, False] * 5
    cmp = _compare(flags, flags)["V0"]
    assert (cmp.mcnemar_p, cmp.delta, cmp.baseline_only, cmp.variant_only) == (1.0, 0.0, 0, 0)
    assert cmp.verdict == "inconclusive" and not cmp.drop_within_margin
    assert cmp.delta_ci_low < -cmp.margin < 0 < cmp.delta_ci_high  # 10 questions cannot rule out a 1-point loss
    assert cmp.needed_for == "non-inferior" and cmp.questions_needed > 10
    assert all(s.delta == 0 and s.lost == s.gained == 0 for s in cmp.subjects)


def test_compare_counts_flips_per_subject() -> None:
    base = [True] * 8 + [False] * 2
    var = [False] * 8 + [False] * 2
    cmp = _compare(base, var)["V0"]
    assert (cmp.baseline_only, cmp.variant_only, cmp.both_wrong) == (8, 0, 2)
    assert cmp.mcnemar_p == pytest.approx(2 / 256)
    assert cmp.verdict == "worse" and cmp.questions_needed is None
    assert {s.subject: (s.delta, s.lost, s.gained) for s in cmp.subjects} == {
        "s1": pytest.approx((-1.0, 6, 0)),
        "s2": pytest.approx((-0.5, 2, 0)),
    }


def test_margin_and_alpha_decide_and_holm_adjusts_across_variants() -> None:
    # 2,000 questions, 200 disagreements split evenly: the interval of the change is about +/-1.4 points.
    base = [True] * 900 + [False] * 1100
    same = list(base)
    for i in range(100):
        same[i] = False  # 100 right -> wrong
        same[1000 + i] = True  # 100 wrong -> right
    wide = _compare(base, same, margin=0.02)["V0"]
    narrow = _compare(base, same, margin=0.01)["V0"]
    assert wide.verdict == "non-inferior" and narrow.verdict == "inconclusive"
    assert wide.delta_ci_low > -0.02 > narrow.delta_ci_low - 0.01
    # A looser alpha narrows the interval; a single variant's verdict follows its interval exactly.
    loose = _compare(base, same, margin=0.0125, alpha=0.2)["V0"]
    strict = _compare(base, same, margin=0.0125, alpha=0.05)["V0"]
    assert loose.verdict == "non-inferior" and strict.verdict == "inconclusive"
    assert (loose.delta_ci_low > -0.0125) and (strict.delta_ci_low < -0.0125)
    # The same variant beside two others: its p-value is multiplied (Holm), and its verdict can change.
    alone = _compare(base, same, margin=0.0125, alpha=0.2)
    three = _compare(base, same, same, same, margin=0.0125, alpha=0.2)
    assert three["V0"].comparisons == 3 and alone["V0"].comparisons == 1
    assert three["V0"].p_noninferior_adjusted == pytest.approx(min(1.0, 3 * alone["V0"].p_noninferior))
    assert alone["V0"].verdict == "non-inferior" and three["V0"].verdict == "inconclusive"


def test_a_real_loss_within_the_margin_is_non_inferior_and_says_so() -> None:
    # 20,000 questions, a 0.5-point loss measured to about +/-0.25 points: real, but within a 2-point margin.
    base = [True] * 10000 + [False] * 10000
    var = list(base)
    for i in range(300):
        var[i] = False
    for i in range(200):
        var[10000 + i] = True
    cmp = _compare(base, var, margin=0.02)["V0"]
    assert cmp.delta == pytest.approx(-0.005) and cmp.delta_ci_high < 0
    assert cmp.verdict == "non-inferior" and cmp.drop_within_margin


def test_compare_refuses_different_questions() -> None:
    a = _result("F16", [True] * 10)
    b = _result("Q4_0", [True] * 10)
    b.task_file = "other.bin"
    with pytest.raises(MMLUError, match="different questions"):
        compare_all(a, [b], alpha=0.05, margin=0.01, power=0.8)


def _sequential(name: str, flags: list[bool], verdict: str, budget: int, alpha: float = 0.025) -> MMLUResult:
    from mmlu.results import SequentialRun

    result = _result(name, flags)
    result.sequential = SequentialRun(verdict=verdict, questions_used=len(flags), questions_budget=budget,
                                      block_questions=200, margin=0.01, alpha=alpha, comparisons=1,
                                      e_non_inferior=1.0, e_worse=1.0)  # fmt: skip
    return result


def test_a_sequential_comparison_carries_its_confidence_sequence_and_plans_for_its_own_rule() -> None:
    # 2,000 questions, 100 lost and 100 gained, inconclusive at a 1-point margin: its confidence sequence is wider
    # than Tango's fixed-n interval (it pays for looking after every block) and reaches below -margin like its
    # verdict; the plan is for the sequential test, which needs more questions than Nam's fixed-n formula.
    base = [True] * 900 + [False] * 1100
    same = list(base)
    for i in range(100):
        same[i], same[1000 + i] = False, True
    run = _sequential("V0", same, "inconclusive", budget=2000)
    cmp = compare_all(_result("F16", base), [run], alpha=0.05, margin=0.01, power=0.8)["V0"]
    assert cmp.cs_confidence == pytest.approx(0.95)
    assert cmp.cs_low < cmp.delta_ci_low < 0 < cmp.delta_ci_high < cmp.cs_high
    assert (cmp.cs_low, cmp.cs_high) == paired_interval(100, 1800, 100, 0.025)
    assert cmp.cs_low < -0.01  # the sequential verdict is inconclusive, and so is its interval against -margin
    assert cmp.needed_rule == "sequential" and cmp.questions_needed % 200 == 0
    fixed = compare_all(_result("F16", base), [_result("V0", same)], alpha=0.05, margin=0.01, power=0.8)["V0"]
    assert fixed.needed_rule == "fixed-n" and fixed.cs_low is None and fixed.questions_needed < cmp.questions_needed
    # A variant with no question scored (a hand-made record) has no comparison, rather than a crash.
    empty = _result("V1", [True])
    empty.questions, empty.n_questions = [], 0
    assert "V1" not in compare_all(_result("F16", base), [run, empty], alpha=0.05, margin=0.01, power=0.8)
