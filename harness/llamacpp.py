"""llama.cpp: obtain a source tree (git tag, PyPI sdist, local tree) or prebuilt binaries, build, cache.

Builds are keyed by source identity + backend + flags, built in a work directory, installed into the cache
with one atomic rename under a file lock, and verified by asking the built llama-server for its version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock
from pydantic import Field

from harness import pypi
from harness.cache import atomic_dir, damage, file_sha256, intact, seal, tree_fingerprint
from harness.config import LlamaCppConfig
from harness.errors import BuildError, HarnessError, SourceError, ToolMissingError
from harness.records import Record, read_record, write_record
from harness.tools import Compute, LineProgress, ToolRunner, run_logged

logger = logging.getLogger(__name__)

# The six tools every stage needs.
TOOLS = ("llama-server", "llama-perplexity", "llama-quantize", "llama-imatrix", "llama-cli", "llama-bench")

Era = Literal["legacy", "current"]

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


class Build(Record):
    """A finished, verified set of llama.cpp binaries (stored as build.json beside them)."""

    bin_dir: Path
    backend: str
    era: Era
    build_number: int
    commit: str
    source: str
    cache_key: str
    cmake_args: list[str] = Field(default_factory=list)
    version_text: str = ""
    tree: Path | None = None  # the source tree (convert_hf_to_gguf.py, gguf-py); None for prebuilt

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise BuildError(f"{name} is missing from {self.bin_dir}")
        return path

    @property
    def has_gpu(self) -> bool:
        return self.backend == "cuda"

    @property
    def tools(self) -> ToolRunner:
        """The one way to run this build's tools."""
        return ToolRunner(self)

    def compute(self, *, threads: int | None, gpu_layers: int = 999) -> Compute:
        return Compute(threads=threads, gpu_layers=gpu_layers, backend=self.backend)

    def describe(self) -> dict[str, object]:
        """Identity for manifests and records: build number, commit, backend, source, era, cache key."""
        return self.model_dump(mode="json", include={"build_number", "commit", "backend", "source", "era", "cache_key"})


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
) -> list[str]:
    """CMake cache arguments for a static Release build of the tools, per era and backend.

    Static binaries need only libgomp, libssl and libstdc++ beside them; a shared build leaves stubs that need the .so
    files. The web page is not downloaded (LLAMA_USE_PREBUILT_UI=OFF), so the build works offline.
    """
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
    ]
    if era == "current":
        # The legacy tree generates build-info from git at build time instead (see _inject_legacy_build_info).
        args += [
            f"-DLLAMA_BUILD_NUMBER={build_number}",
            f"-DLLAMA_BUILD_COMMIT={commit}",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
        ]
    else:
        # In the b3661 era the tools themselves are "examples".
        args += ["-DLLAMA_BUILD_EXAMPLES=ON"]
    if backend == "cuda":
        # A GPU image is built for other machines' GPUs: no -march=native, explicit CUDA architectures.
        args += ["-DGGML_NATIVE=OFF", "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}"]
    else:
        args += ["-DGGML_NATIVE=ON"]
    return args + list(extra)


def cache_key(identity: str, backend: str, cuda_architectures: str, configure_args: list[str]) -> str:
    """Stable key of what produced a build: source identity, backend, and the exact configure arguments."""
    payload = json.dumps(
        {
            "identity": identity,
            "backend": backend,
            "cuda_architectures": cuda_architectures if backend == "cuda" else None,
            "configure": configure_args,
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


def parse_build_progress(line: str) -> int | None:
    """`[ 45%] Building CXX object ...` -> 45 (CMake's Makefile generator prints this for each step)."""
    match = _PROGRESS_RE.match(line)
    return int(match.group(1)) if match else None


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
    return SourceTree(tree.root, tree.era, tree.identity, tree.description, number, commit)


def _pypi_source(version: str, cache_dir: Path) -> SourceTree:
    try:
        sdist = pypi.download(
            f"llama-cpp-python=={version}",
            cache_dir / "downloads",
            pattern=f"llama_cpp_python-{version}.tar.gz",
            sdist=True,
        )
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
    return SourceTree(root, detect_era(root), f"pypi:{digest}", f"PyPI llama-cpp-python {version}", number, commit)


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


def ensure_build(cfg: LlamaCppConfig, cache_dir: Path) -> Build:
    """Return the cached build for `cfg`, building it first if needed (locked, atomic, verified)."""
    if cfg.source == "prebuilt":
        return _prebuilt(Path(cfg.path), cfg.backend)  # type: ignore[arg-type]
    tree = obtain_source(cfg, cache_dir)
    if tree.build_number is None or not tree.commit:
        raise SourceError(
            f"the build number or commit of {tree.description} is not known; set llamacpp.build_number and "
            "llamacpp.build_commit (the llama.cpp release tag bNNNN has build number NNNN)"
        )
    configure = cmake_configure_args(
        era=tree.era,
        backend=cfg.backend,
        cuda_architectures=cfg.cuda_architectures,
        build_number=tree.build_number,
        commit=tree.commit,
        extra=cfg.cmake_args,
    )
    key = cache_key(
        tree.identity + f"#{tree.build_number}:{tree.commit}", cfg.backend, cfg.cuda_architectures, configure
    )
    builds = cache_dir / "builds"
    final = builds / key
    if final.is_dir() and damage(final) is None:
        return _load_record(final)
    builds.mkdir(parents=True, exist_ok=True)
    # One lock per key for the whole build; atomic_dir takes its own, differently named lock for the install.
    with FileLock(str(builds / f".{key}.build.lock")):
        if intact(final):  # another run finished it while we waited (a damaged entry is removed here)
            return _load_record(final)
        env = {**os.environ, **check_toolchain(cfg.backend)}
        return _build(tree, cfg, configure, key, final, env, jobs=cfg.jobs or os.cpu_count() or 1)


def cmake_configure(
    source: Path, build_dir: Path, configure: list[str], *, log_path: Path, env: Mapping[str, str]
) -> None:
    """Run CMake's configure step; this is where a missing CUDA toolkit or a bad flag shows up."""
    run = run_logged(["cmake", "-S", source, "-B", build_dir, *configure], log_path=log_path, env=env, tail=30)
    if not run.ok and any("CUDA::cublas" in line for line in run.lines):
        raise BuildError(
            f"the CUDA toolkit ({env.get('CUDACXX', 'nvcc')}) has no cuBLAS, which llama.cpp's CUDA backend links; "
            f"install the toolkit's libraries (e.g. the cuda-libraries-dev package); see {log_path}"
        )
    if not run.ok:
        raise BuildError(f"cmake configure failed (exit {run.code}); see {log_path}\n" + "\n".join(run.lines[-15:]))


def _build(tree, cfg, configure, key, final: Path, env, *, jobs: int) -> Build:
    work = final.parent / f".work-{key}"  # kept on failure so a retry compiles incrementally
    log = work / "build.log"
    work.mkdir(parents=True, exist_ok=True)
    if tree.era == "legacy":
        _inject_legacy_build_info(tree.root, tree.build_number, tree.commit)
        if tree.identity.startswith(("pypi:", "git:")):
            seal(tree.root)  # the cached source entry now holds the pinned build-info: that is what it was made with
    logger.info("building llama.cpp (%s, %s) -> %s\n  log: %s", tree.description, cfg.backend, final, log)
    cmake_configure(tree.root, work / "tree", configure, log_path=log, env=env)
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
        for name in TOOLS:
            built = work / "tree" / "bin" / name
            if not built.is_file():
                raise BuildError(f"the build did not produce {name} (looked in {built.parent})")
            shutil.copy2(built, bin_dir / name)
        version_text = _run_version(bin_dir / "llama-server")
        number, commit = parse_version_output(version_text)
        if number != tree.build_number:
            raise BuildError(f"built llama-server reports build {number}, expected {tree.build_number}")
        record = Build(
            bin_dir=final / "bin", backend=cfg.backend, era=tree.era, build_number=number, commit=commit,
            source=tree.description, cache_key=key, cmake_args=configure, version_text=version_text.strip(),
            tree=tree.root,
        )  # fmt: skip
        shutil.copy2(log, tmp / "build.log")
        write_record(tmp / _BUILD_RECORD, record)

    atomic_dir(final, install)
    shutil.rmtree(work, ignore_errors=True)
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


def _run_version(server: Path) -> str:
    try:
        proc = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise BuildError(f"cannot run {server}: {exc.strerror}") from None
    return proc.stdout + proc.stderr


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
        shutil.copytree(build.bin_dir, tmp / "bin")
        if build.tree is not None:
            ignore = shutil.ignore_patterns(".git", "build", "build-*", "*.o")
            shutil.copytree(build.tree, tmp / "src", ignore=ignore, symlinks=True)
        record = build.model_copy(update={"bin_dir": dest / "bin", "tree": dest / "src" if build.tree else None})
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
    text = _run_version(path / "llama-server")
    number, commit = parse_version_output(text)
    era: Era = "current" if number >= 5000 else "legacy"
    return Build(
        bin_dir=path, backend=backend, era=era, build_number=number, commit=commit, source=f"prebuilt {path}",
        cache_key="prebuilt", version_text=text.strip(),
    )  # fmt: skip
