"""Running llama.cpp's tools (and the Python scripts beside them): the one place that knows how.

`ToolRunner` (a build's `tools`) adds threads and GPU layers from a `Compute` value, answers "does this tool take
this flag" from one cached `--help`, drives a progress bar from the tool's own output lines, writes every line to
the log, and hands back a `ToolRun` whose failure becomes one error quoting the tool's own error line.
`run_logged` is the same for any other command (CMake, convert_hf_to_gguf.py, gguf-py scripts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from harness.console import advance, progress_bar
from harness.errors import HarnessError
from harness.process import exit_reason, running, spawn


class Binaries(Protocol):
    """What the runner needs of a build (harness.build.Build): where each tool is, and whether to repack."""

    repack: bool

    def tool(self, name: str) -> Path: ...


# Words with which llama.cpp's tools, CMake and Python say why they stopped.
ERROR_WORDS = re.compile(
    r"error|failed|unable|invalid|couldn't|cannot|exception|what\(\)|abort|bad_alloc|does not fit|requires a higher"
    r"|you need at least|does not look like|inconsistent|too few|no tasks|bad task|empty answer|malformed",
    re.IGNORECASE,
)

# The model loader's own reason ("unknown model architecture: ...") comes before the generic lines after it.
LOADER_REASON = ("error loading model",)
# Current builds prefix their log lines (not their result lines) with a timestamp and a level: "0.13.645.535 I ".
_LOG_PREFIX_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+ [IWEDC] ")


def strip_log_prefix(line: str) -> str:
    return _LOG_PREFIX_RE.sub("", line, count=1)


def error_line(lines: Sequence[str], *, prefer: Sequence[str] = (), empty: str = "(no output)") -> str:
    """The output line that best says why a program failed.

    The last line containing one of `prefer` (a tool's most specific messages, e.g. the model loader's own reason
    before the generic "failed to init" after it), else the last line with an error word, else the last line.
    """
    for text in prefer:
        for line in reversed(lines):
            if text in line:
                return line.strip()
    for line in reversed(lines):
        if ERROR_WORDS.search(line):
            return line.strip()
    return lines[-1].strip() if lines else empty


def llama_bench_rows(text: str) -> list[dict]:
    """`llama-bench -o json` rows with their avg_ts (both eras print one JSON list; log lines may come before and
    after it); [] when there is none or it cannot be read."""
    start, end = text.find("["), text.rfind("]")
    try:
        rows = json.loads(text[start : end + 1]) if start >= 0 and end > start else []
    except ValueError:
        return []
    return [r for r in rows if isinstance(r, dict) and "avg_ts" in r] if isinstance(rows, list) else []


def llama_bench_rates(lines: Sequence[str]) -> dict[str, float]:
    """`llama-bench -o json` output -> {"pp": tokens/s, "tg": tokens/s} for the tests it ran."""
    rates: dict[str, float] = {}
    for row in llama_bench_rows("\n".join(lines)):
        kind = "tg" if row.get("n_gen") else "pp" if row.get("n_prompt") else None
        if kind:
            rates[kind] = float(row["avg_ts"])
    return rates


@dataclass(frozen=True)
class Compute:
    """Where a tool computes: CPU threads (None = the tool's default) and, on a GPU build, layers offloaded."""

    threads: int | None = None
    gpu_layers: int | None = 999  # None: no -ngl flag (a caller passing its own, e.g. llama-bench's comma list)
    backend: str = "cpu"

    @property
    def has_gpu(self) -> bool:
        return self.backend == "cuda"

    def args(self, tool: str) -> list[str]:
        """The flags that say so to `tool`; llama-quantize takes its thread count as the last positional argument."""
        if tool == "llama-quantize":
            return [str(self.threads)] if self.threads else []
        args = ["-ngl", str(self.gpu_layers)] if self.has_gpu and self.gpu_layers is not None else []
        return args + (["-t", str(self.threads)] if self.threads else [])


@dataclass(frozen=True)
class LineProgress:
    """A progress bar driven by a program's own output: `position(line)` says how far it is, or None."""

    total: int | None
    desc: str
    unit: str
    position: Callable[[str], int | None]
    leave: bool = False


@dataclass
class ToolRun:
    """A finished program: its exit code, its output lines (all, or the last `tail` asked for), wall time, log."""

    cmd: list[str]
    code: int
    lines: list[str]
    seconds: float
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.code == 0

    def why(self, *, prefer: Sequence[str] = ()) -> str:
        return error_line(self.lines, prefer=prefer)

    @property
    def signalled(self) -> bool:
        """Killed by a signal (Python reports signal N as exit code -N)."""
        return self.code < 0

    def error(
        self, error: type[HarnessError], what: str, *, prefer: Sequence[str] = (), why: str | None = None
    ) -> HarnessError:
        """`what failed (exit N): <the tool's own line> (log: ...)` as the caller's error type; a tool killed by a
        signal is named by the signal and its meaning, with the command (its last log line says nothing of it)."""
        if self.signalled:
            return error(f"{what} was {exit_reason(self.code)}; command: {' '.join(self.cmd)} (log: {self.log_path})")
        return error(f"{what} failed (exit {self.code}): {why or self.why(prefer=prefer)} (log: {self.log_path})")


def run_logged(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    progress: LineProgress | None = None,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    tail: int | None = None,
) -> ToolRun:
    """Run `cmd` to completion: every output line into `log_path` (appended) and to `on_line`, progress from the lines.

    The child runs in its own process group and is stopped on every exit path (Ctrl-C included). `tail` keeps only
    the last lines in memory (CMake and converters print many); by default all lines are kept.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: deque[str] = deque(maxlen=tail)
    bar = progress_bar(progress.total, progress.desc, progress.unit, leave=progress.leave) if progress else None
    started = time.monotonic()
    proc = spawn(cmd, env=env, cwd=cwd, capture=True)
    try:
        with running(proc, grace_s=5.0), open(log_path, "a", encoding="utf-8", errors="replace", buffering=1) as log:
            log.write(f"$ {' '.join(str(c) for c in cmd)}\n")
            assert proc.stdout is not None  # spawn(capture=True) always pipes
            for raw in proc.stdout:
                log.write(raw)
                line = raw.rstrip("\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
                if bar is not None and (position := progress.position(line)) is not None:  # type: ignore[union-attr]
                    advance(bar, position)
            proc.wait()
    finally:
        if bar is not None:
            bar.close()
    return ToolRun([str(c) for c in cmd], proc.returncode, list(lines), time.monotonic() - started, log_path)


# Help texts by binary path: asked once per binary and process, whatever asks.
_HELP: dict[str, str] = {}


@dataclass(frozen=True)
class ToolRunner:
    """How every stage runs the tools of one llama.cpp build."""

    build: Binaries

    def path(self, tool: str) -> Path:
        return self.build.tool(tool)

    def command(self, tool: str, args: Sequence[str | os.PathLike[str]], compute: Compute | None = None) -> list[str]:
        """`tool args... [runtime flags] [compute flags]`: the compute flags (threads, GPU layers) always go last; a
        build that must not repack weights tells every tool that takes it so."""
        runtime = [] if self.build.repack else self.no_repack_args(tool)
        return [str(self.path(tool)), *(str(a) for a in args), *runtime, *(compute.args(tool) if compute else [])]

    def no_repack_args(self, tool: str) -> list[str]:
        """The flags that turn weight repacking (and the extra buffer types: AMX) off, as `tool` spells them."""
        if self.supports(tool, "--no-repack"):
            return ["--no-repack"]
        if self.supports(tool, "--repack"):
            return ["--repack", "0"]  # llama-bench
        return []

    def help_text(self, tool: str) -> str:
        """`tool --help` (both streams), asked once per binary."""
        path = str(self.path(tool))
        if path not in _HELP:
            try:
                # In a scratch directory: b3661-era tools write llama.log into their working directory.
                with tempfile.TemporaryDirectory(prefix="llamasys-help-") as scratch:
                    proc = subprocess.run(
                        [path, "--help"], capture_output=True, text=True, timeout=60, cwd=scratch,
                        stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                _HELP[path] = proc.stdout + proc.stderr
            except (OSError, subprocess.TimeoutExpired):
                _HELP[path] = ""
        return _HELP[path]

    def supports(self, tool: str, flag: str) -> bool:
        """Whether this build's `tool` knows `flag`, from its --help."""
        return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", self.help_text(tool)) is not None

    def run(
        self,
        tool: str,
        args: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        compute: Compute | None = None,
        progress: LineProgress | None = None,
        on_line: Callable[[str], None] | None = None,
        tail: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ToolRun:
        """Run `tool` to completion in its log's directory (b3661-era tools write llama.log into their working
        directory: it stays beside our log); `env` adds variables to this process's environment."""
        cmd = self.command(tool, args, compute)
        return run_logged(
            cmd, log_path=log_path, progress=progress, on_line=on_line, cwd=log_path.parent, tail=tail,
            env={**os.environ, **env} if env else None,
        )  # fmt: skip

    def start(
        self,
        tool: str,
        args: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        compute: Compute | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start a long-running tool (llama-server) with its output appended to `log_path`; the caller stops it."""
        cmd = self.command(tool, args, compute)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
        return spawn(cmd, log_path=log_path, cwd=log_path.parent, env={**os.environ, **env} if env else None)
