"""Shared fixtures: real llama.cpp builds of both eras (cached across runs) and the real small model."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.build import Build
from harness.cache import CacheDir, default_cache_dir
from harness.config import LlamaCppConfig
from harness.llamacpp import ensure_build
from harness.models.sources import smollm2_gguf


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    # The same cache the CLI uses, so CI's second run and a developer's machine reuse builds and downloads.
    path = default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


# llama-cpp-python 0.2.90 vendors llama.cpp 1d1ccce (a few commits before b3661); its exact build number is not
# recorded anywhere offline, so the fixture pins the one its own sdist build-info says (1) to prove injection.
LEGACY_CONFIG = LlamaCppConfig(source="pypi", ref="0.2.90", build_number=1, build_commit="1d1ccce")
CURRENT_CONFIG = LlamaCppConfig(source="pypi", ref="0.3.36")


@pytest.fixture(scope="session")
def current_build(cache_dir: Path) -> Build:
    return ensure_build(CURRENT_CONFIG, cache_dir)


@pytest.fixture(scope="session")
def legacy_build(cache_dir: Path) -> Build:
    return ensure_build(LEGACY_CONFIG, cache_dir)


@pytest.fixture(scope="session", params=["current", "legacy"])
def any_build(request: pytest.FixtureRequest) -> Build:
    return request.getfixturevalue(f"{request.param}_build")


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path) -> Path:
    return smollm2_gguf(CacheDir(cache_dir))


@dataclass(frozen=True)
class DemoRun:
    """One finished `llamasys demo`, as a user runs it: what it printed, and what it left in its run directory when it
    finished (read then, so that a test that runs it again cannot change what the others read)."""

    root: Path
    result: subprocess.CompletedProcess
    results: dict
    manifest: dict
    page: str


@pytest.fixture(scope="session")
def demo_run(cache_dir: Path, current_build: Build, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`llamasys demo` run once for the whole session: every test that needs a finished run reads this one (the
    pipeline's own tests, the report in Chromium, the models it made)."""
    from tests.integration.helpers import llamasys

    root = tmp_path_factory.mktemp("demo") / "demo"
    result = llamasys("demo", "--run-dir", str(root), "--no-progress", env={"LLAMASYS_CACHE_DIR": str(cache_dir)},
                      timeout=3000)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return DemoRun(
        root, result, json.loads((root / "results.json").read_text()), json.loads((root / "manifest.json").read_text()),
        (root / "report.html").read_text(),
    )  # fmt: skip
