"""The quality stages: MMLU on every variant (and the paired comparisons against the baseline), KL divergence.

Outputs go to `run_dir/mmlu/<variant>.json` and `run_dir/kld/<variant>.json`, each stamped with the digest of its
inputs (model file identity, task file hash, build, settings); `harness.stage.Stage.run` keeps what is fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.sequential import PairedMargin
from harness.cache import file_identity
from harness.config import MMLUConfig
from harness.context import RunContext
from harness.corpus import corpus_text
from harness.errors import HarnessError, MMLUError
from harness.kld import base_logits, run_kld
from harness.records import read_record
from harness.rundir import RunDir
from harness.stage import Stage, Unit, by_variant
from mmlu.dataset import Selection, load_selection
from mmlu.multiple_choice import MultipleChoicePlan, plan_multiple_choice, run_multiple_choice
from mmlu.results import KLDResult, MMLUResult, QualityResults, SequentialRun, compare_all, score
from mmlu.tasks import MultipleChoiceTask, render_tasks, write_task_file
from mmlu.tokens import count_task_tokens

log = logging.getLogger(__name__)


class QualityStage(Stage[MMLUResult]):
    """MMLU for every variant the models stage made, the baseline included (llama-perplexity --multiple-choice)."""

    name = "mmlu"
    what = "MMLU"
    record = MMLUResult
    error = MMLUError

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.experiment.mmlu.enabled

    def units(self, ctx: RunContext) -> list[Unit]:
        return [Unit(name, variant=name) for name in ctx.models()]

    def output(self, ctx: RunContext, unit: Unit) -> Path:
        return ctx.run.mmlu(unit.key)

    def inputs(self, ctx: RunContext, unit: Unit) -> Any:
        """What decides one variant's MMLU result: its model file, the task file's name (its content hash), the
        build, and the settings that change how the tasks are packed."""
        cfg, build = ctx.experiment.mmlu, ctx.build
        inputs = {
            "stage": "mmlu/1",
            "model": file_identity(_model(ctx, unit.key)),
            "task_file": _selection(ctx)[2].name,
            "build": build.cache_key,
            "settings": {
                "tasks_per_decode": cfg.tasks_per_decode,
                "gpu_layers": ctx.experiment.server.gpu_layers if build.has_gpu else 0,
            },
        }
        if cfg.sequential and unit.key != ctx.baseline:
            # Where a variant stops depends on the baseline's answers and on how its verdict is tested.
            inputs["sequential"] = {
                "baseline": file_identity(_model(ctx, ctx.baseline)), "block": cfg.block_questions,
                "margin": cfg.margin_points, "alpha": cfg.alpha, "comparisons": _comparisons(ctx),
            }  # fmt: skip
        return inputs

    def make(self, ctx: RunContext, units: list[Unit]) -> Iterator[tuple[Unit, MMLUResult | HarnessError]]:
        exp, build, run = ctx.experiment, ctx.build, ctx.run
        cfg = exp.mmlu
        models = _models(ctx)
        selection, tasks, task_file = _selection(ctx)
        counted = count_task_tokens(
            build, models[ctx.baseline], tasks, task_file=task_file, cache=ctx.cache,
            log_path=run.logs("mmlu") / "tokenize-server.log", threads=cfg.threads,
        )  # fmt: skip
        plan = plan_multiple_choice(
            counted.required, era=build.era, has_gpu=build.has_gpu, n_ctx_train=counted.n_ctx_train,
            n_vocab=counted.n_vocab, n_answers=max(len(t.answers) for t in tasks),
            tasks_per_decode=cfg.tasks_per_decode,
        )  # fmt: skip
        if cfg.sequential:
            yield from _sequential(ctx, units, models, selection, tasks, task_file, plan)
            return
        for unit in units:
            name = unit.key
            log.info("MMLU: %s on %d questions (%s)", name, len(tasks), selection.source)
            try:
                correct, output, wall = run_multiple_choice(
                    ctx.tools, models[name], task_file, len(tasks), plan, log_path=run.logs("mmlu") / f"{name}.log",
                    compute=ctx.compute(cfg.threads), desc=f"MMLU {name}",
                )  # fmt: skip
            except MMLUError as exc:
                yield unit, exc
                continue
            yield unit, score(
                name, selection.questions, correct, model=str(models[name]), task_file=task_file.name,
                tool_final=output.final, tool_final_sigma=output.final_sigma,  # type: ignore[arg-type]
                random_chance=output.random_chance, wall_time_s=round(wall, 3), plan=plan,
                selection={**selection.describe(), "render": cfg.render, "per_subject": cfg.per_subject,
                           "seed": cfg.seed, "split": cfg.split},
                build=build.describe(),
            )  # fmt: skip


class KLDStage(Stage[KLDResult]):
    """KL divergence of every variant but the baseline against it, on the corpus' evaluation text: the baseline's
    log-probabilities once (cached), then `--kl-divergence` per variant."""

    name = "kld"
    what = "KL divergence"
    record = KLDResult
    error = MMLUError

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.experiment.mmlu.enabled and ctx.experiment.mmlu.kld

    def units(self, ctx: RunContext) -> list[Unit]:
        return [Unit(name, variant=name) for name in ctx.models() if name != ctx.baseline]

    def output(self, ctx: RunContext, unit: Unit) -> Path:
        return ctx.run.kld(unit.key)

    def inputs(self, ctx: RunContext, unit: Unit) -> Any:
        cfg = ctx.experiment.mmlu
        return {
            "stage": "kld/2",
            "model": file_identity(_model(ctx, unit.key)),
            "baseline": file_identity(_model(ctx, ctx.baseline)),
            "corpus": file_identity(_kld_corpus(ctx)),
            "build": ctx.build.cache_key,
            "settings": {"ctx_size": cfg.ctx_size, "chunks": cfg.kld_chunks},
        }

    def make(self, ctx: RunContext, units: list[Unit]) -> Iterator[tuple[Unit, KLDResult | HarnessError]]:
        cfg, run, baseline = ctx.experiment.mmlu, ctx.run, ctx.baseline
        models, corpus = _models(ctx), _kld_corpus(ctx)
        log.info("KLD: baseline %s log-probabilities over %s", baseline, corpus.name)
        compute = ctx.compute(cfg.threads)
        try:
            base_file, _ppl = base_logits(
                ctx.tools, models[baseline], corpus, ctx_size=cfg.ctx_size, chunks=cfg.kld_chunks, cache=ctx.cache,
                log_path=run.logs("kld") / f"{baseline}-base.log", compute=compute,
            )  # fmt: skip
        except MMLUError as exc:  # no baseline logits: no variant can be compared
            yield from ((unit, exc) for unit in units)
            return
        for unit in units:
            try:
                stats = run_kld(
                    ctx.tools, models[unit.key], base_file, ctx_size=cfg.ctx_size, chunks=cfg.kld_chunks,
                    log_path=run.logs("kld") / f"{unit.key}.log", compute=compute, desc=f"KLD {unit.key}",
                )  # fmt: skip
            except MMLUError as exc:
                yield unit, exc
                continue
            yield unit, KLDResult(
                variant=unit.key, baseline=baseline, model=str(models[unit.key]), corpus=str(corpus),
                ctx_size=cfg.ctx_size, stats=stats,
            )  # fmt: skip


def _comparisons(ctx: RunContext) -> int:
    return max(1, len([name for name in ctx.models() if name != ctx.baseline]))


def _sequential(
    ctx: RunContext, units: list[Unit], models: Mapping[str, Path], selection: Selection,
    tasks: list[MultipleChoiceTask], task_file: Path, plan: MultipleChoicePlan,
) -> Iterator[tuple[Unit, MMLUResult | HarnessError]]:  # fmt: skip
    """The baseline answers every block; each variant answers block after block until its anytime-valid paired test
    decides (non-inferior or worse against the margin), or the questions run out."""
    cfg, run = ctx.experiment.mmlu, ctx.run
    size = cfg.block_questions
    blocks = [(start, min(start + size, len(tasks))) for start in range(0, len(tasks), size)]
    files = [write_task_file(tasks[a:b], ctx.cache) for a, b in blocks]
    comparisons = _comparisons(ctx)
    level = cfg.alpha / 2 / comparisons  # each one-sided test, Bonferroni across the variants
    baseline: MMLUResult | None = None
    ordered = sorted(units, key=lambda u: u.key != ctx.baseline)
    if ordered[0].key != ctx.baseline:
        baseline = read_record(run.mmlu(ctx.baseline), MMLUResult)  # fresh (Stage.run kept it)
    for unit in ordered:
        name = unit.key
        is_baseline = name == ctx.baseline
        test = None if is_baseline else PairedMargin(margin=cfg.margin_points / 100, alpha=level)
        correct: list[bool] = []
        finals: list[tuple[int, float]] = []
        wall, chance = 0.0, None
        log.info("MMLU: %s on up to %d questions in %d blocks (%s)", name, len(tasks), len(blocks), selection.source)
        try:
            for k, ((a, b), path) in enumerate(zip(blocks, files, strict=True)):
                block, output, seconds = run_multiple_choice(
                    ctx.tools, models[name], path, b - a, plan, log_path=run.logs("mmlu") / f"{name}-block{k}.log",
                    compute=ctx.compute(cfg.threads), desc=f"MMLU {name} [{k + 1}/{len(blocks)}]",
                )  # fmt: skip
                correct += block
                finals.append((b - a, float(output.final)))  # type: ignore[arg-type]
                wall, chance = wall + seconds, output.random_chance
                if test is not None and baseline is not None:
                    base = baseline.correct_flags[a:b]
                    test.add([int(v) - int(w) for v, w in zip(block, base, strict=True)])
                    if test.verdict() is not None:
                        break
        except MMLUError as exc:
            yield unit, exc
            continue
        n = len(correct)
        result = score(
            name, selection.questions[:n], correct, model=str(models[name]), task_file=task_file.name,
            tool_final=sum(k * f for k, f in finals) / n, tool_final_sigma=None, random_chance=chance,
            wall_time_s=round(wall, 3), plan=plan,
            selection={**selection.describe(), "render": cfg.render, "per_subject": cfg.per_subject,
                       "seed": cfg.seed, "split": cfg.split, "order": "shuffled (seeded)"},
            build=ctx.build.describe(),
        )  # fmt: skip
        if test is not None:
            result = result.model_copy(update={"sequential": SequentialRun(
                verdict=test.verdict() or "inconclusive", questions_used=n, questions_budget=len(tasks),
                block_questions=size, margin=cfg.margin_points / 100, alpha=level, comparisons=comparisons,
                e_non_inferior=test.e_non_inferior, e_worse=test.e_worse,
            )})  # fmt: skip
            log.info("MMLU: %s %s after %d of %d questions", name, result.sequential.verdict, n, len(tasks))  # type: ignore[union-attr]
        else:
            baseline = result
        yield unit, result


def _models(ctx: RunContext) -> dict[str, Path]:
    """The variants' GGUF files (from models.json), each checked to exist, the baseline among them."""
    models = {name: artifact.path for name, artifact in ctx.models().items()}
    if ctx.baseline not in models:
        raise MMLUError(f"baseline {ctx.baseline!r} is not among the models: {', '.join(models) or 'none'}")
    for name, path in models.items():
        if not path.is_file():
            raise MMLUError(f"model file of variant {name} not found: {path}")
    return models


def _model(ctx: RunContext, variant: str) -> Path:
    return ctx.models()[variant].path


def _kld_corpus(ctx: RunContext) -> Path:
    return corpus_text(ctx.experiment.corpus, "kld", cache=ctx.cache, llamacpp_tree=ctx.build.tree)


# (selection, tasks, task file) by MMLU settings and cache: loading and rendering 14,042 questions takes seconds.
_SELECTIONS: dict[tuple[str, str], tuple[Selection, list[MultipleChoiceTask], Path]] = {}


def _selection(ctx: RunContext) -> tuple[Selection, list[MultipleChoiceTask], Path]:
    """The questions the experiment's MMLU settings select, rendered, and their task file (made once per process)."""
    cfg = ctx.experiment.mmlu
    key = (cfg.model_dump_json(), str(ctx.cache.root))
    if key not in _SELECTIONS:
        selection = load_selection(cfg, cache=ctx.cache)
        if cfg.sequential:  # a fixed random order: any prefix is a random sample of the questions
            order = list(range(len(selection.questions)))
            random.Random(cfg.seed).shuffle(order)
            selection = dataclasses.replace(selection, questions=[selection.questions[i] for i in order])
        tasks = render_tasks(selection.questions, cfg.render)
        _SELECTIONS[key] = (selection, tasks, write_task_file(tasks, ctx.cache))
    return _SELECTIONS[key]


def run_quality_stage(ctx: RunContext) -> QualityResults:
    """MMLU (and KL divergence unless disabled) for every variant the models stage made, as the pipeline runs
    them: what is fresh is kept, a variant that fails is recorded and the others go on."""
    models = list(ctx.models())
    failed: HarnessError | None = None
    results = {}
    for stage in (QualityStage(), KLDStage()):
        if not stage.enabled(ctx):
            continue
        try:
            results[stage.name] = by_variant(stage.run(ctx))
        except HarnessError as exc:
            if not exc.partial:
                raise
            failed = failed or exc
    if failed is not None:
        raise failed
    return load_quality_results(ctx.run, models, baseline=ctx.baseline, cfg=ctx.experiment.mmlu,
                                kld=results.get("kld", {}))  # fmt: skip


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
