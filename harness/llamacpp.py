"""llama.cpp: obtain a source tree (git tag, PyPI sdist, local tree) or prebuilt binaries, build, cache, prove.

The instruction sets a CPU build uses are decided before compiling (harness.cpu: the CPU's extensions, each probed
by a tiny program). Builds are keyed by source identity + backend + flags (+ the CPU, for a native build), built in
a work directory, installed into the cache with one atomic rename under a file lock, and accepted only once their
tools have run on this machine (harness.buildcheck); a build whose tools die of SIGILL is made again without the
extension they died on, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from harness import pypi
from harness.build import TOOLS, Build, BuildCheck, BuildStep, Era, TypeCheck
from harness.buildcheck import cached_check, check_build, repack_gain
from harness.cache import CacheDir, atomic_dir, damage, file_sha256, intact, seal, tree_fingerprint
from harness.config import LlamaCppConfig, default_variants
from harness.cpu import (
    PORTABLE_EXTENSIONS,
    CpuInfo,
    IsaDecision,
    cpu_record_path,
    decide_isa,
    exclude_extensions,
    extension_cost,
    known_cpu,
    reasons_once,
    this_cpu,
    tree_options,
)
from harness.errors import BuildError, HarnessError, SourceError, ToolMissingError
from harness.manifest import gpu_info
from harness.process import died_by_signal, exit_reason
from harness.records import read_record, write_record
from harness.toolchain import check_toolchain
from harness.tools import LineProgress, run_logged

logger = logging.getLogger(__name__)

# llama-cpp-python's PyPI sdist carries a complete llama.cpp tree in vendor/llama.cpp, but no git metadata (its
# .git points nowhere): the build number and commit each version vendors, recorded here.
# A build number of None means we do not know it; the experiment must then give llamacpp.build_number.
PYPI_VENDORED: dict[str, tuple[int | None, str]] = {
    "0.3.36": (11312, "0c1e57098"),
    "0.2.90": (None, "1d1ccce"),
}

_BUILD_RECORD = "build.json"
_LEGACY_MARKER = "# llamasys: build identity injected"


@dataclass(frozen=True)
class SourceTree:
    """A llama.cpp source tree ready for CMake, with what we know of its identity."""

    root: Path
    era: Era
    identity: str  # what the cache key hashes: a commit, an sdist digest, or a tree fingerprint
    description: str  # for people: "PyPI llama-cpp-python 0.3.36", "git b3661", ...
    build_number: int | None
    commit: str | None
    pypi_version: str | None = None  # the llama-cpp-python release whose sdist vendors this tree


# ---------------------------------------------------------------- pure helpers (unit-tested)


def detect_era(root: Path) -> Era:
    """Tools moved from examples/ to tools/ in 2025; the b3661 era keeps them under examples/."""
    if (root / "tools" / "server").is_dir():
        return "current"
    if (root / "examples" / "server").is_dir():
        return "legacy"
    raise SourceError(f"{root} does not look like a llama.cpp tree (no tools/server or examples/server)")


def cmake_configure_args(
    *,
    era: Era,
    backend: str,
    cuda_architectures: str,
    build_number: int,
    commit: str,
    extra: list[str],
    isa: list[str] | None = None,
) -> list[str]:
    """CMake cache arguments for a Release build of the tools, per era and backend; `isa` is the instruction set
    decision's arguments (harness.cpu.decide_isa: GGML_NATIVE=ON, or every extension's option ON or OFF).

    A current tree is built with shared libraries (libllama, libggml-base, libggml-cpu, ... beside the tools, found
    through a RUNPATH of $ORIGIN, so the directory can move): they are the libraries llama-cpp-python's bindings of
    the same vendored tree load (LLAMA_CPP_LIB_PATH), so its server needs no compile of its own, and a build made
    again with other CPU flags relinks only libggml-cpu. A b3661-era tree scatters its libraries over the build tree
    and stays static: its binaries need only libgomp, libssl and libstdc++. The web page is not downloaded
    (LLAMA_USE_PREBUILT_UI=OFF), so the build works offline.
    """
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
    ]
    if era == "current":
        # The legacy tree generates build-info from git at build time instead (see _inject_legacy_build_info).
        args += [
            "-DBUILD_SHARED_LIBS=ON",
            "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
            f"-DLLAMA_BUILD_NUMBER={build_number}",
            f"-DLLAMA_BUILD_COMMIT={commit}",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
        ]
    else:
        # In the b3661 era the tools themselves are "examples".
        args += ["-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON"]
    if backend == "cuda":
        # A GPU image is built for other machines' GPUs: no -march=native, explicit CUDA architectures.
        args += ["-DGGML_NATIVE=OFF", "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}"]
    else:
        args += list(isa) if isa is not None else ["-DGGML_NATIVE=ON"]
    return args + list(extra)


def cache_key(identity: str, backend: str, cuda_architectures: str, configure_args: list[str], *, cpu: str = "") -> str:
    """Stable key of what produced a build: source identity, backend, the exact configure arguments, and for a
    native build the CPU it was compiled for (`cpu`, its fingerprint: a cache copied to another CPU builds again)."""
    payload = json.dumps(
        {
            "identity": identity,
            "backend": backend,
            "cuda_architectures": cuda_architectures if backend == "cuda" else None,
            "configure": configure_args,
            "cpu": cpu or None,
            "tools": TOOLS,
            "platform": sys.platform,
            "machine": os.uname().machine,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# b3661 era and most builds since: "version: 3661 (1d1ccce)"; current (b11312): "version: 0.5.0-dev (build 11312,
# commit 0c1e57098)".
_VERSION_RES = (
    re.compile(r"version:\s*\S+\s*\(build\s+(?P<number>\d+),\s*commit\s+(?P<commit>[^)\s]+)\)"),
    re.compile(r"version:\s*(?P<number>\d+)\s*\((?P<commit>[^)]*)\)"),
)


def parse_version_output(text: str) -> tuple[int, str]:
    """`llama-server --version` -> (build number, commit), for both output formats."""
    for pattern in _VERSION_RES:
        match = pattern.search(text)
        if match:
            return int(match["number"]), match["commit"]
    raise BuildError(f"cannot read a version from: {text.strip()[:200]!r}")


_PROGRESS_RE = re.compile(r"^\[\s*(\d+)%\]")
_NINJA_PROGRESS_RE = re.compile(r"^\[(\d+)/(\d+)\] ")


def parse_build_progress(line: str) -> int | None:
    """The build's percentage from one line of its output: `[ 45%] Building CXX object ...` (CMake's Makefile
    generator) -> 45, `[104/232] Building CXX object ...` (Ninja) -> 44."""
    match = _PROGRESS_RE.match(line)
    if match:
        return int(match.group(1))
    match = _NINJA_PROGRESS_RE.match(line)
    return 100 * int(match.group(1)) // max(int(match.group(2)), 1) if match else None


def build_generator() -> list[str]:
    """CMake's Ninja generator, with the ninja program the `ninja` wheel installs (or one on PATH); none (make)
    without it. Ninja compiles a library's dependents while the library is still being built where make waits for
    each target in turn: on 2 cores the current tree builds in 6m05s against 7m23s with make, to the same bytes."""
    try:
        import ninja  # the `ninja` wheel: the program in its BIN_DIR

        program = Path(ninja.BIN_DIR) / "ninja"
    except (ImportError, AttributeError):
        found = shutil.which("ninja")
        program = Path(found) if found else None
    if program is None or not program.is_file():
        return []
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={program}"]


# ---------------------------------------------------------------- sources


def obtain_source(cfg: LlamaCppConfig, cache_dir: Path) -> SourceTree:
    """Fetch (or find) the tree `cfg` names. Sources are cached under `cache_dir/sources`."""
    if cfg.source == "pypi":
        tree = _pypi_source(cfg.ref, cache_dir)
    elif cfg.source == "git":
        tree = _git_source(cfg.git_url, cfg.ref, cache_dir)
    elif cfg.source == "local":
        tree = _local_source(Path(cfg.path))  # type: ignore[arg-type]
    else:
        raise SourceError("source 'prebuilt' has no source tree")
    number = cfg.build_number if cfg.build_number is not None else tree.build_number
    commit = cfg.build_commit or tree.commit
    return dataclasses.replace(tree, build_number=number, commit=commit)


def _pypi_source(version: str, cache_dir: Path) -> SourceTree:
    try:
        sdist = pypi.llama_cpp_python_sdist(version, cache_dir / "downloads")
    except HarnessError as exc:
        raise SourceError(str(exc)) from None
    digest = file_sha256(sdist)

    def extract(tmp: Path) -> None:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise SourceError(f"{sdist.name} carries no vendor/llama.cpp tree")
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(tmp, members=[m for m in members if m.name], filter="data")

    root = atomic_dir(cache_dir / "sources" / f"pypi-{version}-{digest[:12]}", extract)
    number, commit = PYPI_VENDORED.get(version, (None, None))
    return SourceTree(
        root, detect_era(root), f"pypi:{digest}", f"PyPI llama-cpp-python {version}", number, commit, version
    )


def _git_source(url: str, ref: str, cache_dir: Path) -> SourceTree:
    git = shutil.which("git")
    if git is None:
        raise ToolMissingError("git is not installed; it is needed for llamacpp.source = 'git'")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", ref)
    url_tag = hashlib.sha256(url.encode()).hexdigest()[:8]

    def clone(tmp: Path) -> None:
        proc = subprocess.run(
            [git, "clone", "--quiet", "--depth", "1", "--branch", ref, url, str(tmp / "src")],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SourceError(f"cannot fetch llama.cpp ref '{ref}' from {url}: {last}")
        for item in (tmp / "src").iterdir():
            item.rename(tmp / item.name)
        (tmp / "src").rmdir()

    root = atomic_dir(cache_dir / "sources" / f"git-{url_tag}-{safe}", clone)
    commit = subprocess.run(
        [git, "-C", str(root), "rev-parse", "--short=9", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    # Release tags are bNNNN where NNNN is the commit count; a shallow clone cannot count, the tag can.
    tag = re.fullmatch(r"b(\d+)", ref)
    number = int(tag.group(1)) if tag else None
    return SourceTree(root, detect_era(root), f"git:{commit}", f"git {ref} ({commit})", number, commit or None)


def _local_source(root: Path) -> SourceTree:
    root = root.expanduser().resolve()
    if not (root / "CMakeLists.txt").is_file():
        raise SourceError(f"{root} is not a llama.cpp source tree (no CMakeLists.txt)")
    era = detect_era(root)
    commit = number = None
    if shutil.which("git") and (root / ".git").exists():
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=9", "HEAD"], capture_output=True, text=True)
        commit = out.stdout.strip() or None
        count = subprocess.run(["git", "-C", str(root), "rev-list", "--count", "HEAD"], capture_output=True, text=True)
        number = int(count.stdout.strip()) if count.stdout.strip().isdigit() else None
    return SourceTree(
        root, era, f"local:{tree_fingerprint(root, skip=('.', 'build'))}", f"local tree {root}", number, commit
    )


# ---------------------------------------------------------------- building


def ensure_build(
    cfg: LlamaCppConfig, cache_dir: Path, weight_types: Sequence[str] | None = None, *, recheck: bool = False
) -> Build:
    """The build for `cfg`, proven to run on this machine in every weight type in `weight_types` (default: the
    default variants'): decided, compiled once (locked, atomic, cached), and checked (harness.buildcheck).

    When a built tool dies of SIGILL, the build is made once more without the extension the instruction belongs to
    (remembered for this CPU, so the next run builds that one directly); a second failure is an error that names the
    instruction set and the settings that override the decision. `recheck` runs the check again even if this build
    passed it on this CPU before (`llamasys build --check`)."""
    cache = CacheDir(cache_dir)
    types = list(weight_types) if weight_types else [v.type for v in default_variants()]
    machine = this_cpu()  # what the check proves the build on: the real CPU, whatever cfg.cpu_features says
    if cfg.source == "prebuilt":
        return _checked_prebuilt(_prebuilt(Path(cfg.path), cfg.backend), types, cache, machine, recheck=recheck)  # type: ignore[arg-type]
    tree = obtain_source(cfg, cache_dir)
    if tree.build_number is None or not tree.commit:
        raise SourceError(
            f"the build number or commit of {tree.description} is not known; set llamacpp.build_number and "
            "llamacpp.build_commit (the llama.cpp release tag bNNNN has build number NNNN)"
        )
    cpu = this_cpu(cfg.cpu_features)
    steps: list[BuildStep] = []  # what this call did, timed: the run's set-up table
    for attempt in (1, 2):
        isa = _decide(cfg, tree, cpu, cache)
        what = f"{'compile' if attempt == 1 else 'compile again'} ({isa.summary()})"
        started = time.monotonic()
        try:
            build, compiled = _compiled(tree, cfg, isa, cache_dir)
        except BuildDoesNotRun as died:
            steps.append(BuildStep(what=what, seconds=time.monotonic() - started, ok=False))
            build, failure = None, died.failure
        else:
            if compiled:
                steps.append(BuildStep(what=what, seconds=time.monotonic() - started))
            started = time.monotonic()
            known = None if recheck else cached_check(cache, build, machine, types)
            check = known or _check(build, types, cache, machine)
            if known is None and check is not None:
                steps.append(BuildStep(what=f"check ({len(check.types)} weight types)",
                                       seconds=time.monotonic() - started, ok=check.ok))  # fmt: skip
            if check is None or check.ok:
                if isa.turned_off and (known is None or attempt == 2):  # new here, or just made again
                    logger.warning(fallback_warning(isa, repack_gain(build, cache)))
                return build.model_copy(update={"check": check, "steps": steps})
            failure = check.failure
            assert failure is not None
        off = culprits(isa, failure) if died_by_signal(_code(failure), signal.SIGILL) else set()
        if attempt == 2 or not off:
            raise BuildError(rejection(isa, failure))
        why = f"{failure.tool} on the {failure.type} probe model was killed by SIGILL" + (
            f" at `{failure.instruction}`" if failure.instruction else ""
        )
        exclude_extensions(cpu, cache.root, {name: why for name in sorted(off)})
        logger.warning("llama.cpp build %s does not run here: %s; building it again without %s",
                       build.cache_key if build else "", failure.describe(), ", ".join(sorted(off)))  # fmt: skip
    raise AssertionError("unreachable")  # pragma: no cover


def _code(failure: TypeCheck) -> int | None:
    """The exit code a TypeCheck's reason names (`killed by SIGILL` -> -4), for died_by_signal."""
    if failure.reason.startswith("killed by SIG"):
        name = failure.reason.split()[2].rstrip(":")
        return -int(signal.Signals[name]) if name in signal.Signals.__members__ else None
    return None


def _decide(cfg: LlamaCppConfig, tree: SourceTree, cpu: CpuInfo, cache: CacheDir) -> IsaDecision:
    """The instruction sets of a CPU build (probed, remembered per CPU); a GPU build keeps ggml's portable CPU part."""
    if cfg.backend == "cuda":
        return IsaDecision(machine=cpu.machine, cpu=cpu.model, source="backend", native=False, cmake_args=[])
    if cfg.probe_cpu and not cpu_record_path(cache.root, cpu).is_file():
        check_toolchain(cfg.backend)  # the probes need the compiler the build needs: say what is missing first
    known = known_cpu(cpu, cache.root, probe=cfg.probe_cpu)
    isa = decide_isa(cpu, known.probes, options=tree_options(tree.root), excluded=known.excluded)
    if isa.disabled:
        logger.info("llama.cpp instruction sets: %s", isa.summary())
    return isa


def _check(build: Build, types: Sequence[str], cache: CacheDir, machine: CpuInfo) -> BuildCheck | None:
    """The post-build check, or None for a GPU build on a machine without a GPU (checked where it is used)."""
    if build.has_gpu and not gpu_info():
        logger.info("llama.cpp build %s: not checked here (no GPU); it is checked on the machine that uses it",
                    build.cache_key)  # fmt: skip
        return None
    return check_build(build, types, cache, machine)


def culprits(isa: IsaDecision, failure: TypeCheck) -> set[str]:
    """The extensions to build without after `failure` (a SIGILL): the one its instruction belongs to (and those
    that need it); when the instruction is not known, every extension beyond the portable ones."""
    if failure.extension and failure.extension in isa.enabled:
        return isa.without([failure.extension])
    return isa.without([n for n in isa.enabled if n not in PORTABLE_EXTENSIONS])


def fallback_warning(isa: IsaDecision, repack: tuple[float, float] | None = None) -> str:
    """The one warning for a build made without extensions the CPU advertises: which, why, and what it costs."""
    names = list(isa.turned_off)
    it = "it" if len(names) == 1 else "them"
    reasons = reasons_once(isa.turned_off)
    text = (
        f"llama.cpp is built without {', '.join(names)}: this CPU advertises {it} but cannot execute {it} "
        f"({reasons}). Cost: {extension_cost(names)}."
    )
    if repack is not None:
        on, off = repack
        text += (
            f" Weight repacking stays on: it gives Q4_0 prompt processing {on:,.0f} tokens/s against {off:,.0f} "
            f"without it on this CPU (llama-bench on the probe model), which the run-time switch (--no-repack) "
            "would lose."
        )
    return text + f" The build uses {isa.uses()}; to choose yourself, set llamacpp.cpu_features or cmake_args."


def rejection(isa: IsaDecision, failure: TypeCheck) -> str:
    """The error when a build does not run here and making it again cannot help (or did not)."""
    head = "the llama.cpp build does not run on this machine"
    if isa.turned_off:
        head += f" even without {', '.join(isa.turned_off)}"
    which = f"the instruction set {failure.extension}" if failure.extension else "what it was compiled for"
    return (
        f"{head}: {failure.describe()}. It uses {isa.summary()}. If this CPU cannot run {which}, set "
        "llamacpp.cpu_features to the extensions it does run (names as /proc/cpuinfo spells them, e.g. "
        '["sse4_2", "avx", "avx2", "fma", "f16c"]), or pass ggml\'s options in llamacpp.cmake_args '
        '(e.g. ["-DGGML_NATIVE=OFF", "-DGGML_AVX512=OFF"])'
    )


def _compiled(tree: SourceTree, cfg: LlamaCppConfig, isa: IsaDecision, cache_dir: Path) -> tuple[Build, bool]:
    """The cached build of `tree` for `isa`, compiled first if needed (one lock per build tree, installed
    atomically), and whether it was compiled now."""
    assert tree.build_number is not None and tree.commit is not None
    configure = cmake_configure_args(
        era=tree.era, backend=cfg.backend, cuda_architectures=cfg.cuda_architectures, build_number=tree.build_number,
        commit=tree.commit, extra=cfg.cmake_args, isa=isa.cmake_args,
    )  # fmt: skip
    key = cache_key(
        tree.identity + f"#{tree.build_number}:{tree.commit}", cfg.backend, cfg.cuda_architectures, configure,
        cpu=isa.fingerprint,
    )  # fmt: skip
    builds = cache_dir / "builds"
    final = builds / key
    if final.is_dir() and damage(final) is None:
        return _load_record(final), False
    builds.mkdir(parents=True, exist_ok=True)
    generator = build_generator()
    work = builds / f".work-{work_key(tree, cfg.backend, generator)}"
    # One lock per build tree: the builds of one source take turns in it (atomic_dir takes its own, differently
    # named lock for the install).
    with FileLock(str(builds / f"{work.name}.lock")):
        if intact(final):  # another run finished it while we waited (a damaged entry is removed here)
            return _load_record(final), False
        env = {**os.environ, **check_toolchain(cfg.backend), **compiler_cache_env(cache_dir)}
        jobs = cfg.jobs or os.cpu_count() or 1
        return _build(tree, cfg, configure, key, final, work, env, isa=isa, jobs=jobs, generator=generator), True


def work_key(tree: SourceTree, backend: str, generator: Sequence[str] = ()) -> str:
    """The build tree one source is compiled in for one backend (and CMake generator), whatever its flags: a build
    made again with other CPU flags (after a check found an instruction this CPU cannot run) or other CMake
    arguments is configured afresh in the same tree, and the build tool compiles only what the changed flags touch
    (ggml's CPU backend: under a minute), with no compiler cache needed."""
    payload = json.dumps({"identity": tree.identity, "commit": tree.commit, "backend": backend,
                          "machine": os.uname().machine, "generator": generator[1] if generator else "make"},
                         sort_keys=True)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def compiler_cache_env(cache_dir: Path) -> dict[str, str]:
    """ccache settings, when ccache is installed (ggml's CMake then uses it by itself): its cache beside ours, and
    paths under the cache rewritten relative, so that a tree compiled afresh (a local tree edited in a few files, a
    cache whose work trees were removed) compiles only what differs. Builds of one source with other flags need no
    compiler cache: they share one build tree (`work_key`)."""
    if shutil.which("ccache") is None:
        return {}
    env = {"CCACHE_BASEDIR": str(cache_dir.resolve())}
    env.setdefault("CCACHE_DIR", os.environ.get("CCACHE_DIR") or str(cache_dir.resolve() / "ccache"))
    if "CCACHE_MAXSIZE" not in os.environ:
        env["CCACHE_MAXSIZE"] = "2G"
    return env


def cmake_configure(
    source: Path, build_dir: Path, configure: list[str], *, log_path: Path, env: Mapping[str, str],
    generator: Sequence[str] = (),
) -> None:  # fmt: skip
    """Run CMake's configure step (with `generator`'s arguments, from build_generator); this is where a missing CUDA
    toolkit or a bad flag shows up."""
    cmd = ["cmake", *generator, "-S", source, "-B", build_dir, *configure]
    run = run_logged(cmd, log_path=log_path, env=env, tail=30)
    if not run.ok and any("CUDA::cublas" in line for line in run.lines):
        raise BuildError(
            f"the CUDA toolkit ({env.get('CUDACXX', 'nvcc')}) has no cuBLAS, which llama.cpp's CUDA backend links; "
            f"install the toolkit's libraries (e.g. the cuda-libraries-dev package); see {log_path}"
        )
    if not run.ok:
        raise BuildError(f"cmake configure failed (exit {run.code}); see {log_path}\n" + "\n".join(run.lines[-15:]))


def _build(tree, cfg, configure, key, final: Path, work: Path, env, *, isa: IsaDecision, jobs: int,
           generator: Sequence[str] = ()) -> Build:  # fmt: skip
    """Configure `work`'s tree with exactly `configure` (the last configure's cache removed, so that no setting of
    another build lingers), compile what changed, and install the tools and their libraries as the entry `final`.
    The tree stays, also after a failure or Ctrl-C: the next build of this source compiles only what differs."""
    log = work / f"build-{key}.log"
    work.mkdir(parents=True, exist_ok=True)
    (work / "tree" / "CMakeCache.txt").unlink(missing_ok=True)
    if tree.era == "legacy":
        _inject_legacy_build_info(tree.root, tree.build_number, tree.commit)
        if tree.identity.startswith(("pypi:", "git:")):
            seal(tree.root)  # the cached source entry now holds the pinned build-info: that is what it was made with
    logger.info(
        "building llama.cpp (%s, %s; %s) -> %s\n  log: %s", tree.description, cfg.backend, isa.summary(), final, log
    )
    cmake_configure(tree.root, work / "tree", configure, log_path=log, env=env, generator=generator)
    run = run_logged(
        ["cmake", "--build", work / "tree", "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
        log_path=log, env=env, tail=30,
        progress=LineProgress(100, "llama.cpp build", "%", parse_build_progress, leave=True),
    )  # fmt: skip
    if not run.ok:
        raise BuildError(f"llama.cpp build failed (exit {run.code}); see {log}\n" + "\n".join(run.lines[-15:]))

    def install(tmp: Path) -> None:
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        built_dir = work / "tree" / "bin"
        for name in TOOLS:
            if not (built_dir / name).is_file():
                raise BuildError(f"the build did not produce {name} (looked in {built_dir})")
            shutil.copy2(built_dir / name, bin_dir / name)
        for library in sorted(built_dir.glob("lib*.so*")):  # a shared build's libraries, their version links too
            shutil.copy2(library, bin_dir / library.name, follow_symlinks=False)
        code, version_text = _run_version(bin_dir / "llama-server")
        if code is not None and code < 0:
            failure = TypeCheck(type="-", ok=False, tool="llama-server --version", reason=exit_reason(code),
                                command=f"{bin_dir / 'llama-server'} --version", log=str(log))  # fmt: skip
            raise BuildDoesNotRun(failure)
        number, commit = parse_version_output(version_text)
        if number != tree.build_number:
            raise BuildError(f"built llama-server reports build {number}, expected {tree.build_number}")
        record = Build(
            bin_dir=final / "bin", backend=cfg.backend, era=tree.era, build_number=number, commit=commit,
            source=tree.description, cache_key=key, cmake_args=configure, version_text=version_text.strip(),
            tree=tree.root, isa=isa, bindings=tree.pypi_version if (bin_dir / "libllama.so").exists() else None,
        )  # fmt: skip
        shutil.copy2(log, tmp / "build.log")
        write_record(tmp / _BUILD_RECORD, record)

    atomic_dir(final, install)
    log.unlink(missing_ok=True)  # it is in the entry now
    return _load_record(final)


def _inject_legacy_build_info(root: Path, number: int, commit: str) -> None:
    """b3661-era trees compute build-info from git at build time (build 0 in an sdist): pin it instead."""
    path = root / "cmake" / "build-info.cmake"
    text = path.read_text()
    text = text.split(_LEGACY_MARKER)[0].rstrip("\n")
    text += f'\n{_LEGACY_MARKER}\nset(BUILD_NUMBER {int(number)})\nset(BUILD_COMMIT "{commit}")\n'
    path.write_text(text)
    generated = root / "common" / "build-info.cpp"
    if generated.exists():
        generated.unlink()  # regenerated by the build with the pinned identity


def _run_version(server: Path) -> tuple[int | None, str]:
    """`llama-server --version`: its exit code and output."""
    try:
        proc = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise BuildError(f"cannot run {server}: {exc.strerror}") from None
    return proc.returncode, proc.stdout + proc.stderr


class BuildDoesNotRun(BuildError):
    """A freshly compiled tool died before the check could run it (its --version): treated as a failed check."""

    def __init__(self, failure: TypeCheck) -> None:
        super().__init__(failure.describe())
        self.failure = failure


def _load_record(final: Path) -> Build:
    # The cache directory may have moved since the build: its binaries are where the record is.
    return read_record(final / _BUILD_RECORD, Build).model_copy(update={"bin_dir": final / "bin"})


def _load_installed(path: Path) -> Build:
    build = _load_record(path)
    return build.model_copy(update={"tree": path / "src"}) if (path / "src").is_dir() else build


def install_build(build: Build, dest: Path) -> Build:
    """Copy a build (binaries, and the source tree the converter needs) to `dest`, usable as source 'prebuilt'.

    Container images use this to carry the binaries in a fixed place that no cache volume hides.
    """
    dest = dest.expanduser().resolve()

    def fill(tmp: Path) -> None:
        shutil.copytree(build.bin_dir, tmp / "bin", symlinks=True)  # a shared build's library version links
        if build.tree is not None:
            ignore = shutil.ignore_patterns(".git", "build", "build-*", "*.o")
            shutil.copytree(build.tree, tmp / "src", ignore=ignore, symlinks=True)
        record = build.model_copy(
            update={"bin_dir": dest / "bin", "tree": dest / "src" if build.tree else None, "check": None, "steps": []}
        )
        write_record(tmp / _BUILD_RECORD, record)

    if dest.exists() and any(dest.iterdir()):
        raise BuildError(f"{dest} exists and is not empty; choose a new directory to install the build into")
    if dest.exists():
        dest.rmdir()
    atomic_dir(dest, fill)
    return _load_record(dest)


def _prebuilt(path: Path, backend: str) -> Build:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise SourceError(f"prebuilt llama.cpp directory not found: {path}")
    if (path / _BUILD_RECORD).is_file():  # a directory written by install_build (llamasys build --install-to)
        return _load_installed(path)
    missing = [t for t in TOOLS if not (path / t).is_file()]
    if "llama-server" in missing:
        raise SourceError(f"{path} has no llama-server binary")
    if missing:
        logger.warning("%s lacks %s; stages needing them will fail", path, ", ".join(missing))
    code, text = _run_version(path / "llama-server")
    if code is not None and code < 0:
        raise BuildError(f"{path / 'llama-server'} --version was {exit_reason(code)}; these binaries do not run here")
    number, commit = parse_version_output(text)
    era: Era = "current" if number >= 5000 else "legacy"
    # Keyed by where the binaries are and what they are (sizes, times): the check is remembered per key and CPU.
    key = "prebuilt-" + hashlib.sha256(f"{path}\0{tree_fingerprint(path)}".encode()).hexdigest()[:12]
    return Build(
        bin_dir=path, backend=backend, era=era, build_number=number, commit=commit, source=f"prebuilt {path}",
        cache_key=key, version_text=text.strip(),
    )  # fmt: skip


def _checked_prebuilt(build: Build, types: Sequence[str], cache: CacheDir, machine: CpuInfo, *, recheck: bool) -> Build:
    """A prebuilt directory cannot be compiled again: when its tools die of SIGILL, the run-time switch is tried
    (no weight repacking and no extra buffer types, which is where AMX lives) and kept if the check then passes."""
    check = (None if recheck else cached_check(cache, build, machine, types)) or _check(build, types, cache, machine)
    if check is None or check.ok:
        return build.model_copy(update={"check": check})
    failure = check.failure
    assert failure is not None
    if not died_by_signal(_code(failure), signal.SIGILL) or not build.tools.no_repack_args("llama-server"):
        raise BuildError(rejection(build.isa or _unknown_isa(machine), failure))
    plain = build.model_copy(update={"repack": False})
    second = _check(plain, types, cache, machine)
    if second is not None and not second.ok:
        raise BuildError(rejection(build.isa or _unknown_isa(machine), failure) + "; --no-repack did not help")
    logger.warning(
        "llama.cpp at %s: %s; every tool runs with weight repacking and extra buffer types off (--no-repack), which "
        "avoids it and costs speed on the quantized types (see `llamasys build --check`); build llama.cpp here "
        "instead (llamacpp.source = 'pypi', 'git' or 'local') to keep repacking",
        build.bin_dir, failure.describe(),
    )  # fmt: skip
    return plain.model_copy(update={"check": second})


def _unknown_isa(cpu: CpuInfo) -> IsaDecision:
    return IsaDecision(machine=cpu.machine, cpu=cpu.model, source="setting", native=False)
