"""The record of a llama.cpp build: where its binaries are, what produced them, which instruction sets they use, and
the proof that they run on this machine. Imported by everything that runs a tool; it imports nothing that builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from harness.cpu import IsaDecision
from harness.errors import BuildError
from harness.records import Record
from harness.tools import Compute, ToolRunner

# The six tools every stage needs.
TOOLS = ("llama-server", "llama-perplexity", "llama-quantize", "llama-imatrix", "llama-cli", "llama-bench")

Era = Literal["legacy", "current"]


class TypeCheck(Record):
    """One weight type of the probe model through the tools the stages use: how it went, and llama-bench's rates."""

    type: str
    ok: bool
    tool: str | None = None  # the tool that failed
    reason: str = ""  # `killed by SIGILL: an instruction this CPU cannot execute`, `exit 1: <its line>`
    command: str = ""
    log: str = ""
    instruction: str | None = None  # the instruction a SIGILL stopped at, when it could be read
    extension: str | None = None  # the extension that instruction belongs to
    prompt_tps: float | None = None  # llama-bench pp64 on the probe model
    generation_tps: float | None = None  # llama-bench tg8
    seconds: float = 0.0

    def describe(self) -> str:
        if self.ok:
            return "ok"
        at = (
            f" at `{self.instruction}`" + (f" ({self.extension})" if self.extension else "") if self.instruction else ""
        )
        where = f"command: {self.command}; log: {self.log}"
        return f"{self.tool} on the {self.type} probe model was {self.reason}{at}; {where}"


class BuildCheck(Record):
    """The post-build probe of one build on one machine (a CPU fingerprint): every weight type asked for."""

    build_key: str
    machine: str  # the CPU's fingerprint
    cpu: str
    checked_at: str
    repack: bool = True
    types: dict[str, TypeCheck] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.types.values())

    @property
    def failure(self) -> TypeCheck | None:
        return next((t for t in self.types.values() if not t.ok), None)


class BuildStep(Record):
    """One thing the build stage did in this run (a compile, a check), timed: where the set-up's minutes went."""

    what: str
    seconds: float
    ok: bool = True

    def describe(self) -> str:
        return f"{self.what} {self.seconds:,.1f} s" + ("" if self.ok else " (failed)")


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
    isa: IsaDecision | None = None  # the instruction sets it was compiled for (None: prebuilt, or not recorded)
    # False: every tool that can is told not to repack weights or use extra buffer types (AMX) at run time
    # (--no-repack, llama-bench --repack 0): the remedy for a prebuilt build whose repacked kernels this CPU cannot
    # run. A build compiled here leaves out what the CPU cannot run instead, and keeps repacking.
    repack: bool = True
    # The llama-cpp-python release whose ctypes bindings load this build's shared libraries (the sdist its tree came
    # from; None: a static or other build, for which llama-cpp-python compiles its own copy).
    bindings: str | None = None
    check: BuildCheck | None = None  # the proof that it runs on this machine (attached when it is used)
    steps: list[BuildStep] = Field(default_factory=list)  # what this run did to have it (attached, never stored)

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

    def provenance(self) -> dict[str, object]:
        """What the manifest and the report say of the build: identity, instruction sets and why, the probe."""
        return {
            **self.describe(),
            "isa": self.isa.model_dump(mode="json") if self.isa else None,
            "isa_summary": self.isa.summary() if self.isa else "not recorded (a prebuilt build)",
            "repack": self.repack,
            "check": self.check.model_dump(mode="json") if self.check else None,
            "steps": [step.model_dump(mode="json") for step in self.steps],
        }
