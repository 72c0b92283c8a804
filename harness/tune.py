"""Server settings for `[tune]` (issue 22), phase one: the llama-bench screen.

A setting is one llama-server command line's worth of performance flags (threads, batch and micro-batch, flash
attention, KV-cache types, GPU layers). The screen measures every candidate with llama-bench on the variant's own
model, prompt processing at the load's prompt length and generation at its depth (`-d prompt_tokens`), and predicts
one request's time from the two rates: prompt / pp + output / tg. The settings with the lowest prediction go on to be
measured under load; the rest cannot plausibly win.

The quality guard (`guard`): a setting that changes the numerics (a quantized KV cache, flash attention) is measured
for KL divergence against the baseline with the same flags in llama-perplexity, paired on the same held-out chunks
against the variant with the default setting; it is accepted only when the paired interval's upper end is within
`margin` (its extra loss shown to be at most the margin).

Not yet here (see the issue's note): the Locust trials of the survivors, the search over them, energy, the report.
A quantized V cache needs flash attention (llama.cpp refuses the context otherwise), so such combinations are never
generated; llama-bench runs the Cartesian product of its comma lists, so the screen runs once per flash-attention
value with the V-cache types that value allows.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.kld import KLDStats, paired_kld, run_kld
from harness.records import Record
from harness.tools import Compute, ToolRunner


@dataclass(frozen=True, order=True)
class Setting:
    """llama-server's performance flags for one trial (None: the server's default)."""

    threads: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    flash_attn: bool | None = None
    cache_k: str | None = None
    cache_v: str | None = None

    def server_args(self) -> list[str]:
        """The flags as llama-server (b11312) takes them; threads come from the Compute the runner adds."""
        args: list[str] = []
        for flag, value in (("-b", self.batch), ("-ub", self.ubatch), ("-ctk", self.cache_k), ("-ctv", self.cache_v)):
            if value is not None:
                args += [flag, str(value)]
        if self.flash_attn is not None:
            args += ["-fa", "on" if self.flash_attn else "off"]
        return args

    def describe(self) -> str:
        parts = [f"-t {self.threads}" if self.threads else ""] + self.server_args()
        return " ".join(p for p in parts if p) or "(defaults)"

    @property
    def changes_numerics(self) -> bool:
        """Whether llama.cpp computes other logits with this setting (threads and batch sizes aside)."""
        return bool(self.flash_attn) or self.cache_k not in (None, "f16") or self.cache_v not in (None, "f16")

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
    cache_types: Sequence[str],
) -> list[Setting]:  # fmt: skip
    """Every valid combination (the K and V caches take the same type; micro-batch at most the batch)."""
    out = []
    for t, b, ub, fa, ct in itertools.product(threads, batch, ubatch, flash_attn, cache_types):
        setting = Setting(threads=t, batch=b, ubatch=ub, flash_attn=fa, cache_k=ct, cache_v=ct)
        if ub <= b and setting.valid:
            out.append(setting)
    return out


class ScreenRow(Record):
    """One setting's llama-bench rates and the request time they predict."""

    setting: str  # Setting.describe()
    threads: int
    batch: int
    ubatch: int
    flash_attn: bool
    cache_k: str
    cache_v: str
    pp_tps: float  # prompt processing at the load's prompt length
    tg_tps: float  # generation at the load's depth
    predicted_s: float  # prompt / pp + output / tg


def parse_bench(text: str) -> list[dict]:
    """`llama-bench -o json` rows (log lines may surround the JSON list)."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        raise HarnessError("llama-bench printed no JSON results")
    try:
        rows = json.loads(text[start : end + 1])
    except ValueError as exc:
        raise HarnessError(f"llama-bench printed unreadable JSON: {exc}") from None
    return [r for r in rows if isinstance(r, dict) and "avg_ts" in r]


def screen_rows(rows: Iterable[dict], *, prompt_tokens: int, output_tokens: int) -> list[ScreenRow]:
    """Pair each setting's pp (n_prompt = prompt_tokens at depth 0) and tg (n_gen = output_tokens at depth
    prompt_tokens) rows into a prediction, lowest predicted time first."""
    pp: dict[tuple, float] = {}
    tg: dict[tuple, float] = {}
    for r in rows:
        key = (int(r["n_threads"]), int(r["n_batch"]), int(r["n_ubatch"]), bool(r["flash_attn"]), r["type_k"],
               r["type_v"])  # fmt: skip
        if r["n_prompt"] == prompt_tokens and r["n_gen"] == 0 and r["n_depth"] == 0:
            pp[key] = float(r["avg_ts"])
        elif r["n_gen"] == output_tokens and r["n_prompt"] == 0 and r["n_depth"] == prompt_tokens:
            tg[key] = float(r["avg_ts"])
    out = []
    for key in sorted(pp.keys() & tg.keys()):
        t, b, ub, fa, ck, cv = key
        setting = Setting(threads=t, batch=b, ubatch=ub, flash_attn=fa, cache_k=ck, cache_v=cv)
        predicted = prompt_tokens / pp[key] + output_tokens / tg[key]
        out.append(ScreenRow(setting=setting.describe(), threads=t, batch=b, ubatch=ub, flash_attn=fa, cache_k=ck,
                             cache_v=cv, pp_tps=pp[key], tg_tps=tg[key], predicted_s=predicted))  # fmt: skip
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

        runs.append([
            "-m", str(model), "-p", str(prompt_tokens), "-n", str(output_tokens), "-d", f"0,{prompt_tokens}",
            "-t", values("threads"), "-b", values("batch"), "-ub", values("ubatch"), "-fa", "on" if fa else "off",
            "-ctk", values("cache_k"), "-ctv", values("cache_v"), "-r", str(repetitions), "-o", "json",
        ])  # fmt: skip
    return runs


def screen(
    tools: ToolRunner, model: Path, settings: Sequence[Setting], *, prompt_tokens: int, output_tokens: int,
    repetitions: int, log_path: Path, compute: Compute | None = None,
) -> list[ScreenRow]:  # fmt: skip
    """Measure every setting with llama-bench and rank them by predicted request time (`compute` adds only its GPU
    layers: the settings carry the threads)."""
    compute = dataclasses.replace(compute, threads=None) if compute else None
    rows: list[dict] = []
    for args in bench_args(model, settings, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                           repetitions=repetitions):  # fmt: skip
        run = tools.run("llama-bench", args, log_path=log_path, compute=compute)
        if not run.ok:
            raise run.error(HarnessError, "llama-bench (tune screen)")
        rows += parse_bench("\n".join(run.lines))
    wanted = {s.describe() for s in settings}
    return [r for r in screen_rows(rows, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
            if r.setting in wanted]  # fmt: skip


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
