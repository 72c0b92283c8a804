"""Target kind `llama-cpp-python`: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`).

Installed from the PyPI version whose sdist the llama.cpp build came from, compiled once into a cached environment
with the build's backend and instruction sets, started on 127.0.0.1 with the variant's GGUF (or every variant, from
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

from harness.buildcheck import probe_models
from harness.cache import atomic_dir
from harness.cpu import this_cpu
from harness.errors import ConfigError, LoadTestError, ServerError
from harness.process import spawn
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
    def _no_native_route(self) -> LlamaCppPythonConfig:
        if self.api == "native":
            raise ValueError("llama-cpp-python has no native /completion route; use api openai, chat or embeddings")
        return self


@register
class LlamaCppPython(Target):
    kind = "llama-cpp-python"
    config = LlamaCppPythonConfig
    serializes = True  # one Llama object per model, one request at a time: concurrent requests queue

    @classmethod
    def route_api(cls, api: str) -> str:
        return "openai" if api == "native" else api

    @classmethod
    def open(cls, ctx, target, models, *, log_path, parallel):  # type: ignore[no-untyped-def]
        embeddings = target.route_api(ctx.experiment.load.api) == "embeddings"
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


def llama_cpp_python_env(ctx: RunContext, version: str) -> Path:
    """A virtual environment with llama-cpp-python[server]==`version`, compiled from its sdist once and cached
    under <cache>/thirdparty, keyed by version, CMake arguments, Python and machine: the second call compiles
    nothing. Built in a temporary directory and renamed whole, so a killed build leaves no half environment; sealed
    and checked before each use like every cache entry."""
    cmake = llama_cpp_python_cmake_args(ctx)
    native_for = this_cpu().fingerprint() if "-DGGML_NATIVE=ON" in cmake else None  # a native build is for one CPU
    key = inputs_digest({"version": version, "cmake": cmake, "python": sys.version_info[:2], "os": os.uname().machine,
                         "cpu": native_for})  # fmt: skip
    final = ctx.cache.thirdparty / f"llama-cpp-python-{version}-{ctx.build.backend}-{key[:12]}"
    log = ctx.cache.thirdparty / f"llama-cpp-python-{version}-{ctx.build.backend}-{key[:12]}.log"

    def fill(venv: Path) -> None:
        env = {**os.environ, **check_toolchain(ctx.build.backend)}
        env["CMAKE_ARGS"] = " ".join(cmake)
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(ctx.experiment.llamacpp.jobs or os.cpu_count() or 1)
        logger.info("load: compiling llama-cpp-python %s (%s) once into %s (log: %s)", version, cmake, final, log)
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir",
             f"llama-cpp-python[server]=={version}"],
        ):  # fmt: skip
            run = run_logged(cmd, log_path=log, env=env, tail=40)
            if not run.ok:
                raise LoadTestError(f"cannot install llama-cpp-python {version}: {error_line(run.lines)} (log: {log})")

    atomic_dir(final, fill)
    check_llama_cpp_python(ctx, final, log_path=log)
    return final


# Loads each probe model and evaluates a 64-token batch, as the server does with a prompt.
_PROBE_SCRIPT = """
import sys
from llama_cpp import Llama
for path in sys.argv[1:]:
    llm = Llama(model_path=path, n_ctx=128, n_batch=128, n_threads=None, verbose=False)
    llm.eval(list(range(3, 67)))
    print("llamasys: ok", path, flush=True)
"""


def check_llama_cpp_python(ctx: RunContext, venv: Path, *, log_path: Path) -> None:
    """Prove the environment's llama.cpp runs here, on the build's probe models in the experiment's weight types
    (once per environment and CPU): a library compiled for instructions this CPU lacks dies here, by name, not in
    the middle of a load test."""
    cpu = this_cpu()
    done = venv.with_name(f"{venv.name}.check-{cpu.fingerprint()}.json")
    if done.is_file():
        return
    models = probe_models(ctx.build, ctx.experiment.weight_types, ctx.cache)
    cmd = [str(venv / "bin" / "python"), "-c", _PROBE_SCRIPT, *(str(m) for m in models.values())]
    run = run_logged(cmd, log_path=log_path, tail=40)
    if not run.ok:
        what = f"llama-cpp-python's llama.cpp on the probe models ({', '.join(models)})"
        raise (
            run.error(LoadTestError, what)
            if run.signalled
            else LoadTestError(f"{what} failed (exit {run.code}): {error_line(run.lines)} (log: {log_path})")
        )
    atomic_write(done, json.dumps({"types": list(models), "cpu": cpu.model, "seconds": round(run.seconds, 2)}))


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

    def command(self, python: Path, config_file: Path) -> list[str]:
        return [str(python), "-m", "llama_cpp.server", "--config_file", str(config_file)]

    def start(self) -> None:
        for model in self.models.values():
            check_gguf(model, error=LoadTestError)
        venv = llama_cpp_python_env(self.ctx, llama_cpp_python_version(self.ctx.experiment, self.target))
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
        cmd = self.command(venv / "bin" / "python", config_file)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
        self._spawned(spawn(cmd, log_path=self.log_path, cwd=self.log_path.parent))
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
