"""Typed records on disk, the frozen experiment, and the stage list the pipeline walks."""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest

from harness.config import Experiment
from harness.records import (
    RecordError,
    StageRecord,
    atomic_open,
    inputs_digest,
    is_fresh,
    read_record,
    write_record,
)


class Example(StageRecord):
    name: str
    values: list[float] = []


def test_write_and_read_a_stage_record_with_its_digest(tmp_path: Path):
    path = tmp_path / "deep" / "out.json"
    digest = inputs_digest({"model": "m", "n": 3})
    write_record(path, Example(name="x", values=[0.5]), digest=digest)
    assert read_record(path, Example) == Example(name="x", values=[0.5], inputs_digest=digest)
    assert is_fresh(path, digest) and not is_fresh(path, inputs_digest({"model": "m", "n": 4}))
    assert not is_fresh(tmp_path / "none.json", digest)
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary file left behind


def test_unreadable_records_are_one_clear_error(tmp_path: Path):
    path = tmp_path / "out.json"
    path.write_text('{"values": [1]}')
    with pytest.raises(
        RecordError, match=r"out.json is not a Example record this version can read: name: Field required"
    ):
        read_record(path, Example)
    path.write_text('{"name": "x", "val')  # a file cut short
    with pytest.raises(RecordError, match="Invalid JSON"):
        read_record(path, Example)
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "missing.json", Example)


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path):
    path = tmp_path / "out.json"
    write_record(path, Example(name="old"))
    with pytest.raises(RuntimeError), atomic_open(path) as fh:
        fh.write(b'{"name": "ne')
        raise RuntimeError("killed mid-write")
    assert read_record(path, Example).name == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_the_experiment_is_frozen_once_validated():
    exp = Experiment()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        exp.server.port = 8080  # type: ignore[misc]
    assert exp.server.model_copy(update={"port": 8080}).port == 8080 and exp.server.port is None


def test_the_pipeline_lists_each_stage_once_in_order():
    from harness.pipeline import STAGES, stages

    assert ["build", *(s.name for s in stages()), "report"] == list(STAGES)
