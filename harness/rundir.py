"""The run directory (DESIGN.md): where every stage reads its inputs and writes its outputs.

A stage output is a JSON file that records the digest of the inputs that produced it; a stage whose output
exists with the same digest is skipped, which is how a finished run re-runs in seconds and an interrupted
one resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    def models(self) -> Path:
        return self.root / "models"

    def mmlu(self, variant: str) -> Path:
        return self.root / "mmlu" / f"{variant}.json"

    def kld(self, variant: str) -> Path:
        return self.root / "kld" / f"{variant}.json"

    def load(self, variant: str) -> Path:
        return self.root / "load" / variant

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


def inputs_digest(inputs: Any) -> str:
    """Digest of a JSON-able description of everything that determines a stage's output."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


def is_fresh(path: Path, digest: str) -> bool:
    """True when `path` holds a stage result written for inputs with this digest."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("inputs_digest") == digest
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return False


def write_json(path: Path, data: dict[str, Any], *, digest: str | None = None) -> Path:
    """Write atomically (temp file + rename): a killed run never leaves a half-written result."""
    if digest is not None:
        data = {**data, "inputs_digest": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
