"""Shared fixtures: real llama.cpp builds of both eras (cached across runs) and the real small model."""

from __future__ import annotations

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
