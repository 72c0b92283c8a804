"""KL divergence of a variant against the F16 baseline on a text corpus (llama-perplexity --kl-divergence).

`--kl-divergence-base FILE` runs once on the baseline over the corpus and saves its log-probabilities (hundreds of
MB: context x chunks x vocabulary x 2 bytes), cached under `cache_dir/kld/` keyed by the baseline's content hash,
the corpus, context, chunks and build. `--kl-divergence` then runs per variant against that file and prints the
statistics this module parses (both eras print the same labels; b3661-era builds print "99.0% KLD" twice and no
95/90 % lines, and all of it on stdout).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from harness.cache import file_sha256
from harness.errors import HarnessError, MMLUError
from harness.llamacpp import Build
from harness.process import run_streaming
from harness.rundir import inputs_digest
from mmlu.multiple_choice import strip_log_prefix
from mmlu.tokens import file_identity

_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_STAT_RE = re.compile(rf"^\s*(?P<label>[^:\[\]]+?)\s*:\s*(?P<value>{_NUM})\s*(?:±\s*(?P<sigma>{_NUM}))?\s*%?\s*$")
_CHUNK_RE = re.compile(rf"^\s*(?P<chunk>\d+)\s+(?:{_NUM})\s+±\s+(?:{_NUM})\s+")
_PPL_RE = re.compile(rf"Final estimate:\s*PPL\s*=\s*(?P<ppl>{_NUM})\s*\+/-\s*(?P<sigma>{_NUM})")
_PROBLEM_RE = re.compile(r"error|failed|you need at least|does not look like|inconsistent|too few", re.IGNORECASE)


@dataclass(frozen=True)
class KLDStats:
    """The statistics llama-perplexity prints at the end of a --kl-divergence run."""

    mean_kld: float
    mean_kld_sigma: float | None  # uncertainties are None where llama-perplexity prints nan (no spread)
    kld_p99: float
    kld_median: float
    kld_max: float
    same_top_p: float  # fraction of tokens where both models rank the same token first
    same_top_p_sigma: float | None
    ppl: float
    ppl_base: float
    ppl_ratio: float
    ppl_ratio_sigma: float | None
    rms_delta_p: float  # root mean square of the change in the correct token's probability, fraction
    chunks: int


def _label(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def parse_kld_output(text: str) -> KLDStats:
    """Final statistics of a --kl-divergence run (merged output of either era)."""
    values: dict[str, tuple[float, float | None]] = {}
    chunks = 0
    problems: list[str] = []
    for raw in text.splitlines():
        line = strip_log_prefix(raw)
        if match := _CHUNK_RE.match(line):
            chunks = max(chunks, int(match["chunk"]))
            continue
        if match := _STAT_RE.match(line):
            label = _label(match["label"])
            sigma = float(match["sigma"]) if match["sigma"] is not None else None
            values.setdefault(label, (float(match["value"]), sigma))  # b3661 repeats "99.0% KLD": first wins
        elif _PROBLEM_RE.search(line):
            problems.append(line.strip())
    needed = ["Mean KLD", "99.0% KLD", "Median KLD", "Maximum KLD", "Same top p", "Mean PPL(Q)", "Mean PPL(base)",
              "Mean PPL(Q)/PPL(base)", "RMS Δp"]  # fmt: skip
    missing = [k for k in needed if k not in values]
    if missing:
        why = problems[-1] if problems else f"no {missing[0]!r} line"
        raise MMLUError(f"llama-perplexity --kl-divergence printed no statistics: {why}")

    def value(label: str) -> float:
        return values[label][0]

    def sigma(label: str, scale: float = 1.0) -> float | None:
        value = values[label][1]
        return value / scale if value is not None and math.isfinite(value) else None

    return KLDStats(
        mean_kld=value("Mean KLD"),
        mean_kld_sigma=sigma("Mean KLD"),
        kld_p99=value("99.0% KLD"),
        kld_median=value("Median KLD"),
        kld_max=value("Maximum KLD"),
        same_top_p=value("Same top p") / 100.0,
        same_top_p_sigma=sigma("Same top p", 100.0),
        ppl=value("Mean PPL(Q)"),
        ppl_base=value("Mean PPL(base)"),
        ppl_ratio=value("Mean PPL(Q)/PPL(base)"),
        ppl_ratio_sigma=sigma("Mean PPL(Q)/PPL(base)"),
        rms_delta_p=value("RMS Δp") / 100.0,
        chunks=chunks,
    )


def parse_ppl_output(text: str) -> tuple[float, float]:
    """`Final estimate: PPL = 12.3456 +/- 0.12345` of a perplexity (or --kl-divergence-base) run."""
    match = _PPL_RE.search(text)
    if not match:
        problems = [ln.strip() for ln in text.splitlines() if _PROBLEM_RE.search(ln)]
        raise MMLUError(f"llama-perplexity printed no final perplexity: {problems[-1] if problems else 'no output'}")
    return float(match["ppl"]), float(match["sigma"])


# ---------------------------------------------------------------- running


def model_sha256(path: Path, cache_dir: Path) -> str:
    """Content hash of a model file, remembered per (path, size, mtime) so a multi-GB file is hashed once."""
    memo = cache_dir / "kld" / "model-hashes.json"
    key = inputs_digest(file_identity(path))
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    known[key] = file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(memo) + ".lock"):
        tmp = memo.with_suffix(".partial")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, memo)
    return known[key]


def _common_args(build: Build, *, ctx_size: int, threads: int | None, gpu_layers: int) -> list[str]:
    args = ["-c", str(ctx_size)]
    if build.has_gpu:
        args += ["-ngl", str(gpu_layers)]
    if threads:
        args += ["-t", str(threads)]
    return args


def _run(cmd: list[str], *, log_path: Path, desc: str, total: int, progress: bool) -> tuple[int, str]:
    lines: list[str] = []
    bar = tqdm(total=total, desc=desc, unit="chunk", disable=not progress, file=sys.stderr, leave=False)

    def on_line(line: str) -> None:
        lines.append(line)
        if (match := _CHUNK_RE.match(line)) is not None and int(match["chunk"]) > bar.n:
            bar.update(min(total, int(match["chunk"])) - bar.n)

    try:
        code, _ = run_streaming(cmd, log_path=log_path, on_line=on_line, cwd=log_path.parent)
    except HarnessError as exc:
        raise MMLUError(f"cannot run llama-perplexity: {exc}") from None
    finally:
        bar.close()
    return code, "\n".join(lines)


def base_logits(
    build: Build,
    baseline_model: Path,
    corpus: Path,
    *,
    ctx_size: int,
    chunks: int,
    cache_dir: Path,
    log_path: Path,
    threads: int | None = None,
    gpu_layers: int = 999,
    progress: bool = True,
) -> tuple[Path, float]:
    """The baseline's saved log-probabilities over the corpus (computed once, cached), and its perplexity."""
    key = inputs_digest({
        "model_sha256": model_sha256(baseline_model, cache_dir),
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "ctx": ctx_size,
        "chunks": chunks,
        "build": build.cache_key,
    })  # fmt: skip
    target = cache_dir / "kld" / f"base-{key}.logits"
    record = target.with_suffix(".json")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file() and record.is_file():
            return target, float(json.loads(record.read_text(encoding="utf-8"))["ppl"])
        partial = target.with_suffix(".partial")
        cmd = [str(build.tool("llama-perplexity")), "-m", str(baseline_model), "-f", str(corpus),
               "--kl-divergence-base", str(partial), "--chunks", str(chunks),
               *_common_args(build, ctx_size=ctx_size, threads=threads, gpu_layers=gpu_layers)]  # fmt: skip
        code, text = _run(cmd, log_path=log_path, desc="KLD base logits", total=chunks, progress=False)
        if code != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            problems = [ln.strip() for ln in text.splitlines() if _PROBLEM_RE.search(ln)]
            why = problems[-1] if problems else "no output"
            raise MMLUError(f"llama-perplexity --kl-divergence-base failed (exit {code}): {why} (log: {log_path})")
        ppl, _sigma = parse_ppl_output(text)
        os.replace(partial, target)
        record.write_text(json.dumps({"ppl": ppl, "model": str(baseline_model), "corpus": str(corpus)}))
    return target, ppl


def run_kld(
    build: Build,
    model: Path,
    base_file: Path,
    *,
    ctx_size: int,
    chunks: int,
    log_path: Path,
    threads: int | None = None,
    gpu_layers: int = 999,
    progress: bool = True,
    desc: str = "KLD",
) -> KLDStats:
    """KL divergence of `model` against the saved baseline log-probabilities."""
    cmd = [str(build.tool("llama-perplexity")), "-m", str(model), "--kl-divergence-base", str(base_file)]
    cmd += ["--kl-divergence", *_common_args(build, ctx_size=ctx_size, threads=threads, gpu_layers=gpu_layers)]
    code, text = _run(cmd, log_path=log_path, desc=desc, total=chunks, progress=progress)
    if code != 0:
        problems = [ln.strip() for ln in text.splitlines() if _PROBLEM_RE.search(ln)]
        why = problems[-1] if problems else "no output"
        raise MMLUError(f"llama-perplexity --kl-divergence failed (exit {code}): {why} (log: {log_path})")
    return parse_kld_output(text)


def stats_to_json(stats: KLDStats) -> dict:
    return asdict(stats)
