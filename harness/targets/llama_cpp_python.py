"""Target kind `llama-cpp-python`: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`).

Installed from the PyPI version whose sdist the llama.cpp build came from, into a cached environment whose bindings
load the build's own shared libraries (nothing compiled; another version compiles its own copy once, with the
build's backend and instruction sets), started on 127.0.0.1 with the variant's GGUF (or every variant, from
one `--config_file`), a context that fits a request and the same thread count, and stopped on every exit path. It
serves one request at a time; its default `interrupt_requests` would cancel the streaming request whenever another
arrives, so it is turned off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

from bench.apis import USER_KINDS, generates_tokens
from harness.buildcheck import probe_models
from harness.cache import atomic_dir
from harness.cpu import this_cpu
from harness.errors import ConfigError, LoadTestError, ServerError
from harness.process import spawn
from harness.pypi import llama_cpp_python_sdist
from harness.records import atomic_write, inputs_digest
from harness.server import ManagedEndpoint, check_gguf, free_port
from harness.targets.base import Target, TargetConfig, register
from harness.toolchain import check_toolchain
from harness.tools import error_line, run_logged

if TYPE_CHECKING:
    from harness.config import Experiment
    from harness.context import RunContext

logger = logging.getLogger(__name__)


class LlamaCppPythonConfig(TargetConfig):
    """`kind = "llama-cpp-python"`: its PyPI version (default: the one whose sdist the llama.cpp build came from),
    and whether one server holds every variant (its --config_file, the users naming the model) instead of one per
    variant."""

    kind: Literal["llama-cpp-python"] = "llama-cpp-python"
    version: str | None = None
    multi_model: bool = False

    @property
    def shares_one_server(self) -> bool:
        return self.multi_model

    @model_validator(mode="after")
    def _a_route_it_serves(self) -> LlamaCppPythonConfig:
        if self.api is not None and self.api not in LlamaCppPython.apis:
            route, routes = USER_KINDS[self.api].route, ", ".join(LlamaCppPython.apis)
            raise ValueError(f"llama-cpp-python has no {self.api} {route} route; use api {routes}")
        return self


@register
class LlamaCppPython(Target):
    kind = "llama-cpp-python"
    config = LlamaCppPythonConfig
    serializes = True  # one Llama object per model, one request at a time: concurrent requests queue
    apis = ("openai", "chat", "embeddings")  # no native /completion: its users load /v1/completions instead

    @classmethod
    def open(cls, ctx, target, models, *, log_path, parallel):  # type: ignore[no-untyped-def]
        embeddings = not generates_tokens(target.route_api(ctx.experiment.load.api))
        return LlamaCppPythonServer(ctx, target, models, log_path=log_path, embedding=embeddings)  # type: ignore[arg-type]


def llama_cpp_python_version(exp: Experiment, target: LlamaCppPythonConfig) -> str:
    """The PyPI version to install: the target's, else the one whose sdist the llama.cpp build came from."""
    if target.version:
        return target.version
    if exp.llamacpp.source == "pypi":
        return exp.llamacpp.ref
    raise ConfigError(
        f"targets ({target.label}): llama.cpp comes from {exp.llamacpp.source!r}, so the matching llama-cpp-python "
        'version is not known; set version = "0.3.36" (a llama-cpp-python release on PyPI) on this target'
    )


def llama_cpp_python_cmake_args(ctx: RunContext) -> list[str]:
    """CMAKE_ARGS for compiling llama-cpp-python the way the llama.cpp build was compiled: its backend, and on a CPU
    its instruction-set decision (native, or each extension named when this CPU cannot run one it advertises)."""
    if ctx.build.has_gpu:
        arch = ctx.experiment.llamacpp.cuda_architectures
        return ["-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DLLAMA_CURL=OFF"]
    isa = ctx.build.isa.cmake_args if ctx.build.isa and ctx.build.isa.cmake_args else ["-DGGML_NATIVE=ON"]
    return [*isa, "-DLLAMA_CURL=OFF"]


# llama-cpp-python's own CMake options (its top CMakeLists.txt): build no llama.cpp, install the Python package only.
BINDINGS_ONLY = ["-DLLAMA_BUILD=OFF", "-DLLAVA_BUILD=OFF"]


@dataclass(frozen=True)
class LlamaCppPythonEnv:
    """A cached virtual environment holding llama-cpp-python's server, and the llama.cpp its bindings load."""

    venv: Path
    version: str
    # The harness build's directory of shared libraries the bindings load (LLAMA_CPP_LIB_PATH, which
    # llama_cpp/llama_cpp.py reads); None: the environment carries its own compiled copy.
    libraries: Path | None = None

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def environ(self) -> dict[str, str]:
        """What a process of this environment needs in its environment, beyond ours."""
        return {"LLAMA_CPP_LIB_PATH": str(self.libraries)} if self.libraries else {}

    def describe(self) -> str:
        if self.libraries is not None:
            return f"llama-cpp-python {self.version}'s bindings on the harness's llama.cpp build ({self.libraries})"
        return f"llama-cpp-python {self.version} with its own llama.cpp, compiled from its sdist"


def llama_cpp_python_env(ctx: RunContext, version: str) -> LlamaCppPythonEnv:
    """A virtual environment with llama-cpp-python[server]==`version`, made once and cached under <cache>/thirdparty.

    When the llama.cpp build comes from this version's sdist (the same vendored tree, built with shared libraries:
    `Build.bindings`), only the Python package is installed, llama-cpp-python's CMake told to build no llama.cpp
    (seconds), and its bindings load the build's own libraries, with the build's backend and instruction-set
    decision: one compile of llama.cpp serves both targets. Otherwise (another version, a b3661-era or static
    build) it is compiled from its sdist once with the build's backend and instruction sets, keyed by version, CMake
    arguments, Python and machine. Either way it is made in a temporary directory and renamed whole, so a killed
    install leaves no half environment, sealed and checked before each use like every cache entry, and proven on the
    build's probe models before it is used."""
    bound = ctx.build.bindings == version
    if bound:
        cmake = BINDINGS_ONLY
        key = inputs_digest({"version": version, "cmake": cmake, "python": sys.version_info[:2],
                             "os": os.uname().machine})  # fmt: skip
        name = f"llama-cpp-python-{version}-bindings-{key[:12]}"
        sdist = llama_cpp_python_sdist(version, ctx.cache.downloads)
        requirement = f"llama-cpp-python[server] @ {sdist.as_uri()}"
        pip_options: list[str] = []
    else:
        cmake = llama_cpp_python_cmake_args(ctx)
        native_for = this_cpu().fingerprint() if "-DGGML_NATIVE=ON" in cmake else None  # a native build: one CPU
        key = inputs_digest({"version": version, "cmake": cmake, "python": sys.version_info[:2],
                             "os": os.uname().machine, "cpu": native_for})  # fmt: skip
        name = f"llama-cpp-python-{version}-{ctx.build.backend}-{key[:12]}"
        requirement = f"llama-cpp-python[server]=={version}"
        pip_options = ["--no-cache-dir"]  # a wheel compiled for this CPU must not be reused for another
    final = ctx.cache.thirdparty / name
    log = ctx.cache.thirdparty / f"{name}.log"

    def fill(venv: Path) -> None:
        env = {**os.environ, **check_toolchain(ctx.build.backend)}
        env["CMAKE_ARGS"] = " ".join(cmake)
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(ctx.experiment.llamacpp.jobs or os.cpu_count() or 1)
        if bound:
            logger.info("load: installing llama-cpp-python %s (bindings on the llama.cpp build; log: %s)", version, log)
        else:
            logger.info("load: compiling llama-cpp-python %s (%s) once into %s (log: %s)", version, cmake, final, log)
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *pip_options,
             requirement],
        ):  # fmt: skip
            run = run_logged(cmd, log_path=log, env=env, tail=40)
            if not run.ok:
                raise LoadTestError(f"cannot install llama-cpp-python {version}: {error_line(run.lines)} (log: {log})")

    atomic_dir(final, fill)
    made = LlamaCppPythonEnv(final, version, ctx.build.bin_dir if bound else None)
    check_llama_cpp_python(ctx, made, log_path=log)
    return made


# Loads each probe model and evaluates a 64-token batch, as the server does with a prompt.
_PROBE_SCRIPT = """
import sys
from llama_cpp import Llama
for path in sys.argv[1:]:
    llm = Llama(model_path=path, n_ctx=128, n_batch=128, n_threads=None, verbose=False)
    llm.eval(list(range(3, 67)))
    print("llamasys: ok", path, flush=True)
"""


def check_llama_cpp_python(ctx: RunContext, made: LlamaCppPythonEnv, *, log_path: Path) -> None:
    """Prove the environment's llama.cpp runs here, on the build's probe models in the experiment's weight types
    (once per environment, CPU and, for bindings on the build's libraries, build): a library compiled for
    instructions this CPU lacks dies here, by name, not in the middle of a load test."""
    cpu = this_cpu()
    bound_to = f"-{ctx.build.cache_key}" if made.libraries is not None else ""
    done = made.venv.with_name(f"{made.venv.name}.check-{cpu.fingerprint()}{bound_to}.json")
    if done.is_file():
        return
    models = probe_models(ctx.build, ctx.experiment.weight_types, ctx.cache)
    cmd = [str(made.python), "-c", _PROBE_SCRIPT, *(str(m) for m in models.values())]
    run = run_logged(cmd, log_path=log_path, tail=40, env={**os.environ, **made.environ()})
    if not run.ok:
        what = f"llama-cpp-python's llama.cpp on the probe models ({', '.join(models)})"
        raise (
            run.error(LoadTestError, what)
            if run.signalled
            else LoadTestError(f"{what} failed (exit {run.code}): {error_line(run.lines)} (log: {log_path})")
        )
    atomic_write(done, json.dumps({"types": list(models), "cpu": cpu.model, "seconds": round(run.seconds, 2),
                                   "libraries": str(made.libraries) if made.libraries else None}))  # fmt: skip


class LlamaCppPythonServer(ManagedEndpoint):
    """`python -m llama_cpp.server` for one variant, or for several from one --config_file (model aliases)."""

    kind = "llama-cpp-python"
    serializes = LlamaCppPython.serializes

    def __init__(
        self, ctx: RunContext, target: LlamaCppPythonConfig, models: Mapping[str, Path], *, log_path: Path,
        embedding: bool,
    ) -> None:  # fmt: skip
        self.ctx = ctx
        self.target = target
        self.models = {name: Path(path) for name, path in models.items()}
        self.log_path = log_path
        self.embedding = embedding
        self.port: int | None = None
        self.props: dict[str, Any] = {}
        self.env: LlamaCppPythonEnv | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("llama-cpp-python's server is not running")
        return f"http://127.0.0.1:{self.port}"

    def model_settings(self, alias: str, model: Path) -> dict[str, Any]:
        """One model's settings (--config_file entry and command-line flags alike)."""
        exp = self.ctx.experiment
        sizing = exp.sizing()
        settings: dict[str, Any] = {
            "model": str(model),
            "model_alias": alias,
            # One request at a time: one sequence's context holds a whole request.
            "n_ctx": sizing.per_slot,
            "n_batch": min(2048, sizing.per_slot),
            "n_gpu_layers": exp.server.gpu_layers if self.ctx.build.has_gpu else 0,
            "embedding": self.embedding,
        }
        if exp.server.threads:
            settings["n_threads"] = settings["n_threads_batch"] = exp.server.threads
        return settings

    def server_command(self, python: Path, config_file: Path) -> list[str]:
        return [str(python), "-m", "llama_cpp.server", "--config_file", str(config_file)]

    def start(self) -> None:
        for model in self.models.values():
            check_gguf(model, error=LoadTestError)
        self.env = llama_cpp_python_env(self.ctx, llama_cpp_python_version(self.ctx.experiment, self.target))
        self.port = free_port("127.0.0.1")
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            # Its default cancels the streaming request whenever another one arrives (the client sees the stream
            # cut short): concurrent users must queue instead, as they would in a deployment.
            "interrupt_requests": False,
            "models": [self.model_settings(alias, path) for alias, path in self.models.items()],
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config_file = atomic_write(self.log_path.with_name("llama-cpp-python.json"), json.dumps(config, indent=2))
        cmd = self.command = self.server_command(self.env.python, config_file)
        extra = self.env.environ()
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join([*(f'{k}={v}' for k, v in extra.items()), *cmd])}\n")
        self._spawned(spawn(cmd, log_path=self.log_path, cwd=self.log_path.parent, env={**os.environ, **extra}))
        try:
            self._wait_ready(
                self._lists_models, timeout_s=self.ctx.experiment.server.startup_timeout_s,
                name="llama-cpp-python's server",
            )  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def describe(self) -> dict[str, Any]:
        exp = self.ctx.experiment
        return {
            **super().describe(),
            "models": {alias: str(path) for alias, path in self.models.items()},
            "version": llama_cpp_python_version(exp, self.target),
            "llama_cpp": self.env.describe() if self.env is not None else None,
            "backend": self.ctx.build.backend,
            "ctx_size": exp.sizing().per_slot,
            "threads": exp.server.threads,
        }

    def _lists_models(self) -> bool:
        try:
            served = {m.get("id") for m in self.get_json("/v1/models", timeout_s=2).get("data", [])}
        except (urllib.error.URLError, OSError, ValueError):
            return False  # not listening yet
        missing = sorted(set(self.models) - served)
        if missing:
            raise ServerError(
                f"llama-cpp-python's server does not list model(s) {', '.join(missing)} (log: {self.log_path})"
            )
        return True
