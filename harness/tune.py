"""Server settings for `[tune]` (issue 22): a llama-bench screen, a search under the load, a quality guard.

A setting is one llama-server command line's worth of performance flags (threads, batch and micro-batch, flash
attention, KV-cache types, GPU layers). The screen measures every candidate with llama-bench on the variant's own
model, prompt processing at the load's prompt length and generation at its depth (`-d prompt_tokens`), and predicts
one request's time from the two rates: prompt / pp + output / tg. The settings with the lowest prediction go on to be
measured under load; the rest cannot plausibly win.

The quality guard (`guard`): a setting that changes the numerics (a quantized KV cache, flash attention) is measured
for KL divergence against the baseline with the same flags in llama-perplexity, paired on the same held-out chunks
against the variant with the default setting; it is accepted only when the paired interval's upper end is within
`margin` (its extra loss shown to be at most the margin).

The stage (`TuneStage`, after the load stage): per tuned variant, the screen; its survivors (predicted within
`screen_keep` times the best) searched for the best capacity within `[slo]`: as many as `survivors` (the budget of
load measurements) each in turn, more by optuna's seeded TPE sampler over the settings' dimensions (`search`). Each
setting that changes numerics passes the guard first; each accepted one is measured under the load as ordinary
steps: a run of its own in `tune/<variant>/<setting>/` (the experiment with the setting's flags in `[server]`,
llama-server only, starting at the defaults' first missed level and searching from there), so its records,
verification, early stop and resume are the load stage's. The defaults are the load stage's own measurement of the
variant in this run. The chosen setting has the highest capacity (ties: the higher goodput at its capacity, then the
defaults). Energy per output token is the load's (harness.energy: RAPL, NVML, where readable).

A quantized V cache needs flash attention (llama.cpp refuses the context otherwise), so such combinations are never
generated; llama-bench runs the Cartesian product of its comma lists, so the screen runs once per flash-attention
value with the V-cache types that value allows.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from harness.cache import file_identity
from harness.config import TargetConfig
from harness.context import RunContext
from harness.corpus import corpus_text
from harness.errors import ConfigError, HarnessError, LoadTestError
from harness.kld import KLDStats, base_logits, paired_kld, run_kld
from harness.loadtest.attempts import load_inputs
from harness.loadtest.stage import LoadStage
from harness.loadtest.summary import LoadSummary
from harness.models.records import ModelsRecord
from harness.records import Record, RecordError, StageRecord, read_record, write_record
from harness.rundir import RunDir
from harness.stage import Stage, Unit
from harness.tools import Compute, ToolRunner, llama_bench_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Setting:
    """llama-server's performance flags for one trial (None: the server's default)."""

    threads: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    flash_attn: bool | None = None
    cache_k: str | None = None
    cache_v: str | None = None
    gpu_layers: int | None = None  # -ngl, searched on a GPU build only

    def server_args(self) -> list[str]:
        """The flags as llama-server (b11312) takes them; threads and GPU layers come from the Compute the runner
        adds (the trial sets them in `[server]`)."""
        args: list[str] = []
        for flag, value in (("-b", self.batch), ("-ub", self.ubatch), ("-ctk", self.cache_k), ("-ctv", self.cache_v)):
            if value is not None:
                args += [flag, str(value)]
        if self.flash_attn is not None:
            args += ["-fa", "on" if self.flash_attn else "off"]
        return args

    def describe(self) -> str:
        parts = [f"-t {self.threads}" if self.threads else ""] + self.server_args()
        parts += [] if self.gpu_layers is None else ["-ngl", str(self.gpu_layers)]
        return " ".join(p for p in parts if p) or "(defaults)"

    @property
    def changes_numerics(self) -> bool:
        """Whether llama.cpp may compute other logits with this setting than with its defaults (threads and batch
        sizes aside): a quantized KV cache, or flash attention set either way. The default `-fa auto` of current
        builds turns flash attention on where the backend has it (the CPU's included: b11312's graph then holds
        FLASH_ATTN_EXT) and b3661's default is off, so which of on and off is the change depends on the build; the
        guard measures both and finds the default's twin at exactly 0 extra KLD."""
        return self.flash_attn is not None or self.cache_k not in (None, "f16") or self.cache_v not in (None, "f16")

    def numerics_args(self) -> list[str]:
        """The flags llama-perplexity needs to compute as the server would with this setting."""
        args = [] if self.cache_k is None else ["-ctk", self.cache_k]
        args += [] if self.cache_v is None else ["-ctv", self.cache_v]
        return args + ([] if self.flash_attn is None else ["-fa", "on" if self.flash_attn else "off"])

    @property
    def valid(self) -> bool:
        """llama.cpp quantizes the V cache only with flash attention."""
        return self.flash_attn is True or self.cache_v in (None, "f16", "bf16", "f32")


def candidates(
    threads: Sequence[int], batch: Sequence[int], ubatch: Sequence[int], flash_attn: Sequence[bool],
    cache_types: Sequence[str], gpu_layers: Sequence[int | None] = (None,),
) -> list[Setting]:  # fmt: skip
    """Every valid combination (the K and V caches take the same type; micro-batch at most the batch)."""
    out = []
    for t, b, ub, fa, ct, ngl in itertools.product(threads, batch, ubatch, flash_attn, cache_types, gpu_layers):
        setting = Setting(threads=t, batch=b, ubatch=ub, flash_attn=fa, cache_k=ct, cache_v=ct, gpu_layers=ngl)
        if ub <= b and setting.valid:
            out.append(setting)
    return out


def merge_args(base: Sequence[str], setting: Sequence[str]) -> list[str]:
    """`[server] extra_args` with the setting's flags (each a flag and its value) in place of any it sets."""
    flags = set(setting[0::2])
    kept: list[str] = []
    skip = False
    for i, arg in enumerate(base):
        if skip:
            skip = False
            continue
        if arg in flags and i + 1 < len(base):
            skip = True
            continue
        kept.append(arg)
    return [*kept, *setting]


class ScreenRow(Record):
    """One setting's llama-bench rates and the request time they predict."""

    setting: str  # Setting.describe()
    threads: int
    batch: int
    ubatch: int
    flash_attn: bool
    cache_k: str
    cache_v: str
    gpu_layers: int | None = None
    pp_tps: float  # prompt processing at the load's prompt length
    tg_tps: float  # generation at the load's depth
    predicted_s: float  # prompt / pp + output / tg


def parse_bench(text: str) -> list[dict]:
    """`llama-bench -o json` rows; no rows is an error here (the screen needs every setting's)."""
    rows = llama_bench_rows(text)
    if not rows:
        raise HarnessError("llama-bench printed no JSON results")
    return rows


def screen_rows(
    rows: Iterable[dict], *, prompt_tokens: int, output_tokens: int, gpu_layers: bool = False
) -> list[ScreenRow]:
    """Pair each setting's pp (n_prompt = prompt_tokens at depth 0) and tg (n_gen = output_tokens at depth
    prompt_tokens) rows into a prediction, lowest predicted time first (`gpu_layers`: the settings name -ngl)."""
    pp: dict[tuple, float] = {}
    tg: dict[tuple, float] = {}
    for r in rows:
        key = (int(r["n_threads"]), int(r["n_batch"]), int(r["n_ubatch"]), bool(r["flash_attn"]), r["type_k"],
               r["type_v"], int(r["n_gpu_layers"]) if gpu_layers else None)  # fmt: skip
        if r["n_prompt"] == prompt_tokens and r["n_gen"] == 0 and r["n_depth"] == 0:
            pp[key] = float(r["avg_ts"])
        elif r["n_gen"] == output_tokens and r["n_prompt"] == 0 and r["n_depth"] == prompt_tokens:
            tg[key] = float(r["avg_ts"])
    out = []
    for key in sorted(pp.keys() & tg.keys(), key=repr):
        t, b, ub, fa, ck, cv, ngl = key
        setting = Setting(threads=t, batch=b, ubatch=ub, flash_attn=fa, cache_k=ck, cache_v=cv, gpu_layers=ngl)
        predicted = prompt_tokens / pp[key] + output_tokens / tg[key]
        out.append(ScreenRow(setting=setting.describe(), threads=t, batch=b, ubatch=ub, flash_attn=fa, cache_k=ck,
                             cache_v=cv, gpu_layers=ngl, pp_tps=pp[key], tg_tps=tg[key],
                             predicted_s=predicted))  # fmt: skip
    return sorted(out, key=lambda r: (r.predicted_s, r.setting))


def bench_args(model: Path, settings: Sequence[Setting], *, prompt_tokens: int, output_tokens: int,
               repetitions: int) -> list[list[str]]:  # fmt: skip
    """llama-bench invocations covering `settings`: one per flash-attention value (its comma lists are a Cartesian
    product, and a quantized V cache without flash attention would fail the whole run)."""
    runs = []
    for fa in sorted({s.flash_attn for s in settings}, key=str):
        mine = [s for s in settings if s.flash_attn == fa]

        def values(attr: str, group: list[Setting] = mine) -> str:
            return ",".join(str(v) for v in sorted({getattr(s, attr) for s in group}))

        ngl = ["-ngl", values("gpu_layers")] if any(s.gpu_layers is not None for s in mine) else []
        runs.append([
            "-m", str(model), "-p", str(prompt_tokens), "-n", str(output_tokens), "-d", f"0,{prompt_tokens}",
            "-t", values("threads"), "-b", values("batch"), "-ub", values("ubatch"), "-fa", "on" if fa else "off",
            "-ctk", values("cache_k"), "-ctv", values("cache_v"), *ngl, "-r", str(repetitions), "-o", "json",
        ])  # fmt: skip
    return runs


def screen(
    tools: ToolRunner, model: Path, settings: Sequence[Setting], *, prompt_tokens: int, output_tokens: int,
    repetitions: int, log_path: Path, compute: Compute | None = None,
) -> list[ScreenRow]:  # fmt: skip
    """Measure every setting with llama-bench and rank them by predicted request time (`compute` adds only its GPU
    layers, and only when the settings do not name theirs: the settings carry the threads)."""
    searched = any(s.gpu_layers is not None for s in settings)
    if compute:
        compute = dataclasses.replace(compute, threads=None, gpu_layers=None if searched else compute.gpu_layers)
    rows: list[dict] = []
    for args in bench_args(model, settings, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                           repetitions=repetitions):  # fmt: skip
        run = tools.run("llama-bench", args, log_path=log_path, compute=compute)
        if not run.ok:
            raise run.error(HarnessError, "llama-bench (tune screen)")
        rows += parse_bench("\n".join(run.lines))
    wanted = {s.describe() for s in settings}
    return [r for r in screen_rows(rows, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                                   gpu_layers=searched) if r.setting in wanted]  # fmt: skip


class Guard(Record):
    """A setting's extra KL divergence over the default setting's, on the same held-out chunks."""

    setting: str
    kld: float  # mean KLD against the baseline with the setting
    default_kld: float
    difference: float
    ci_high: float
    chunks: int
    margin: float
    accepted: bool
    why: str


def guard(
    tools: ToolRunner, model: Path, setting: Setting, *, base_file: Path, default: KLDStats, margin: float,
    alpha: float, ctx_size: int, chunks: int, log_path: Path, compute: Compute,
) -> Guard:  # fmt: skip
    """Measure `setting`'s KLD with its flags and accept it only if its loss over `default` (the variant's KLD with
    default flags, on the same base logits) is shown within `margin`: the upper end of the paired interval."""
    mine = run_kld(tools, model, base_file, ctx_size=ctx_size, chunks=chunks, log_path=log_path, compute=compute,
                   desc=f"KLD {setting.describe()}", extra_args=setting.numerics_args())  # fmt: skip
    pair = paired_kld(mine.chunk_kld, default.chunk_kld, alpha=alpha)
    if pair is None:
        raise HarnessError(f"the quality guard needs at least 2 KLD chunks; got {len(mine.chunk_kld)}")
    accepted = pair.ci_high <= margin
    why = (
        f"extra KLD {pair.difference:+.5f} (up to {pair.ci_high:+.5f}) {'within' if accepted else 'not shown within'} "
        f"the margin {margin:g}"
    )
    return Guard(setting=setting.describe(), kld=mine.mean_kld, default_kld=default.mean_kld,
                 difference=pair.difference, ci_high=pair.ci_high, chunks=pair.chunks, margin=margin,
                 accepted=accepted, why=why)  # fmt: skip


# ---------------------------------------------------------------- the stage


class Trial(Record):
    """One setting measured under the load (or the defaults, from the load stage)."""

    setting: str
    server_args: list[str]
    threads: int | None
    gpu_layers: int | None = None  # -ngl, when the trial set it (a GPU build)
    capacity_low: float | None
    capacity_high: float | None
    goodput_rps: float | None  # at its capacity level
    output_tps: float | None
    e2e_p90_s: float | None = None  # at its capacity level: the latency side of the report's Pareto front
    joules_per_output_token: float | None = None  # at its capacity level, where the hardware counts energy
    summary: str  # its load summary, relative to the run directory
    complete: bool = True
    error: str | None = None
    # The command line of the llama-server the trial's last attempt measured, as it ran (harness.server records it).
    argv: list[str] = Field(default_factory=list)


class TuneResult(StageRecord):
    """tune/<variant>.json: the screen, the guard, the trials and the chosen command line."""

    variant: str
    target: str
    screen: list[ScreenRow]
    guards: list[Guard]
    trials: list[Trial]  # the defaults first
    chosen: str  # the chosen trial's setting
    command: str  # the llama-server command line to serve it with: the chosen trial's measured argv, named
    stopped_by: str  # "survivors" (all measured) or "time budget"
    seconds: float


class TuneStage(Stage[TuneResult]):
    """Server settings for each tuned variant (see the module docstring)."""

    name = "tune"
    what = "tune"
    record = TuneResult
    error = LoadTestError

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.experiment.tune.enabled and ctx.experiment.load.enabled

    def units(self, ctx: RunContext) -> list[Unit]:
        models = ctx.models()
        names = ctx.experiment.tune.variants or [n for n, a in models.items() if not a.baseline]
        unknown = [n for n in names if n not in models]
        if unknown:
            raise ConfigError(f"tune.variants: no variant named {unknown[0]!r}; variants: {', '.join(models)}")
        return [Unit(f"tune/{n}", variant=n, label=f"tune {n}") for n in names]

    def output(self, ctx: RunContext, unit: Unit) -> Path:
        return ctx.run.tune(unit.variant)  # type: ignore[arg-type]

    def inputs(self, ctx: RunContext, unit: Unit) -> Any:
        target = _server_target(ctx)
        summary = ctx.run.load_summary(target.label, unit.variant)  # type: ignore[arg-type]
        return {
            "stage": "tune/1", "tune": ctx.experiment.tune.model_dump(mode="json"),
            "defaults": file_identity(summary) if summary.is_file() else None,
            "load": load_inputs(ctx, target, ctx.models()[unit.variant].path),  # type: ignore[index]
        }  # fmt: skip

    def make(self, ctx: RunContext, units: list[Unit]) -> Iterator[tuple[Unit, TuneResult | HarnessError]]:
        for unit in units:
            try:
                yield unit, _Tuning(ctx, unit.variant).run()  # type: ignore[arg-type]
            except HarnessError as exc:
                yield unit, exc


def _server_target(ctx: RunContext) -> TargetConfig:
    """The target whose server takes llama-server's flags (the one whose reference is the build's llama-bench)."""
    for target in ctx.experiment.targets:
        if target.target.runs_llama_bench:
            return target
    raise ConfigError("tune: the settings searched are llama-server's; add a llama-server target")


class _Tuning:
    def __init__(self, ctx: RunContext, variant: str) -> None:
        self.ctx, self.variant = ctx, variant
        self.cfg = ctx.experiment.tune
        self.target = _server_target(ctx)
        self.model = ctx.models()[variant].path
        self.root = ctx.run.root / "tune" / variant
        self.started = time.monotonic()
        self._guards: dict[tuple[str, ...], Guard] = {}  # by the setting's numerics flags
        self._base: Path | None = None  # the baseline's logits on the held-out text
        self._default_kld: KLDStats | None = None  # the variant's KLD with the default flags

    def run(self) -> TuneResult:
        defaults = self._defaults()
        if defaults.capacity_low is None:
            raise LoadTestError(f"tune {self.variant}: the defaults have no capacity: tuning needs [slo] objectives")
        load = self.ctx.experiment.load
        settings = candidates(self.cfg.threads or sorted({1, os.cpu_count() or 1}), self.cfg.batch,
                              self.cfg.ubatch, self.cfg.flash_attn, self.cfg.cache_types,
                              self.cfg.gpu_layers or [None])  # fmt: skip
        ranked = screen(self.ctx.tools, self.model, settings, prompt_tokens=load.prompt_tokens,
                        output_tokens=load.output_tokens, repetitions=self.cfg.repetitions,
                        log_path=self.root / "screen.log", compute=self.ctx.compute(None))  # fmt: skip
        by_name = {s.describe(): s for s in settings}
        guards: list[Guard] = []
        trials = [defaults]
        kept = [by_name[r.setting] for r in survivors(ranked, self.cfg.screen_keep)]

        def measure(setting: Setting) -> float | None:
            if setting.changes_numerics:
                checked = self._guard(setting)
                guards.append(checked)
                if not checked.accepted:
                    log.info("tune: %s: %s rejected: %s", self.variant, setting.describe(), checked.why)
                    return None
            try:
                trials.append(self._trial(setting, defaults))
            except HarnessError as exc:  # its server failed: recorded, and the other settings go on
                log.error("tune: %s: %s failed: %s", self.variant, setting.describe(), exc)
                trials.append(Trial(setting=setting.describe(), server_args=setting.server_args(),
                                    threads=setting.threads, capacity_low=None, capacity_high=None, goodput_rps=None,
                                    output_tps=None, summary="", complete=False, error=str(exc)))  # fmt: skip
            return objective(trials[-1])

        over = lambda: time.monotonic() - self.started > self.cfg.time_budget_s  # noqa: E731
        done = search(kept, self.cfg.survivors, measure, stop=over, seed=self.cfg.seed)
        stopped = "time budget" if over() and len(done) < min(self.cfg.survivors, len(kept)) else "survivors"
        best = max(trials, key=_rank)
        return TuneResult(
            variant=self.variant, target=self.target.label, screen=ranked, guards=guards, trials=trials,
            chosen=best.setting, command=served_command(best.argv, self.model, self.variant), stopped_by=stopped,
            seconds=round(time.monotonic() - self.started, 1),
        )  # fmt: skip

    def _defaults(self) -> Trial:
        path = self.ctx.run.load_summary(self.target.label, self.variant)
        try:
            summary = read_record(path, LoadSummary)
        except (FileNotFoundError, RecordError):
            raise LoadTestError(f"tune {self.variant}: no load measurement of the defaults ({path}): run the load "
                                "stage first") from None  # fmt: skip
        server = self.ctx.experiment.server
        return _trial_of(summary, "(defaults)", list(server.extra_args), server.threads, path, self.ctx.run.root)

    def _trial(self, setting: Setting, defaults: Trial) -> Trial:
        """`setting` under the load: the experiment with its flags, from the defaults' first missed level up or
        down by the capacity search, in a run directory of its own (resumable like any load)."""
        exp = self.ctx.experiment
        start = defaults.capacity_high if defaults.capacity_high is not None else defaults.capacity_low
        if exp.plan().arrival.unit == "users":
            start = int(start)  # type: ignore[arg-type]  # a user count (the records hold it as a float)
        server = exp.server.model_copy(update={
            "threads": setting.threads or exp.server.threads,
            "gpu_layers": exp.server.gpu_layers if setting.gpu_layers is None else setting.gpu_layers,
            "extra_args": merge_args(exp.server.extra_args, setting.server_args()),
        })  # fmt: skip
        load = exp.load.model_copy(update={"steps": [start], "search": True})
        trial_exp = exp.model_copy(update={"server": server, "load": load, "targets": [self.target]})
        run = RunDir(self.root / (re.sub(r"[^A-Za-z0-9]+", "_", setting.describe()).strip("_") or "defaults"))
        _copy_models(self.ctx.run, run, self.variant)
        trial_ctx = RunContext.of(trial_exp, self.ctx.build, run)
        log.info("tune: %s: %s under the load from level %g", self.variant, setting.describe(), start)
        summaries = LoadStage().run(trial_ctx)
        summary = next(iter(summaries.values()))
        path = run.load_summary(self.target.label, self.variant)
        return _trial_of(summary, setting.describe(), server.extra_args, server.threads, path, self.ctx.run.root,
                         gpu_layers=setting.gpu_layers)  # fmt: skip

    def _guard(self, setting: Setting) -> Guard:
        """The guard's verdict on `setting`, measured once per set of numerics flags (threads and batch sizes do not
        change the logits llama-perplexity computes: two settings that differ only there share one measurement)."""
        key = tuple(setting.numerics_args())
        if key not in self._guards:
            exp = self.ctx.experiment
            cfg = exp.mmlu
            compute = self.ctx.compute(cfg.threads)
            if self._default_kld is None:
                baseline = self.ctx.models()[self.ctx.baseline].path
                text = corpus_text(exp.corpus, "kld", cache=self.ctx.cache, llamacpp_tree=self.ctx.build.tree)
                self._base, _ = base_logits(self.ctx.tools, baseline, text, ctx_size=cfg.ctx_size,
                                            chunks=cfg.kld_chunks, cache=self.ctx.cache,
                                            log_path=self.root / "base.log", compute=compute)  # fmt: skip
                self._default_kld = run_kld(self.ctx.tools, self.model, self._base, ctx_size=cfg.ctx_size,
                                            chunks=cfg.kld_chunks, log_path=self.root / "kld-defaults.log",
                                            compute=compute)  # fmt: skip
            assert self._base is not None
            self._guards[key] = guard(
                self.ctx.tools, self.model, setting, base_file=self._base, default=self._default_kld,
                margin=self.cfg.kld_margin, alpha=cfg.alpha, ctx_size=cfg.ctx_size, chunks=cfg.kld_chunks,
                log_path=self.root / "kld-settings.log", compute=compute,
            )  # fmt: skip
        return self._guards[key].model_copy(update={"setting": setting.describe()})


def served_command(argv: Sequence[str], model: Path, variant: str) -> str:
    """The command line to serve a variant with: exactly the `argv` its trial was measured with, the binary by its
    name (`llama-server`, from the build's bin directory) and the model by its path in the run directory
    (`models/<variant>.gguf`, a link to the cached file); empty when the trial recorded none."""
    if not argv:
        return ""
    named = [Path(argv[0]).name]
    for arg in argv[1:]:
        named.append(f"models/{variant}.gguf" if arg == str(model) else arg)
    return shlex.join(named)


def _trial_of(summary: LoadSummary, setting: str, server_args: list[str], threads: int | None, path: Path,
              root: Path, *, gpu_layers: int | None = None) -> Trial:  # fmt: skip
    cap = summary.capacity
    at = next((s for s in summary.steps if cap is not None and s.level == cap.low), None)
    argv = next((a.argv for a in reversed(summary.attempts) if a.argv), [])
    return Trial(
        setting=setting, server_args=list(server_args), threads=threads, gpu_layers=gpu_layers, argv=argv,
        capacity_low=cap.low if cap else None, capacity_high=cap.high if cap else None,
        goodput_rps=at.goodput_rps if at else None, output_tps=at.output_tokens_per_s if at else None,
        e2e_p90_s=at.e2e_s.p90 if at and at.e2e_s else None,
        joules_per_output_token=at.joules_per_output_token if at else None,
        summary=str(path.relative_to(root)), complete=summary.complete, error=summary.error,
    )  # fmt: skip


def survivors(ranked: Sequence[ScreenRow], keep: float) -> list[ScreenRow]:
    """The screened settings that may still win: predicted within `keep` times the best prediction."""
    if not ranked:
        return []
    best = ranked[0].predicted_s
    return [r for r in ranked if r.predicted_s <= keep * best]


def objective(trial: Trial) -> float:
    """What the search maximises: `_rank`'s order as one number for optuna (capacity, goodput at it breaking ties;
    a failed trial: 0)."""
    return (trial.capacity_low or 0) + (trial.goodput_rps or 0) / 1000


# cache_v follows cache_k (candidates)
DIMENSIONS = ("threads", "batch", "ubatch", "flash_attn", "cache_k", "gpu_layers")


def search(
    kept: Sequence[Setting], budget: int, measure: Callable[[Setting], float | None], *, stop: Callable[[], bool],
    seed: int, max_asks: int = 200,
) -> list[Setting]:  # fmt: skip
    """Measure up to `budget` of the screen's survivors `kept` (best-predicted first) and return them in order.

    As many as the budget: each, in the screen's order. More: the screen's best-predicted half of the budget, then
    optuna's TPE sampler (seeded, so a resumed run asks for the same settings in the same order and finds their load
    runs done) over the settings' dimensions; a combination the screen dropped is told as 0 and not measured
    (benchmarks/tune_search.py: the split keeps most of the screen's top when the screen ranks well, and finds the
    best more often when it ranks no better than chance). `measure` returns
    the objective, or None when it did not measure the setting under the load (the quality guard rejected it: not
    counted against the budget)."""
    if len(kept) <= budget:
        done = []
        for setting in kept:
            if stop():
                break
            if measure(setting) is not None:
                done.append(setting)
        return done
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {d: sorted({getattr(s, d) for s in kept}, key=repr) for d in DIMENSIONS}
    by_key = {tuple(getattr(s, d) for d in DIMENSIONS): s for s in kept}
    first = max(1, budget // 2)  # the screen's best-predicted half of the budget, then the sampler's choice
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=first)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for setting in kept[:first]:
        study.enqueue_trial({d: getattr(setting, d) for d in DIMENSIONS})
    values: dict[tuple, float | None] = {}
    done = []
    for _ in range(max_asks):
        if len(done) >= budget or len(values) == len(by_key) or stop():
            break
        trial = study.ask()
        key = tuple(trial.suggest_categorical(d, space[d]) for d in DIMENSIONS)
        if key in by_key and key not in values:
            values[key] = measure(by_key[key])
            if values[key] is not None:
                done.append(by_key[key])
        # Dropped by the screen, or rejected by the guard: told as the worst outcome (0 users), so the sampler
        # learns to leave it; a setting asked for again is told its measured value again.
        study.tell(trial, values.get(key) or 0.0)
    return done


def _rank(trial: Trial) -> tuple:
    """Higher capacity, then higher goodput at it, then the defaults (a setting must be better to be chosen)."""
    return (trial.capacity_low or 0, trial.goodput_rps or 0, trial.setting == "(defaults)")


def _copy_models(source: RunDir, run: RunDir, variant: str) -> None:
    """The trial's models.json: the parent run's, listing only the tuned variant (and the files where they are)."""
    record = read_record(source.models_json, ModelsRecord)
    mine = record.model_copy(update={"variants": [v for v in record.variants if v.name == variant]})
    run.models.mkdir(parents=True, exist_ok=True)
    write_record(run.models_json, mine)
