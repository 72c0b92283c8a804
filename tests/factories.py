"""Results records for tests of the report (no llama.cpp needed to render one)."""

from __future__ import annotations

from harness.loadtest.summary import Percentiles, StepSummary
from reports.collect import pair_klds
from reports.model import Quality, Results, Speed, SubjectScore, TargetResult, VariantResult


def step(users: int, tps: float) -> StepSummary:
    return StepSummary(
        step=users, users=users, requests=4 * users, failures=0, unmeasured=0, duration_s=10.0,
        request_rate=0.4 * users, output_tokens_per_s=tps, output_tokens_per_s_per_user=tps / users,
        ttft_s=Percentiles(p50=0.2 * users, p90=0.3 * users, p99=0.4 * users, mean=0.25 * users, n=4 * users),
        tpot_s=Percentiles(p50=0.01, p90=0.012, p99=0.02, mean=0.011, n=4 * users),
        itl_s=Percentiles(p50=0.01, p90=0.012, p99=0.03, mean=0.011, n=124 * users),
        e2e_s=Percentiles(p50=2.0, p90=2.5, p99=3.0, mean=2.1, n=4 * users),
    )  # fmt: skip


def variant(
    name, qtype, *, acc, delta=None, verdict=None, kld=None, kld_sigma=0.001, tps=100.0, size=1000, bpw=16.0,
    base=False, needed=None,
):  # fmt: skip
    """One variant's results; `delta` in points, its interval +/-1.5 points around it."""
    quality = Quality(
        n_questions=200, accuracy=acc, ci_low=acc - 3, ci_high=acc + 3, delta=delta,
        delta_ci_low=None if delta is None else delta - 1.5, delta_ci_high=None if delta is None else delta + 1.5,
        verdict=None if base else verdict, lost=None if base else 6, gained=None if base else 5,
        p_noninferior=None if base else 0.01, p_worse=None if base else 0.4, mcnemar_p=None if base else 0.8,
        questions_needed=needed, needed_for="non-inferior" if needed else None,
        decide_command=f"llamasys mmlu -e runs/unit/experiment.toml --set mmlu.per_subject={needed}" if needed
        else None,
        subjects=[SubjectScore(subject="anatomy", n=4, accuracy=acc, delta=delta, lost=1, gained=0),
                  SubjectScore(subject="virology", n=4, accuracy=acc, delta=delta, lost=0, gained=1)],
        kld_mean=kld, kld_mean_sigma=kld_sigma if kld is not None else None, kld_p99=kld * 10 if kld else None,
        same_top_pct=95.0 if kld else None, same_top_sigma=0.5 if kld else None, rms_dp_pct=3.0 if kld else None,
        rms_dp_sigma=0.2 if kld else None, ppl_ratio=1.01, ppl_ratio_sigma=0.002,
        kld_chunks=[kld * f for f in (0.9, 1.1, 0.95, 1.05)] if kld else [],  # held-out chunks around the mean
    )  # fmt: skip
    speed = Speed(target="llama-server", api="native", steps=[step(1, tps), step(2, tps * 1.6)], cpu_pct_mean=180.0,
                  rss_mb_max=300.0)  # fmt: skip
    return VariantResult(
        name=name, quant_type=qtype, is_baseline=base, size_bytes=size, bits_per_weight=bpw, quality=quality,
        speeds={"llama-server": speed},
    )  # fmt: skip


def results(**overrides) -> Results:
    """F16, Q8_0 (non-inferior), Q4_0 (worse), Q4_K_M-imat (non-inferior, the fastest of the two 4-bit ones)."""
    variants = [
        variant("F16", "F16", acc=40.0, base=True, size=2_000_000_000),
        variant("Q8_0", "Q8_0", acc=40.0, delta=0.0, verdict="non-inferior", kld=0.0005, tps=150, size=1_100_000_000,
                bpw=8.5),
        variant("Q4_0", "Q4_0", acc=36.0, delta=-4.0, verdict="worse", kld=0.08, tps=260, size=600_000_000, bpw=4.5),
        variant("Q4_K_M-imat", "Q4_K_M", acc=39.5, delta=-0.5, verdict="non-inferior", kld=0.02, tps=240,
                size=650_000_000, bpw=4.9),
    ]  # fmt: skip
    data = dict(
        name="unit", model="demo/model", baseline="F16", llamacpp={"build_number": 1, "commit": "abc"},
        hardware={"cpu": "test"}, experiment_toml='name = "unit"\n', variants=variants, alpha=0.05,
        margin_points=1.0, power=0.8,
        load_settings={"api": "native", "prompt_tokens": 256, "output_tokens": 32, "steps": [1, 2]},
        targets=[TargetResult(name="llama-server", kind="llama-server", api="native")],
    )  # fmt: skip
    data.update(overrides)
    pair_klds(data["variants"], alpha=data["alpha"])  # type: ignore[arg-type]
    return Results(**data)


def results_with_search() -> Results:
    """results() and a searched recipe variant, measured on two targets by a capacity search: steps 1, 2, 4 and 8,
    then a probe at 3, measured last (the order Speed.steps keeps)."""
    recipe = variant("Q4_K-mix", "Q4_K_M", acc=39.8, delta=-0.2, verdict="non-inferior", kld=0.015, tps=250,
                     size=640_000_000, bpw=4.8)  # fmt: skip
    recipe.recipe = "recipes/Q4_K-mix.txt"  # smaller than Q4_K_M-imat and closer to F16
    targets = [
        TargetResult(name="llama-server", kind="llama-server", api="native"),
        TargetResult(name="llama-cpp-python", kind="llama-cpp-python", api="openai", serializes=True),
    ]
    r = results(variants=[*results().variants, recipe], targets=targets)
    r.load_settings["steps"] = [1, 2, 4, 8]
    for v in r.variants:
        tps = v.speeds["llama-server"].steps[0].output_tokens_per_s
        v.speeds = {}
        for target, scale in (("llama-server", 1.0), ("llama-cpp-python", 0.5)):
            steps = [step(users, tps * scale * gain) for users, gain in ((1, 1), (2, 1.6), (4, 2.2), (8, 2.4), (3, 2))]
            steps[-1].probe = True
            v.speeds[target] = Speed(target=target, api="native", steps=steps)
    return r
