"""The run context every stage receives (what a stage is: harness.stage).

One `RunContext` (Locust's Environment idiom) carries the experiment, the llama.cpp build, the run directory, the
cache directory with its typed paths and the logger; `models()` lists the variants the models stage made, which
every later stage measures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from harness.build import Build
from harness.cache import CacheDir
from harness.config import Experiment
from harness.models.records import ModelArtifact, load_models_json
from harness.rundir import RunDir
from harness.tools import Compute, ToolRunner


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
        return load_models_json(self.run.models_json)
