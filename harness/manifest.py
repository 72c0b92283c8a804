"""manifest.json: what ran where: versions, hardware, and each stage's state and duration.

Stage states are written as they change, so a crash or Ctrl-C leaves a manifest that says what finished.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psutil
from pydantic import Field

from harness.records import Record, RecordError, read_record, write_record

if TYPE_CHECKING:
    from harness.build import Build


def hardware_info() -> dict[str, Any]:
    """CPU model, cores, memory; GPU names and memory through NVML when an NVIDIA driver is present."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
    }
    gpus = gpu_info()
    info["gpus"] = gpus if gpus else "none"
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_info() -> list[dict[str, Any]]:
    try:
        import pynvml  # nvidia-ml-py, the `gpu` extra
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []  # no driver / no GPU: the normal case on CPU machines
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {"name": name if isinstance(name, str) else name.decode(), "memory_gib": round(mem.total / 2**30, 1)}
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def software_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for dist in ("llama-cpp-sys", "locust", "gevent", "numpy", "scipy", "statsmodels", "datasets", "huggingface_hub",
                 "transformers"):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


class StageState(Record):
    state: Literal["running", "done", "failed", "interrupted"]
    started: str
    duration_s: float | None = None
    error: str | None = None


class ManifestRecord(Record):
    """manifest.json."""

    name: str
    created: str
    updated: str | None = None
    stages: dict[str, StageState] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    software: dict[str, str] = Field(default_factory=dict)
    llamacpp: dict[str, Any] = Field(default_factory=dict)


class StageTime(Record):
    """One row of "where the time went": a stage's wall time in the last run of it, and what it spent it on."""

    stage: str
    seconds: float | None
    state: str
    detail: str = ""


def stage_times(record: ManifestRecord) -> list[StageTime]:
    """The stages in the order they ran, each with its duration; the build's row names its compiles and checks."""
    from harness.build import BuildStep

    rows = []
    for name, state in record.stages.items():
        detail = ""
        if name == "build":
            steps = [BuildStep.model_validate(s) for s in record.llamacpp.get("steps") or ()]
            detail = "; ".join(s.describe() for s in steps) or "cached: nothing to compile or check"
        rows.append(StageTime(stage=name, seconds=state.duration_s, state=state.state, detail=detail))
    return rows


def time_table(rows: list[StageTime]) -> str:
    """The rows as the console prints them at the end of a run, with their total."""
    lines = ["where the time went:", f"  {'stage':<8} {'seconds':>9}  detail"]
    for row in rows:
        seconds = f"{row.seconds:,.1f}" if row.seconds is not None else "-"
        state = "" if row.state == "done" else f"({row.state}) "
        lines.append(f"  {row.stage:<8} {seconds:>9}  {state}{row.detail}".rstrip())
    total = sum(r.seconds or 0.0 for r in rows)
    lines.append(f"  {'total':<8} {total:>9,.1f}")
    return "\n".join(lines)


class Manifest:
    """The run's manifest, saved after every change."""

    def __init__(self, path: Path, record: ManifestRecord) -> None:
        self.path = path
        self.record = record

    @classmethod
    def open(cls, path: Path, *, name: str) -> Manifest:
        try:
            record = read_record(path, ManifestRecord)
        except (FileNotFoundError, RecordError):
            record = ManifestRecord(name=name, created=_now())
        record.hardware = hardware_info()
        record.software = software_versions()
        manifest = cls(path, record)
        manifest.save()
        return manifest

    def save(self) -> None:
        self.record.updated = _now()
        write_record(self.path, self.record)

    def set_build(self, build: Build) -> None:
        self.record.llamacpp = build.provenance()
        self.save()

    def state(self, stage: str) -> str | None:
        found = self.record.stages.get(stage)
        return found.state if found else None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageState]:
        """Record a stage's start, end, duration and outcome (done, failed, interrupted)."""
        record = StageState(state="running", started=_now())
        self.record.stages[name] = record
        self.save()
        started = time.monotonic()
        try:
            yield record
        except (KeyboardInterrupt, SystemExit):
            record.state = "interrupted"
            raise
        except BaseException as exc:
            record.state = "failed"
            record.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise
        else:
            record.state = "done"
        finally:
            record.duration_s = round(time.monotonic() - started, 2)
            self.save()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
