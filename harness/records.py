"""Typed records on disk: every stage output, cache record and results.json is a pydantic model written and read here.

Writes are atomic (a temporary sibling renamed over the target), so a killed run never leaves a half-written file
that a later run would take for a finished one. A stage output carries the digest of the inputs that produced it;
a stage whose output holds the digest of its current inputs is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pydantic import BaseModel, ValidationError

from bench.records import Record
from harness.errors import HarnessError


class RecordError(HarnessError):
    """A record file exists but is not one this version can read (damaged, or written by another schema)."""


class StageRecord(Record):
    """A stage output: carries the digest of the inputs that produced it (see `is_fresh`)."""

    inputs_digest: str | None = None


class UnitFailure(Record):
    """One unit of a stage (a variant) that failed while the others went on: what failed and why, for the report."""

    unit: str
    what: str  # "MMLU", "KL divergence"
    error: str
    at: str


R = TypeVar("R", bound=BaseModel)


def inputs_digest(inputs: Any) -> str:
    """Digest of a JSON-able description of everything that determines a stage's output."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only when the block ends without an error (temporary sibling + rename):
    readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_record(path: Path, record: BaseModel, *, digest: str | None = None) -> Path:
    """Write `record` as indented JSON, atomically; `digest` stamps a stage output with its inputs' digest."""
    if digest is not None:
        record = record.model_copy(update={"inputs_digest": digest})
    return atomic_write(path, record.model_dump_json(indent=2) + "\n")


def read_record(path: Path, cls: type[R]) -> R:
    """The record stored at `path`. FileNotFoundError when there is none, RecordError when it cannot be read."""
    text = path.read_text(encoding="utf-8")
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise RecordError(
            f"{path} is not a {cls.__name__} record this version can read: {where}: {first['msg']}"
        ) from None


def is_fresh(path: Path, digest: str) -> bool:
    """True when `path` holds a stage output written for inputs with this digest."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("inputs_digest") == digest
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return False
