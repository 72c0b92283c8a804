"""The run directory: where every stage reads its inputs and writes its outputs, each path spelled once here.

runs/<name>/
  experiment.toml      the resolved experiment (what actually ran)
  manifest.json        versions, hardware, stage states and durations
  llamasys.log         every message of every run in this directory
  models/              models.json, <variant>.gguf links to the cache, logs/
  mmlu/<variant>.json  per-question correctness, per-subject and overall accuracy (logs/ beside)
  kld/<variant>.json   KL divergence against the baseline (logs/ beside)
  load/<variant>/      summary.json, requests.jsonl, Locust CSVs and HTML, server.log, resources.jsonl
  results.json         the merged results the report renders
  report.html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def experiment(self) -> Path:
        return self.root / "experiment.toml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def log(self) -> Path:
        return self.root / "llamasys.log"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def models_json(self) -> Path:
        return self.models / "models.json"

    def model_link(self, variant: str) -> Path:
        return self.models / f"{variant}.gguf"

    def recipe(self, variant: str) -> Path:
        """A searched variant's --tensor-type-file, for plain llama-quantize."""
        return self.models / f"{variant}.tensor-types.txt"

    def mmlu(self, variant: str) -> Path:
        return self.root / "mmlu" / f"{variant}.json"

    def kld(self, variant: str) -> Path:
        return self.root / "kld" / f"{variant}.json"

    def failure(self, output: Path) -> Path:
        """Where a variant's failed measurement is recorded, beside the output it did not write (Q4_0.failed.json)."""
        return output.with_name(f"{output.stem}.failed.json")

    def logs(self, stage: str) -> Path:
        """Where a stage's tools write their logs: models/logs, mmlu/logs, kld/logs."""
        return self.root / stage / "logs"

    def load_target(self, target: str) -> Path:
        return self.root / "load" / target

    def load(self, target: str, variant: str) -> Path:
        return self.load_target(target) / variant

    def load_summary(self, target: str, variant: str) -> Path:
        return self.load(target, variant) / "summary.json"

    def tune(self, variant: str) -> Path:
        """The tune stage's result for a variant (its trials run in tune/<variant>/<setting>/, run directories of
        their own)."""
        return self.root / "tune" / f"{variant}.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"
