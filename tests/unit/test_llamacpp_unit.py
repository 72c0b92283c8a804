"""Pure parts of the llama.cpp build: configure flags per era/backend, cache keys, output parsing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.config import LlamaCppConfig
from harness.errors import ToolMissingError
from harness.llamacpp import cache_key, cmake_configure_args, detect_era, parse_build_progress, parse_version_output
from harness.toolchain import check_toolchain


def args(era="current", backend="cpu", arch="90", extra=()):
    return cmake_configure_args(
        era=era, backend=backend, cuda_architectures=arch, build_number=3661, commit="abc1234", extra=list(extra)
    )


def test_current_era_cpu_flags():
    a = args()
    assert "-DGGML_NATIVE=ON" in a and "-DLLAMA_CURL=OFF" in a
    # Shared libraries found beside the tools wherever the directory moves: what llama-cpp-python's bindings load.
    assert "-DBUILD_SHARED_LIBS=ON" in a and "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON" in a
    assert "-DLLAMA_BUILD_NUMBER=3661" in a and "-DLLAMA_BUILD_COMMIT=abc1234" in a
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in a
    assert not any("CUDA" in x for x in a)


def test_legacy_era_builds_tools_as_examples_and_pins_identity_elsewhere():
    a = args(era="legacy")
    assert "-DLLAMA_BUILD_EXAMPLES=ON" in a and "-DBUILD_SHARED_LIBS=OFF" in a  # its libraries are all over the tree
    assert not any("LLAMA_BUILD_NUMBER" in x for x in a)  # injected into cmake/build-info.cmake instead


@pytest.mark.parametrize("era", ["legacy", "current"])
def test_cuda_flags_same_path_for_both_eras(era):
    a = args(era=era, backend="cuda", arch="80;90")
    assert "-DGGML_CUDA=ON" in a and "-DCMAKE_CUDA_ARCHITECTURES=80;90" in a
    assert "-DGGML_NATIVE=OFF" in a and "-DGGML_NATIVE=ON" not in a


def test_extra_cmake_args_come_last_so_they_win():
    assert args(extra=["-DGGML_NATIVE=OFF"])[-1] == "-DGGML_NATIVE=OFF"


def test_cache_key_changes_with_what_produced_the_build():
    base = cache_key("pypi:aaa", "cpu", "90", args())
    assert base == cache_key("pypi:aaa", "cpu", "90", args())
    assert base != cache_key("pypi:bbb", "cpu", "90", args())
    assert base != cache_key("pypi:aaa", "cuda", "90", args(backend="cuda"))
    assert base != cache_key("pypi:aaa", "cpu", "90", args(extra=["-DX=1"]))
    # CUDA architectures only matter for CUDA builds.
    assert base == cache_key("pypi:aaa", "cpu", "80", args())
    cuda = args(backend="cuda")
    assert cache_key("pypi:aaa", "cuda", "90", cuda) != cache_key("pypi:aaa", "cuda", "80", cuda)


def test_one_build_tree_per_source_and_backend_whatever_the_flags(tmp_path: Path):
    # Builds of one source that differ in CPU flags or CMake arguments share a build tree (so the second compiles
    # only what its flags change); another source, commit or backend gets a tree of its own.
    from harness.llamacpp import SourceTree, work_key

    tree = SourceTree(tmp_path, "current", "pypi:aaa", "PyPI llama-cpp-python 0.3.36", 11312, "0c1e57098", "0.3.36")
    assert work_key(tree, "cpu") == work_key(tree, "cpu")
    assert work_key(tree, "cpu") != work_key(tree, "cuda")
    assert work_key(tree, "cpu") != work_key(SourceTree(tmp_path, "current", "pypi:bbb", "x", 1, "c"), "cpu")
    assert cache_key("pypi:aaa", "cpu", "90", args()) != cache_key("pypi:aaa", "cpu", "90", args(extra=["-DX=1"]))


def test_version_output_of_both_eras():
    legacy = "version: 1 (1d1ccce)\nbuilt with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu\n"
    current = "version: 0.5.0-dev (build 11312, commit 0c1e57098)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
    assert parse_version_output(legacy) == (1, "1d1ccce")
    assert parse_version_output(current) == (11312, "0c1e57098")


def test_build_progress_lines():
    assert parse_build_progress("[ 45%] Building CXX object src/llama.cpp.o") == 45
    assert parse_build_progress("[100%] Built target llama-server") == 100
    assert parse_build_progress("-- Configuring done") is None
    assert parse_build_progress("[104/232] Building CXX object common/CMakeFiles/llama-common.dir/arg.cpp.o") == 44
    assert parse_build_progress("[232/232] Linking CXX executable bin/llama-imatrix") == 100


def test_the_ninja_generator_when_its_wheel_is_installed():
    from harness.llamacpp import build_generator

    generator = build_generator()  # the `ninja` wheel is a requirement of the project
    assert generator[:2] == ["-G", "Ninja"] and Path(generator[2].split("=", 1)[1]).is_file()


def test_detect_era(tmp_path: Path):
    (tmp_path / "new" / "tools" / "server").mkdir(parents=True)
    (tmp_path / "old" / "examples" / "server").mkdir(parents=True)
    assert detect_era(tmp_path / "new") == "current"
    assert detect_era(tmp_path / "old") == "legacy"


def _bin_with(tmp_path: Path, *names: str) -> str:
    """A PATH holding only links to the named real programs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        real = shutil.which(name)
        if real is None:
            pytest.skip(f"{name} is not installed here")
        (bin_dir / name).symlink_to(real)
    return str(bin_dir)


def test_cuda_without_nvcc_is_a_clear_error(tmp_path):
    env = {"PATH": _bin_with(tmp_path, "cmake", "g++", "gcc"), "CUDA_HOME": str(tmp_path / "no-cuda")}
    assert check_toolchain("cpu", env) == {}
    with pytest.raises(ToolMissingError, match="backend 'cuda' needs the CUDA toolkit, but nvcc was not found"):
        check_toolchain("cuda", env)


def test_cuda_finds_nvcc_through_cuda_home(tmp_path):
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    env = {"PATH": _bin_with(tmp_path, "cmake", "g++", "gcc"), "CUDA_HOME": str(tmp_path / "cuda")}
    assert check_toolchain("cuda", env) == {"CUDACXX": str(nvcc)}


def test_missing_cmake_is_a_clear_error(tmp_path):
    with pytest.raises(ToolMissingError, match="cmake is not installed"):
        check_toolchain("cpu", {"PATH": _bin_with(tmp_path, "g++")})


def test_prebuilt_needs_a_path():
    with pytest.raises(ValueError):
        LlamaCppConfig(source="prebuilt")


def test_missing_c_compiler_is_a_clear_error(tmp_path):
    # ggml is C as well as C++, and the instruction-set probes are C programs.
    with pytest.raises(ToolMissingError, match="no C compiler found"):
        check_toolchain("cpu", {"PATH": _bin_with(tmp_path, "cmake", "g++")})
