"""KL divergence of a variant against the F16 baseline on a text corpus (llama-perplexity --kl-divergence).

`--kl-divergence-base FILE` runs once on the baseline over the corpus and saves its log-probabilities (hundreds of
MB: context x chunks x vocabulary x 2 bytes), cached under `<cache>/kld/` keyed by the baseline's content hash,
the corpus, context, chunks and build. `--kl-divergence` then runs per variant against that file and prints the
statistics this module parses (both eras print the same labels; b3661-era builds print "99.0% KLD" twice and no
95/90 % lines, and all of it on stdout).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from filelock import FileLock
from scipy import stats

from harness.cache import CacheDir, atomic_dir, file_identity, file_sha256
from harness.errors import MMLUError
from harness.records import Record, RecordError, inputs_digest, read_record, write_record
from harness.tools import Compute, LineProgress, ToolRun, ToolRunner, strip_log_prefix

log = logging.getLogger(__name__)

_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_STAT_RE = re.compile(rf"^\s*(?P<label>[^:\[\]]+?)\s*:\s*(?P<value>{_NUM})\s*(?:±\s*(?P<sigma>{_NUM}))?\s*%?\s*$")
_CHUNK_RE = re.compile(rf"^\s*(?P<chunk>\d+)\s+(?:{_NUM})\s+±\s+(?:{_NUM})\s+")
# A chunk's line: its number, then the running PPL, ln(PPL(Q)/PPL(base)), KLD, RMS Δp and same-top, each "x ± s".
_CHUNK_KLD_RE = re.compile(rf"^\s*(?P<chunk>\d+)(?:\s+{_NUM}\s+±\s+{_NUM}){{2}}\s+(?P<kld>{_NUM})\s+±\s+{_NUM}")
_PPL_RE = re.compile(rf"Final estimate:\s*PPL\s*=\s*(?P<ppl>{_NUM})\s*\+/-\s*(?P<sigma>{_NUM})")
_PROBLEM_RE = re.compile(r"error|failed|you need at least|does not look like|inconsistent|too few", re.IGNORECASE)


class KLDStats(Record):
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
    rms_delta_p_sigma: float | None = None
    chunks: int
    # Each chunk's mean KLD, recovered from the running means the tool prints after every chunk (see chunk_means).
    chunk_kld: list[float] = []


def _label(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def parse_kld_output(text: str) -> KLDStats:
    """Final statistics of a --kl-divergence run (merged output of either era)."""
    values: dict[str, tuple[float, float | None]] = {}
    chunks = 0
    running: dict[int, float] = {}
    problems: list[str] = []
    for raw in text.splitlines():
        line = strip_log_prefix(raw)
        if match := _CHUNK_RE.match(line):
            chunks = max(chunks, int(match["chunk"]))
            if kld := _CHUNK_KLD_RE.match(line):
                running[int(kld["chunk"])] = float(kld["kld"])
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
        rms_delta_p_sigma=sigma("RMS Δp", 100.0),
        chunks=chunks,
        chunk_kld=chunk_means([running[k] for k in range(1, chunks + 1)]) if len(running) == chunks else [],
    )


def chunk_means(running: list[float]) -> list[float]:
    """Each chunk's mean KLD from the running means after chunks 1..n (every chunk scores the same number of
    tokens, the second half of its context): chunk k is k m_k - (k - 1) m_(k-1). The tool prints the running means
    to 5 decimals, so a recovered value carries a rounding error of up to about k * 1e-5; the errors of neighbouring
    chunks cancel in their sum (the mean of the recovered values is m_n), and they add spread, never remove it, so
    an interval from them is if anything wider than the exact one."""
    previous = [0.0, *running[:-1]]
    return [round(k * m - (k - 1) * p, 6) for k, (m, p) in enumerate(zip(running, previous, strict=True), 1)]


class PairedKLD(Record):
    """A's mean KLD minus B's on the same chunks of the same text, with a paired t interval over the chunks."""

    chunks: int
    difference: float
    ci_low: float
    ci_high: float
    verdict: Literal["lower", "no different", "higher"]


def paired_kld(a: Sequence[float], b: Sequence[float], *, alpha: float) -> PairedKLD | None:
    """Compare two variants' per-chunk KLD against the same baseline on the same chunks: the mean of the per-chunk
    differences and its two-sided 1 - alpha t interval (scipy's paired t test). Chunks, not tokens, are the units:
    neighbouring tokens are correlated, chunks of a long text nearly are not. None with fewer than 2 common chunks
    (no spread to estimate)."""
    n = min(len(a), len(b))
    if n < 2:
        return None
    x, y = np.asarray(a[:n], dtype=float), np.asarray(b[:n], dtype=float)
    d = x - y
    diff = float(np.mean(d))
    if np.allclose(d, d[0], rtol=0, atol=1e-12):  # no spread: the difference is what it is on every chunk
        low = high = diff
    else:
        interval = stats.ttest_rel(x, y).confidence_interval(1 - alpha)
        low, high = float(interval.low), float(interval.high)
    verdict = "lower" if high < 0 else "higher" if low > 0 else "no different"
    return PairedKLD(chunks=n, difference=diff, ci_low=low, ci_high=high, verdict=verdict)


def parse_ppl_output(text: str) -> tuple[float, float]:
    """`Final estimate: PPL = 12.3456 +/- 0.12345` of a perplexity (or --kl-divergence-base) run."""
    match = _PPL_RE.search(text)
    if not match:
        problems = [ln.strip() for ln in text.splitlines() if _PROBLEM_RE.search(ln)]
        raise MMLUError(f"llama-perplexity printed no final perplexity: {problems[-1] if problems else 'no output'}")
    return float(match["ppl"]), float(match["sigma"])


# ---------------------------------------------------------------- running


class BaseLogits(Record):
    """Beside a cached base-logits file: what it was computed from, and the baseline's perplexity over the text."""

    ppl: float
    model: str
    corpus: str


class _ModelHashes(Record):
    hashes: dict[str, str] = {}


def model_sha256(path: Path, cache: CacheDir) -> str:
    """Content hash of a model file, remembered per (path, size, mtime) so a multi-GB file is hashed once."""
    memo = cache.kld / "model-hashes.json"
    key = inputs_digest(file_identity(path))
    with FileLock(str(memo) + ".lock"):
        try:
            known = read_record(memo, _ModelHashes)
        except (FileNotFoundError, RecordError):
            known = _ModelHashes()
        if key not in known.hashes:
            known.hashes[key] = file_sha256(path)
            write_record(memo, known)
    return known.hashes[key]


def _chunk_position(line: str) -> int | None:
    match = _CHUNK_RE.match(line)
    return int(match["chunk"]) if match else None


def _failure(run: ToolRun, what: str) -> MMLUError:
    return run.error(MMLUError, f"llama-perplexity {what}")  # type: ignore[return-value]


# Current llama.cpp tools log through a thread that is never joined at exit (llama.cpp #22142: "logs may be lost if
# not flushed before the program exits"): a run that exits 0 can lose its last lines, the statistics among them. On
# short runs it happens often (8 of 20 runs of a tiny model here), so such a run is repeated.
CUT_SHORT_RETRIES = 3


def _has_statistics(text: str) -> bool:
    try:
        parse_kld_output(text)
    except MMLUError:
        return False
    return True


def _complete_run(
    tools: ToolRunner, args: list[str], *, complete: Callable[[str], bool], log_path: Path, **kwargs: Any
) -> ToolRun:
    """llama-perplexity with `args`, run again (up to CUT_SHORT_RETRIES times) while it exits 0 without the output
    `complete` looks for."""
    for attempt in range(1, CUT_SHORT_RETRIES + 1):
        run = tools.run("llama-perplexity", args, log_path=log_path, **kwargs)
        if not run.ok or complete("\n".join(run.lines)):
            return run
        log.info("llama-perplexity exited without its final lines (llama.cpp #22142); running again (%d/%d)",
                 attempt, CUT_SHORT_RETRIES)  # fmt: skip
    return run


def base_logits(
    tools: ToolRunner,
    baseline_model: Path,
    corpus: Path,
    *,
    ctx_size: int,
    chunks: int,
    cache: CacheDir,
    log_path: Path,
    compute: Compute,
) -> tuple[Path, float]:
    """The baseline's saved log-probabilities over the corpus (computed once, cached), and its perplexity."""
    key = inputs_digest({
        "model_sha256": model_sha256(baseline_model, cache),
        "corpus_sha256": file_sha256(corpus),
        "ctx": ctx_size,
        "chunks": chunks,
        "build": tools.build.cache_key,
    })  # fmt: skip
    entry = cache.kld / f"base-{key}"  # base.logits and base.json, made together and sealed

    def make(tmp: Path) -> None:
        args = ["-m", str(baseline_model), "-f", str(corpus), "--kl-divergence-base", str(tmp / "base.logits"),
                "--chunks", str(chunks), "-c", str(ctx_size)]  # fmt: skip
        run = _complete_run(tools, args, complete=_PPL_RE.search, log_path=log_path, compute=compute)
        if not run.ok or not (tmp / "base.logits").is_file():
            raise _failure(run, "--kl-divergence-base")
        ppl, _sigma = parse_ppl_output("\n".join(run.lines))
        write_record(tmp / "base.json", BaseLogits(ppl=ppl, model=str(baseline_model), corpus=str(corpus)))

    atomic_dir(entry, make)
    return entry / "base.logits", read_record(entry / "base.json", BaseLogits).ppl


def run_kld(
    tools: ToolRunner,
    model: Path,
    base_file: Path,
    *,
    ctx_size: int,
    chunks: int,
    log_path: Path,
    compute: Compute,
    desc: str = "KLD",
    extra_args: Sequence[str] = (),
) -> KLDStats:
    """KL divergence of `model` against the saved baseline log-probabilities; `extra_args` are settings that change
    the numerics (a KV-cache type, flash attention), measured as they would be served."""
    args = ["-m", str(model), "--kl-divergence-base", str(base_file), "--kl-divergence", "-c", str(ctx_size)]
    args += list(extra_args)
    run = _complete_run(
        tools, args, complete=_has_statistics, log_path=log_path,
        compute=compute, progress=LineProgress(chunks, desc, "chunk", _chunk_position),
    )  # fmt: skip
    if not run.ok:
        raise _failure(run, "--kl-divergence")
    return parse_kld_output("\n".join(run.lines))
