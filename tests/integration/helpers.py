"""Helpers for integration tests: run the real CLI, and find llama.cpp processes that mention a path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

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
