"""The quality stage: MMLU on every variant, paired comparisons against the baseline, KL divergence.

Outputs go to `run_dir/mmlu/<variant>.json` and `run_dir/kld/<variant>.json`, each stamped with the digest of its
inputs (model file identity, task file hash, build, settings); a variant whose output is fresh is not run again.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from harness.config import Experiment, MMLUConfig
from harness.corpus import corpus_text
from harness.errors import MMLUError
from harness.llamacpp import Build
from harness.rundir import RunDir, inputs_digest, is_fresh, read_json, write_json
from mmlu.dataset import load_selection
from mmlu.kld import base_logits, run_kld
from mmlu.multiple_choice import plan_multiple_choice, run_multiple_choice
from mmlu.results import KLDResult, MMLUResult, QualityResults, compare, score
from mmlu.tasks import render_tasks, write_task_file
from mmlu.tokens import count_task_tokens, file_identity


def _build_record(build: Build) -> dict:
    return {"era": build.era, "build_number": build.build_number, "commit": build.commit, "backend": build.backend}


def _mmlu_digest(cfg: MMLUConfig, build: Build, model: Path, task_file: Path, gpu_layers: int) -> str:
    return inputs_digest({
        "stage": "mmlu/1",
        "model": file_identity(model),
        "task_file": task_file.name,
        "build": build.cache_key,
        "settings": {"tasks_per_decode": cfg.tasks_per_decode, "gpu_layers": gpu_layers if build.has_gpu else 0},
    })  # fmt: skip


def _kld_digest(cfg: MMLUConfig, build: Build, model: Path, baseline: Path, corpus: Path) -> str:
    return inputs_digest({
        "stage": "kld/1",
        "model": file_identity(model),
        "baseline": file_identity(baseline),
        "corpus": file_identity(corpus),
        "build": build.cache_key,
        "settings": {"ctx_size": cfg.ctx_size, "chunks": cfg.kld_chunks},
    })  # fmt: skip


def run_quality_stage(
    exp: Experiment,
    build: Build,
    models: Mapping[str, Path],
    run_dir: RunDir,
    *,
    baseline: str,
    progress: bool = True,
) -> QualityResults:
    """Score MMLU (and KL divergence unless disabled) for every variant in `models` (baseline included)."""
    cfg = exp.mmlu
    if baseline not in models:
        raise MMLUError(f"baseline {baseline!r} is not among the models: {', '.join(models) or 'none'}")
    models = {name: Path(path) for name, path in models.items()}
    for name, path in models.items():
        if not path.is_file():
            raise MMLUError(f"model file of variant {name} not found: {path}")
    cache_dir = exp.resolved_cache_dir()
    gpu_layers = exp.server.gpu_layers
    logs = run_dir.root / "mmlu" / "logs"

    selection = load_selection(cfg, cache_dir=cache_dir, progress=progress)
    tasks = render_tasks(selection.questions, cfg.render)
    task_file = write_task_file(tasks, cache_dir)
    digests = {name: _mmlu_digest(cfg, build, path, task_file, gpu_layers) for name, path in models.items()}
    stale = [name for name in models if not is_fresh(run_dir.mmlu(name), digests[name])]
    if stale:
        counted = count_task_tokens(
            build, models[baseline], tasks, task_file=task_file, cache_dir=cache_dir,
            log_path=logs / "tokenize-server.log", threads=cfg.threads,
        )  # fmt: skip
        plan = plan_multiple_choice(
            counted.required, era=build.era, has_gpu=build.has_gpu, n_ctx_train=counted.n_ctx_train,
            n_vocab=counted.n_vocab, n_answers=max(len(t.answers) for t in tasks),
            tasks_per_decode=cfg.tasks_per_decode,
        )  # fmt: skip
        for name in stale:
            _say(f"MMLU: {name} on {len(tasks)} questions ({selection.source})", progress)
            correct, output, wall = run_multiple_choice(
                build, models[name], task_file, len(tasks), plan, log_path=logs / f"{name}.log",
                threads=cfg.threads, gpu_layers=gpu_layers, progress=progress, desc=f"MMLU {name}",
            )  # fmt: skip
            result = score(
                name, selection.questions, correct, model=str(models[name]), task_file=task_file.name,
                tool_final=output.final, tool_final_sigma=output.final_sigma,  # type: ignore[arg-type]
                random_chance=output.random_chance, wall_time_s=round(wall, 3), plan=plan.to_json(),
                selection={**selection.describe(), "render": cfg.render, "per_subject": cfg.per_subject,
                           "seed": cfg.seed, "split": cfg.split},
                build=_build_record(build),
            )  # fmt: skip
            write_json(run_dir.mmlu(name), result.to_json(), digest=digests[name])
    mmlu = {name: MMLUResult.from_json(read_json(run_dir.mmlu(name))) for name in models}
    comparisons = {
        name: compare(mmlu[baseline], result, alpha=cfg.alpha) for name, result in mmlu.items() if name != baseline
    }
    kld = _kld_stage(exp, build, models, run_dir, baseline=baseline, progress=progress) if cfg.kld else {}
    return QualityResults(baseline=baseline, mmlu=mmlu, comparisons=comparisons, kld=kld)


def _kld_stage(
    exp: Experiment, build: Build, models: Mapping[str, Path], run_dir: RunDir, *, baseline: str, progress: bool
) -> dict[str, KLDResult]:
    cfg = exp.mmlu
    others = [name for name in models if name != baseline]
    if not others:
        return {}
    cache_dir = exp.resolved_cache_dir()
    logs = run_dir.root / "kld" / "logs"
    corpus = corpus_text(exp.corpus, "kld", cache_dir=cache_dir, llamacpp_tree=build.tree)
    digests = {name: _kld_digest(cfg, build, models[name], models[baseline], corpus) for name in others}
    stale = [name for name in others if not is_fresh(run_dir.kld(name), digests[name])]
    if stale:
        _say(f"KLD: baseline {baseline} log-probabilities over {corpus.name}", progress)
        base_file, _ppl = base_logits(
            build, models[baseline], corpus, ctx_size=cfg.ctx_size, chunks=cfg.kld_chunks, cache_dir=cache_dir,
            log_path=logs / f"{baseline}-base.log", threads=cfg.threads, gpu_layers=exp.server.gpu_layers,
            progress=progress,
        )  # fmt: skip
        for name in stale:
            stats = run_kld(
                build, models[name], base_file, ctx_size=cfg.ctx_size, chunks=cfg.kld_chunks,
                log_path=logs / f"{name}.log", threads=cfg.threads, gpu_layers=exp.server.gpu_layers,
                progress=progress, desc=f"KLD {name}",
            )  # fmt: skip
            result = KLDResult(name, baseline, str(models[name]), str(corpus), cfg.ctx_size, stats)
            write_json(run_dir.kld(name), result.to_json(), digest=digests[name])
    return {name: KLDResult.from_json(read_json(run_dir.kld(name))) for name in others}


def load_quality_results(run_dir: RunDir, variants: list[str], *, baseline: str, alpha: float = 0.05) -> QualityResults:
    """Rebuild the stage's results from the run directory (for the report), recomputing the comparisons."""
    mmlu = {}
    for name in variants:
        try:
            mmlu[name] = MMLUResult.from_json(read_json(run_dir.mmlu(name)))
        except FileNotFoundError:
            raise MMLUError(f"no MMLU result for {name} in {run_dir.root}; run `llamasys mmlu` first") from None
    if baseline not in mmlu:
        raise MMLUError(f"baseline {baseline!r} is not among the variants: {', '.join(variants)}")
    comparisons = {n: compare(mmlu[baseline], r, alpha=alpha) for n, r in mmlu.items() if n != baseline}
    kld = {n: KLDResult.from_json(read_json(run_dir.kld(n))) for n in variants if run_dir.kld(n).is_file()}
    return QualityResults(baseline=baseline, mmlu=mmlu, comparisons=comparisons, kld=kld)


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
