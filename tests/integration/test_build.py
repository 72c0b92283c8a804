"""Real llama.cpp builds of both eras from the PyPI sdists: identity, cache reuse, and clear failures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import BuildError
from harness.llamacpp import (
    TOOLS,
    Build,
    check_toolchain,
    cmake_configure,
    cmake_configure_args,
    find_nvcc,
    parse_version_output,
)
from tests.integration.helpers import error_line, llamasys

pytestmark = pytest.mark.integration


def test_build_has_every_tool_and_reports_its_identity(any_build: Build):
    for tool in TOOLS:
        assert os.access(any_build.tool(tool), os.X_OK)
    out = subprocess.run([str(any_build.tool("llama-server")), "--version"], capture_output=True, text=True)
    number, commit = parse_version_output(out.stdout + out.stderr)
    assert (number, commit) == (any_build.build_number, any_build.commit)
    assert number != 0 and commit not in ("", "unknown")


def test_eras_are_what_their_sdists_vendor(current_build: Build, legacy_build: Build):
    assert (current_build.era, current_build.build_number, current_build.commit) == ("current", 11312, "0c1e57098")
    assert (legacy_build.era, legacy_build.commit) == ("legacy", "1d1ccce")
    assert current_build.bin_dir != legacy_build.bin_dir


def test_warm_build_compiles_nothing(current_build: Build, cache_dir: Path, tmp_path: Path):
    # With the cache warm, `llamasys build` must not need cmake or a compiler at all: hide them and it still works.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir), "LLAMASYS_CACHE_DIR": str(cache_dir)}
    result = llamasys("build", "--no-progress", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(current_build.bin_dir) in result.stdout
    assert "building llama.cpp" not in result.stderr


def test_missing_cmake_is_one_line_and_exit_3(current_build: Build, tmp_path: Path):
    # A fresh cache forces a build of the (already extracted) local tree; with no cmake on PATH it must stop early.
    assert current_build.tree is not None
    env = {"PATH": str(tmp_path), "LLAMASYS_CACHE_DIR": str(tmp_path / "cache")}
    identity = ["--set", "llamacpp.build_number=11312", "--set", "llamacpp.build_commit='0c1e57098'"]
    result = llamasys("build", "--source", "local", "--path", str(current_build.tree), *identity, env=env, timeout=120)
    assert result.returncode == 3
    assert "cmake is not installed" in error_line(result.stderr)
    assert not (tmp_path / "cache" / "builds").exists() or not any((tmp_path / "cache" / "builds").glob("*/bin"))


def test_pypi_version_that_does_not_exist(tmp_path: Path):
    result = llamasys("build", "--source", "pypi", "--ref", "0.0.999", "--cache-dir", str(tmp_path), timeout=300)
    assert result.returncode == 3
    assert "llama-cpp-python==0.0.999 could not be downloaded from PyPI" in error_line(result.stderr)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_ref_that_does_not_exist(tmp_path: Path):
    # A real git repository on disk stands in for GitHub (no network here); the same clone code runs.
    repo = tmp_path / "llama.cpp"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    subprocess.run([*git, "tag", "b1"], check=True)
    result = llamasys(
        "build", "--source", "git", "--ref", "b9999", "--set", f"llamacpp.git_url='{repo}'",
        "--cache-dir", str(tmp_path / "cache"), timeout=120,
    )  # fmt: skip
    assert result.returncode == 3
    assert "cannot fetch llama.cpp ref 'b9999'" in error_line(result.stderr)
    assert not list((tmp_path / "cache" / "sources").glob("git-*b9999"))  # no half entry left behind


@pytest.mark.skipif(find_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_configure_accepts_our_flags(current_build: Build, tmp_path: Path):
    # No GPU here, but nvcc is: CMake's configure step compiles a CUDA probe for our architectures with it.
    assert current_build.tree is not None
    args = cmake_configure_args(
        era="current", backend="cuda", cuda_architectures="90", build_number=1, commit="test", extra=[]
    )
    env = {**os.environ, **check_toolchain("cuda")}
    try:
        cmake_configure(current_build.tree, tmp_path / "tree", args, log_path=tmp_path / "configure.log", env=env)
    except BuildError as exc:
        # This machine's toolkit is nvcc and the runtime only; then the one acceptable failure is the clear
        # cuBLAS message, after CMake accepted the compiler and the architectures.
        assert "has no cuBLAS, which llama.cpp's CUDA backend links" in str(exc)
    cache = (tmp_path / "tree" / "CMakeCache.txt").read_text()
    assert "GGML_CUDA:BOOL=ON" in cache
    assert re.search(r"CMAKE_CUDA_ARCHITECTURES:\w+=90\n", cache)
    assert re.search(r"CMAKE_CUDA_COMPILER:\w+=.*nvcc", cache)
