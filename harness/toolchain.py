"""The programs a build needs: CMake, C and C++ compilers, and for CUDA the toolkit's nvcc; a clear error for the
first one missing, before anything is compiled."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from harness.cpu import c_compiler
from harness.errors import ToolMissingError


def find_nvcc(environ: Mapping[str, str] | None = None) -> Path | None:
    """nvcc from $CUDACXX, then PATH, then $CUDA_HOME/bin (default /usr/local/cuda), as CMake looks for it."""
    env = os.environ if environ is None else environ
    cuda_home = env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (env.get("CUDACXX"), shutil.which("nvcc", path=env.get("PATH", "")), f"{cuda_home}/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def check_toolchain(backend: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The programs a build needs, or a clear error naming the missing one. Returns extra environment."""
    env = os.environ if environ is None else environ
    path = env.get("PATH", "")
    if shutil.which("cmake", path=path) is None:
        raise ToolMissingError("cmake is not installed; install it (e.g. apt-get install cmake) to build llama.cpp")
    compilers = (env.get("CXX", "c++"), "g++", "clang++")
    if not any(shutil.which(c, path=path) for c in compilers):
        raise ToolMissingError("no C++ compiler found; install one (e.g. apt-get install g++)")
    c_compiler(env)
    extra: dict[str, str] = {}
    if backend == "cuda":
        nvcc = find_nvcc(env)
        if nvcc is None:
            raise ToolMissingError(
                "backend 'cuda' needs the CUDA toolkit, but nvcc was not found (looked at $CUDACXX, PATH and "
                "$CUDA_HOME/bin); install the toolkit or use llamacpp.backend = 'cpu'"
            )
        extra["CUDACXX"] = str(nvcc)
    return extra
