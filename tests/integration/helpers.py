"""Helpers for integration tests: run the real CLI (to the end, or started and interrupted), and find llama.cpp
processes that mention a path."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def llamasys(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the installed CLI exactly as a user would, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", *args], cwd=REPO, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_until(predicate: Callable[[], bool], proc: subprocess.Popen | None, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@contextlib.contextmanager
def stopped_at_the_end(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line contains `text` (e.g. a test's private model path)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def error_line(stderr: str) -> str:
    """The CLI's error: exactly one line starting with 'llamasys: error:'."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("llamasys: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def write_models(run, models: dict) -> None:
    """A models/models.json listing ready GGUF files as the variants (what the models stage leaves for the others).

    `models` maps variant name -> GGUF path; the first is the baseline.
    """
    from harness.models.records import ModelArtifact, ModelSourceInfo, ModelsRecord
    from harness.records import write_record

    first = next(iter(models.values()))
    artifacts = [
        ModelArtifact(
            name=name,
            type="F16" if i == 0 else "Q4_1",
            path=Path(path),
            size_bytes=Path(path).stat().st_size,
            n_params=1,
            bits_per_weight=1.0,
            imatrix=None,
            source=Path(first),
            baseline=i == 0,
        )  # fmt: skip
        for i, (name, path) in enumerate(models.items())
    ]
    info = ModelSourceInfo(
        source="gguf", description="test models", identity="test", checkpoint=None, baseline=str(first),
        baseline_type="F16", n_params=1, architecture="llama", pre_tokenizer=None, pretokenizer_fallback=False,
        convert_seconds=0.0,
    )  # fmt: skip
    write_record(run.models_json, ModelsRecord(model=info, build={}, variants=artifacts))
