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
from typing import Any

import psutil

from harness.rundir import read_json, write_json

STAGES = ("build", "models", "mmlu", "load", "report")


def hardware_info() -> dict[str, Any]:
    """CPU model, cores, memory; GPU names and memory through NVML when an NVIDIA driver is present."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
    }
    gpus = gpu_info()
    info["gpus"] = gpus if gpus else "none"
    return info


def _cpu_model() -> str:
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
    for dist in ("llama-cpp-sys", "locust", "gevent", "numpy", "scipy", "datasets", "huggingface_hub", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


class Manifest:
    """The run's manifest, saved after every change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, path: Path, *, name: str) -> Manifest:
        if path.is_file():
            data = read_json(path)
        else:
            data = {"name": name, "created": _now(), "stages": {}}
        data["hardware"] = hardware_info()
        data["software"] = software_versions()
        manifest = cls(path, data)
        manifest.save()
        return manifest

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.path, self.data)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def state(self, stage: str) -> str | None:
        return self.data["stages"].get(stage, {}).get("state")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Record a stage's start, end, duration and outcome (done, failed, interrupted)."""
        record: dict[str, Any] = {"state": "running", "started": _now()}
        self.data["stages"][name] = record
        self.save()
        started = time.monotonic()
        try:
            yield record
        except KeyboardInterrupt:
            record.update(state="interrupted")
            raise
        except SystemExit:
            record.update(state="interrupted")
            raise
        except BaseException as exc:
            record.update(state="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        else:
            record["state"] = "done"
        finally:
            record["duration_s"] = round(time.monotonic() - started, 2)
            self.save()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
