"""Real llama.cpp builds of both eras from the PyPI sdists: identity, cache reuse, and clear failures."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from harness.build import TOOLS, Build
from harness.errors import BuildError
from harness.llamacpp import cmake_configure, cmake_configure_args, parse_version_output
from harness.toolchain import check_toolchain, find_nvcc
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


# ---------------------------------------------------------------- builds that run where they are used


def test_the_build_is_proven_on_this_machine_in_every_default_weight_type(any_build: Build):
    check = any_build.check
    assert check is not None and check.ok, check
    # A check that covered more types (another experiment's, on a warm cache) is reused, so: at least these.
    assert {"F16", "Q8_0", "Q4_0", "Q4_K_M", "IQ4_XS"} <= set(check.types), list(check.types)
    for result in check.types.values():
        assert result.prompt_tps and result.prompt_tps > 0 and result.generation_tps and result.generation_tps > 0
    for tool in ("llama-perplexity", "llama-bench", "llama-server"):
        log = Path(check_path_of(any_build)).parent / "logs" / f"Q4_0-{tool}.log"
        assert log.is_file() and log.stat().st_size > 0, log
    assert any_build.isa is not None and any_build.isa.enabled
    assert any_build.provenance()["isa_summary"] == any_build.isa.summary()


def check_path_of(build: Build) -> Path:
    from harness.buildcheck import check_path
    from harness.cache import CacheDir
    from harness.cpu import this_cpu

    return check_path(CacheDir(build.bin_dir.parents[2]), build, this_cpu())


def test_a_probe_program_that_dies_leaves_its_extension_out():
    # Independent of this CPU: an extension whose probe executes the architecture's always-undefined instruction
    # (x86 ud2, ARM udf) is what a CPU that advertises an extension it cannot run looks like to the probe.
    from harness.cpu import CpuInfo, Extension, c_compiler, decide_isa, extensions_for, probe_extensions, this_cpu

    machine = this_cpu().machine
    if machine not in ("x86_64", "aarch64"):
        pytest.skip(f"no undefined-instruction probe written for {machine}")
    x86 = machine == "x86_64"
    table = {e.name: e for e in extensions_for(machine)}
    target, plain = (table["avx2"], table["avx"]) if x86 else (table["dotprod"], table["fp16"])
    undefined = "ud2" if x86 else "udf #0"
    probe = f'__asm__ volatile("{undefined}");'
    impossible = Extension(target.name, target.flags, target.options, target.cflags, probe)
    outcomes = probe_extensions([impossible, plain], compiler=c_compiler())
    assert not outcomes[target.name].ok and "killed by SIGILL" in outcomes[target.name].detail
    assert outcomes[plain.name].ok  # what every CPU of this architecture runs passes
    cpu = CpuInfo(machine, "test", frozenset(target.flags) | frozenset(plain.flags))
    options = {o for e in table.values() for o in e.options if o.startswith("GGML_")} | {"GGML_CPU_ARM_ARCH"}
    isa = decide_isa(cpu, outcomes, options=options)
    assert target.name in isa.turned_off and plain.name in isa.enabled and not isa.native
    if x86:
        assert "-DGGML_AVX2=OFF" in isa.cmake_args and "-DGGML_AVX=ON" in isa.cmake_args


_THREADS_FAULTING = r"""
#include <pthread.h>
static pthread_barrier_t start;
static void *fault(void *arg) {
    (void) arg;
    pthread_barrier_wait(&start);  /* every thread executes the undefined instruction at the same moment */
    __asm__ volatile("%s");
    return 0;
}
int main(void) {
    enum { N = 8 };
    pthread_t threads[N];
    pthread_barrier_init(&start, 0, N);
    for (int i = 0; i < N; i++) pthread_create(&threads[i], 0, fault, 0);
    for (int i = 0; i < N; i++) pthread_join(threads[i], 0);
    return 0;
}
"""


def test_the_sigill_reporter_names_the_instruction_when_many_threads_fault_at_once(tmp_path: Path):
    # ggml's worker threads run the same kernel, so they hit an instruction the CPU lacks together: the reporter must
    # print the faulting bytes whichever thread's signal comes first (it lost them when it reset its handler before
    # writing), and the process must still die of SIGILL.
    from harness.buildcheck import fault_bytes, sigill_reporter
    from harness.cache import CacheDir
    from harness.cpu import c_compiler, this_cpu

    machine = this_cpu().machine
    if machine not in ("x86_64", "aarch64"):
        pytest.skip(f"no undefined instruction written for {machine}")
    source = tmp_path / "faults.c"
    source.write_text(_THREADS_FAULTING % ("ud2" if machine == "x86_64" else "udf #0"))
    program = tmp_path / "faults"
    subprocess.run([c_compiler(), "-O1", "-pthread", "-o", str(program), str(source)], check=True)
    reporter = sigill_reporter(CacheDir(tmp_path / "cache"))
    assert reporter is not None
    for _ in range(30):
        run = subprocess.run([str(program)], capture_output=True, text=True, env={"LD_PRELOAD": str(reporter)})
        assert run.returncode == -signal.SIGILL, run
        code = fault_bytes(run.stderr.splitlines())
        assert code is not None and code.startswith(b"\x0f\x0b" if machine == "x86_64" else b"\x00\x00"), run.stderr


# Tried in this order: the extensions whose code is all over ggml's CPU kernels, so a build with them dies at once.
_FORCEABLE = ("avx512", "amx_tile", "avx_vnni", "avx2", "fma", "f16c")


def _one_this_cpu_cannot_run():
    from harness.cpu import c_compiler, extensions_for, probe_extensions, this_cpu

    cpu = this_cpu()
    table = {e.name: e for e in extensions_for(cpu.machine)}
    candidates = [table[n] for n in _FORCEABLE if n in table]
    outcomes = probe_extensions(candidates, compiler=c_compiler())
    for ext in candidates:
        # Forceable alone: whatever it needs, this CPU runs.
        if "SIGILL" in outcomes[ext.name].detail and all(outcomes.get(r, None) is None or outcomes[r].ok
                                                          for r in ext.requires):  # fmt: skip
            return cpu, ext
    pytest.skip(f"this CPU ({cpu.model}) runs every extension tried ({', '.join(_FORCEABLE)})")


def test_a_build_forced_to_use_an_extension_this_cpu_lacks_is_caught_and_rebuilt(
    current_build: Build, cache_dir: Path, tmp_path: Path, caplog
):
    # The machine's own flags plus one extension its probe program cannot run, taken on trust (no probe before
    # compiling): the build compiles it in, the post-build check sees a tool die of SIGILL at one of its
    # instructions, and the build is made once more without it. Both are configured in the build tree the machine's
    # own build was compiled in, so each compiles only ggml's CPU backend: one full compile per machine.
    from harness.config import LlamaCppConfig
    from harness.cpu import cpu_record_path, known_cpu, this_cpu
    from harness.llamacpp import ensure_build

    cpu, ext = _one_this_cpu_cannot_run()
    features = sorted(cpu.flags | set(ext.flags))
    cfg = LlamaCppConfig(source="pypi", ref="0.3.36", cpu_features=features, probe_cpu=False)
    # What is known of CPUs starts empty; compiled builds, sources and the compiler cache are the shared ones, so a
    # second run of this test compiles nothing (the build that dies is cached too: only passed checks are kept).
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("builds", "sources", "downloads", "ccache", "probe"):
        (cache_dir / shared).mkdir(exist_ok=True)
        (cache / shared).symlink_to(cache_dir / shared)
    cache_dir = cache
    with caplog.at_level("INFO", logger="harness"):
        build = ensure_build(cfg, cache_dir, ["F16", "Q4_0"])
    text = caplog.text
    assert "does not run here" in text and f"building it again without {ext.name}" in text
    assert f"llama.cpp is built without {ext.name}" in text
    assert build.check is not None and build.check.ok and set(build.check.types) == {"F16", "Q4_0"}
    assert build.isa is not None and ext.name in build.isa.turned_off and ext.name not in build.isa.enabled
    assert "SIGILL" in build.isa.turned_off[ext.name]
    assert any(not step.ok and step.what.startswith("check") for step in build.steps), build.steps
    # The build made again was configured in the tree the dying one was just compiled in: it compiled ggml's CPU
    # backend alone. (The first one compiles only that too when the machine's own build left the tree; a cache whose
    # work tree is gone compiles it whole once.)
    lines = (build.bin_dir.parent / "build.log").read_text().splitlines()
    compiled = [ln for ln in lines if ln.startswith("[") and "Building C" in ln]
    assert compiled and all("ggml-cpu.dir" in ln for ln in compiled), compiled[:5]
    forced = this_cpu(features)
    assert ext.name in known_cpu(forced, cache_dir, probe=False).excluded
    assert cpu_record_path(cache_dir, forced) != cpu_record_path(cache_dir, this_cpu())  # the real CPU's is untouched
    # Remembered: the next run goes straight to the build that works, compiling and checking nothing.
    caplog.clear()
    with caplog.at_level("INFO", logger="harness"):
        again = ensure_build(cfg, cache_dir, ["F16", "Q4_0"])
    assert again.bin_dir == build.bin_dir and "building llama.cpp" not in caplog.text
    assert "build check" not in caplog.text


def test_build_check_prints_the_cpu_the_isa_and_every_type(current_build: Build, cache_dir: Path):
    from harness.build import BuildCheck
    from harness.records import read_record

    record = check_path_of(current_build)
    before = set(read_record(record, BuildCheck).types)
    result = llamasys("build", "--check", "--no-progress", env={"LLAMASYS_CACHE_DIR": str(cache_dir)}, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "CPU: " in out and "advertises, of what ggml uses:" in out
    assert f"instruction sets of the build: {current_build.isa.summary()}" in out
    assert "check on this machine" in out and "passed" in out
    for weight_type in ("F16", "Q8_0", "Q4_0", "Q4_K_M", "IQ4_XS"):
        assert re.search(rf"^  {weight_type}\s+ok\s+[\d,]+\s+[\d,]+$", out, re.MULTILINE), out
    assert "build check: passed" in result.stderr  # --check runs the probe again, it does not read the record
    # What an earlier check of more types proved (another experiment's, such as the demo's) stays proven.
    assert set(read_record(record, BuildCheck).types) >= before | {"F16", "Q8_0", "Q4_0", "Q4_K_M", "IQ4_XS"}
