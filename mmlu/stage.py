"""The quality stage: MMLU on every variant, paired comparisons against the baseline, KL divergence.

Outputs go to `run_dir/mmlu/<variant>.json` and `run_dir/kld/<variant>.json`, each stamped with the digest of its
inputs (model file identity, task file hash, build, settings); a variant whose output is fresh is not run again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.config import MMLUConfig
from harness.context import RunContext, Stage
from harness.corpus import corpus_text
from harness.errors import HarnessError, MMLUError
from harness.records import UnitFailure, inputs_digest, is_fresh, read_record, write_record
from harness.rundir import RunDir
from mmlu.dataset import Selection, load_selection
from mmlu.kld import base_logits, run_kld
from mmlu.multiple_choice import plan_multiple_choice, run_multiple_choice
from mmlu.results import KLDResult, MMLUResult, QualityResults, compare_all, score
from mmlu.tasks import MultipleChoiceTask, render_tasks, write_task_file
from mmlu.tokens import count_task_tokens, file_identity

log = logging.getLogger(__name__)


class QualityStage(Stage):
    """MMLU (and KL divergence unless disabled) for every variant, the baseline included."""

    name = "mmlu"

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.experiment.mmlu.enabled

    def inputs(self, ctx: RunContext, variant: str | None = None) -> Any:
        """What decides one variant's MMLU result: its model file, the task file's name (its content hash), the
        build, and the settings that change how the tasks are packed."""
        cfg, build = ctx.experiment.mmlu, ctx.build
        return {
            "stage": "mmlu/1",
            "model": file_identity(_model(ctx, variant)),
            "task_file": _selection(ctx)[2].name,
            "build": build.cache_key,
            "settings": {
                "tasks_per_decode": cfg.tasks_per_decode,
                "gpu_layers": ctx.experiment.server.gpu_layers if build.has_gpu else 0,
            },
        }

    def run(self, ctx: RunContext) -> None:
        run_quality_stage(ctx)


def _model(ctx: RunContext, variant: str | None) -> Path:
    if variant is None:
        raise MMLUError("the MMLU stage's inputs are per variant")
    return ctx.models()[variant].path


# (selection, tasks, task file) by MMLU settings and cache: loading and rendering 14,042 questions takes seconds.
_SELECTIONS: dict[tuple[str, str], tuple[Selection, list[MultipleChoiceTask], Path]] = {}


def _selection(ctx: RunContext) -> tuple[Selection, list[MultipleChoiceTask], Path]:
    """The questions the experiment's MMLU settings select, rendered, and their task file (made once per process)."""
    cfg = ctx.experiment.mmlu
    key = (cfg.model_dump_json(), str(ctx.cache.root))
    if key not in _SELECTIONS:
        selection = load_selection(cfg, cache=ctx.cache)
        tasks = render_tasks(selection.questions, cfg.render)
        _SELECTIONS[key] = (selection, tasks, write_task_file(tasks, ctx.cache))
    return _SELECTIONS[key]


def run_quality_stage(ctx: RunContext) -> QualityResults:
    """Score MMLU (and KL divergence unless disabled) for every variant the models stage made."""
    exp, build, run = ctx.experiment, ctx.build, ctx.run
    cfg, baseline = exp.mmlu, ctx.baseline
    models = {name: artifact.path for name, artifact in ctx.models().items()}
    if baseline not in models:
        raise MMLUError(f"baseline {baseline!r} is not among the models: {', '.join(models) or 'none'}")
    for name, path in models.items():
        if not path.is_file():
            raise MMLUError(f"model file of variant {name} not found: {path}")
    stage = QualityStage()
    failures: list[str] = []
    selection, tasks, task_file = _selection(ctx)
    digests = {name: stage.digest(ctx, name) for name in models}
    stale = [name for name in models if not is_fresh(run.mmlu(name), digests[name])]
    if stale:
        counted = count_task_tokens(
            build, models[baseline], tasks, task_file=task_file, cache=ctx.cache,
            log_path=run.logs("mmlu") / "tokenize-server.log", threads=cfg.threads,
        )  # fmt: skip
        plan = plan_multiple_choice(
            counted.required, era=build.era, has_gpu=build.has_gpu, n_ctx_train=counted.n_ctx_train,
            n_vocab=counted.n_vocab, n_answers=max(len(t.answers) for t in tasks),
            tasks_per_decode=cfg.tasks_per_decode,
        )  # fmt: skip
        for name in stale:
            log.info("MMLU: %s on %d questions (%s)", name, len(tasks), selection.source)
            try:
                correct, output, wall = run_multiple_choice(
                    ctx.tools, models[name], task_file, len(tasks), plan, log_path=run.logs("mmlu") / f"{name}.log",
                    compute=ctx.compute(cfg.threads), desc=f"MMLU {name}",
                )  # fmt: skip
            except MMLUError as exc:
                failures.append(_failed(run, run.mmlu(name), name, "MMLU", exc))
                continue
            result = score(
                name, selection.questions, correct, model=str(models[name]), task_file=task_file.name,
                tool_final=output.final, tool_final_sigma=output.final_sigma,  # type: ignore[arg-type]
                random_chance=output.random_chance, wall_time_s=round(wall, 3), plan=plan,
                selection={**selection.describe(), "render": cfg.render, "per_subject": cfg.per_subject,
                           "seed": cfg.seed, "split": cfg.split},
                build=build.describe(),
            )  # fmt: skip
            write_record(run.mmlu(name), result, digest=digests[name])
            run.failure(run.mmlu(name)).unlink(missing_ok=True)
    kld = _kld_stage(ctx, models, failures) if cfg.kld else {}
    if failures:
        more = f" (and {len(failures) - 1} more; see llamasys.log)" if len(failures) > 1 else ""
        raise MMLUError(f"{failures[0]}{more}", partial=True)
    return load_quality_results(run, list(models), baseline=baseline, cfg=cfg, kld=kld)


def _failed(run: RunDir, output: Path, variant: str, what: str, exc: HarnessError) -> str:
    """Record one variant's failed measurement (the report shows it) and say it; the other variants go on."""
    write_record(run.failure(output), UnitFailure(unit=variant, what=what, error=str(exc), at=_now()))
    log.error("%s: %s failed: %s", what, variant, exc)
    return f"{what} failed for {variant}: {exc}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _kld_digest(ctx: RunContext, model: Path, baseline: Path, corpus: Path) -> str:
    cfg = ctx.experiment.mmlu
    return inputs_digest({
        "stage": "kld/1",
        "model": file_identity(model),
        "baseline": file_identity(baseline),
        "corpus": file_identity(corpus),
        "build": ctx.build.cache_key,
        "settings": {"ctx_size": cfg.ctx_size, "chunks": cfg.kld_chunks},
    })  # fmt: skip


def _kld_stage(ctx: RunContext, models: Mapping[str, Path], failures: list[str]) -> dict[str, KLDResult]:
    cfg, run, baseline = ctx.experiment.mmlu, ctx.run, ctx.baseline
    others = [name for name in models if name != baseline]
    if not others:
        return {}
    corpus = corpus_text(ctx.experiment.corpus, "kld", cache=ctx.cache, llamacpp_tree=ctx.build.tree)
    digests = {name: _kld_digest(ctx, models[name], models[baseline], corpus) for name in others}
    stale = [name for name in others if not is_fresh(run.kld(name), digests[name])]
    if stale:
        log.info("KLD: baseline %s log-probabilities over %s", baseline, corpus.name)
        compute = ctx.compute(cfg.threads)
        try:
            base_file, _ppl = base_logits(
                ctx.tools, models[baseline], corpus, ctx_size=cfg.ctx_size, chunks=cfg.kld_chunks, cache=ctx.cache,
                log_path=run.logs("kld") / f"{baseline}-base.log", compute=compute,
            )  # fmt: skip
        except MMLUError as exc:  # no baseline logits: no variant can be compared
            failures += [_failed(run, run.kld(name), name, "KL divergence", exc) for name in stale]
            stale = []
        for name in stale:
            try:
                stats = run_kld(
                    ctx.tools, models[name], base_file, ctx_size=cfg.ctx_size, chunks=cfg.kld_chunks,
                    log_path=run.logs("kld") / f"{name}.log", compute=compute, desc=f"KLD {name}",
                )  # fmt: skip
            except MMLUError as exc:
                failures.append(_failed(run, run.kld(name), name, "KL divergence", exc))
                continue
            result = KLDResult(
                variant=name, baseline=baseline, model=str(models[name]), corpus=str(corpus), ctx_size=cfg.ctx_size,
                stats=stats,
            )  # fmt: skip
            write_record(run.kld(name), result, digest=digests[name])
            run.failure(run.kld(name)).unlink(missing_ok=True)
    return {name: read_record(run.kld(name), KLDResult) for name in others if run.kld(name).is_file()}


def load_quality_results(
    run: RunDir, variants: list[str], *, baseline: str, cfg: MMLUConfig, kld: Mapping[str, KLDResult] | None = None
) -> QualityResults:
    """The stage's results from the run directory (for the report), with the comparisons recomputed."""
    mmlu = {}
    for name in variants:
        try:
            mmlu[name] = read_record(run.mmlu(name), MMLUResult)
        except FileNotFoundError:
            raise MMLUError(f"no MMLU result for {name} in {run.root}; run `llamasys mmlu` first") from None
    if baseline not in mmlu:
        raise MMLUError(f"baseline {baseline!r} is not among the variants: {', '.join(variants)}")
    comparisons = compare_all(
        mmlu[baseline], list(mmlu.values()), alpha=cfg.alpha, margin=cfg.margin_points / 100, power=cfg.power
    )
    if kld is None:
        kld = {n: read_record(run.kld(n), KLDResult) for n in variants if run.kld(n).is_file()}
    return QualityResults(baseline=baseline, mmlu=mmlu, comparisons=comparisons, kld=dict(kld))
