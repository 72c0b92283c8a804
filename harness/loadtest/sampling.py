"""Samples of the server under load: process CPU and memory (psutil), GPU (NVML, when present), the energy counters
the hardware keeps (harness.energy: RAPL, NVML) and llama-server's own Prometheus /metrics, written as JSON lines
while the load runs. The first line says where the energy figures come from (or why there are none)."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from harness.energy import RaplCounter, nvml_joules

logger = logging.getLogger(__name__)

# name{labels} value [timestamp]; labels may hold escaped quotes, values may be NaN or +Inf.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {name or name{labels}: value}; comments and malformed lines are skipped."""
    out: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)  # float() reads NaN, +Inf, -Inf and exponents as Prometheus writes them
        except ValueError:
            continue
        out[name + (labels or "")] = number
    return out


class _Gpu:
    """NVML (pip nvidia-ml-py), if installed and a driver answers; otherwise absent without noise."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handles: list[Any] = []
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except pynvml.NVMLError as exc:  # no driver or no device: no GPU figures, not an error
            logger.info("GPU figures unavailable (NVML: %s)", exc)

    def sample(self, pid: int) -> dict[str, float]:
        if self.nvml is None or not self.handles:
            return {}
        nvml = self.nvml
        try:
            util = [nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            used = 0
            for handle in self.handles:
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory is not None:
                        used += proc.usedGpuMemory
            if not used:  # containers often hide other PIDs from NVML: fall back to the devices' used memory
                used = sum(nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)
        except nvml.NVMLError as exc:
            logger.info("GPU sample failed (NVML: %s)", exc)
            return {}
        sample = {"gpu_util_percent": float(max(util)), "gpu_mem_bytes": float(used)}
        if (joules := nvml_joules(nvml, self.handles)) is not None:
            sample["gpu_energy_j"] = joules
        return sample

    def energy_source(self) -> str | None:
        if self.nvml is None or not self.handles or nvml_joules(self.nvml, self.handles) is None:
            return None
        return f"NVML total energy ({len(self.handles)} GPU{'s' if len(self.handles) > 1 else ''})"

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.nvmlShutdown()


class ResourceSampler:
    """Context manager: a thread sampling the server every `interval_s` into `path` (and `self.samples`)."""

    def __init__(self, pid: int, metrics_url: str | None, path: Path, *, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.metrics_url = metrics_url
        self.path = path
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)

    def __enter__(self) -> ResourceSampler:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        gpu = _Gpu()
        rapl = RaplCounter()
        try:
            proc = psutil.Process(self.pid)
            proc.cpu_percent()  # the first call only starts the measurement interval
        except psutil.NoSuchProcess:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                energy = {"cpu": rapl.source, "cpu_why_not": rapl.why_not, "gpu": gpu.energy_source()}
                fh.write(json.dumps({"t": time.time(), "energy": energy}) + "\n")
                while not self._stop.wait(self.interval_s):
                    sample = self._sample(proc, gpu, rapl)
                    if sample is None:
                        return
                    self.samples.append(sample)
                    fh.write(json.dumps(sample) + "\n")
                    fh.flush()
        finally:
            gpu.close()

    def _sample(self, proc: psutil.Process, gpu: _Gpu, rapl: RaplCounter) -> dict[str, Any] | None:
        try:
            with proc.oneshot():
                sample: dict[str, Any] = {
                    "t": time.time(),
                    "cpu_percent": proc.cpu_percent(),
                    "rss_bytes": proc.memory_info().rss,
                    "threads": proc.num_threads(),
                }
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        sample.update(gpu.sample(self.pid))
        if (joules := rapl.joules()) is not None:
            sample["cpu_energy_j"] = joules
        if self.metrics_url:
            sample["metrics"] = self._scrape()
        return sample

    def _scrape(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as resp:
                metrics = parse_metrics(resp.read().decode("utf-8", errors="replace"))
        except (urllib.error.URLError, OSError, TimeoutError):
            return {}
        return {k: v for k, v in metrics.items() if k.startswith("llamacpp:") and math.isfinite(v)}
