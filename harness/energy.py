"""Energy counters the hardware keeps: RAPL (Linux powercap) for CPU packages, NVML for NVIDIA GPUs.

Both are cumulative counters the hardware itself integrates; nothing here estimates power from utilisation. A step's
energy is the difference of the counter between two samples, so it is the whole package's or device's energy (other
processes included), not the server's alone: the figure is honest on a machine that runs the benchmark only.

RAPL: `/sys/class/powercap/intel-rapl:N/energy_uj` (the `intel-rapl` powercap driver, also on AMD Zen), one per
package; its sub-zones (`intel-rapl:N:M`, cores / uncore / dram) are parts of the package and are not added again.
The counter wraps at `max_energy_range_uj`; since Linux 5.10 (CVE-2020-8694) it is readable by root only.
NVML: `nvmlDeviceGetTotalEnergyConsumption` (millijoules since the driver loaded; Volta and later).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")


@dataclass
class _Zone:
    name: str
    path: Path  # its energy_uj
    range_uj: int  # where the counter wraps
    last_uj: int
    total_uj: int = 0  # unwrapped, since the first read


@dataclass
class RaplCounter:
    """The CPU packages' energy in joules since construction, unwrapped; `why_not` when none is readable."""

    root: Path = POWERCAP
    zones: list[_Zone] = field(default_factory=list)
    why_not: str | None = None

    def __post_init__(self) -> None:
        packages = sorted(p for p in self.root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not packages:
            self.why_not = f"no RAPL powercap zones ({self.root}/intel-rapl:N)"
            return
        refused = []
        for package in packages:
            try:
                name = (package / "name").read_text().strip() if (package / "name").is_file() else package.name
                range_uj = int((package / "max_energy_range_uj").read_text())
                start = int((package / "energy_uj").read_text())
            except PermissionError:
                refused.append(package.name)
                continue
            except (OSError, ValueError) as exc:
                refused.append(f"{package.name} ({exc})")
                continue
            self.zones.append(_Zone(name=name, path=package / "energy_uj", range_uj=range_uj, last_uj=start))
        if not self.zones:
            self.why_not = f"RAPL counters not readable ({', '.join(refused)}: root only since Linux 5.10)"

    @property
    def source(self) -> str | None:
        return f"RAPL ({', '.join(z.name for z in self.zones)})" if self.zones else None

    def joules(self) -> float | None:
        """Energy of every package since the counter was made (None: not available, or a read failed)."""
        if not self.zones:
            return None
        for zone in self.zones:
            try:
                now = int(zone.path.read_text())
            except (OSError, ValueError):
                return None
            zone.total_uj += now - zone.last_uj if now >= zone.last_uj else now + zone.range_uj - zone.last_uj
            zone.last_uj = now
        return sum(z.total_uj for z in self.zones) / 1e6


def nvml_joules(nvml: Any, handles: list[Any]) -> float | None:
    """The GPUs' total energy counter in joules (since their driver loaded), or None when a device lacks it."""
    try:
        return sum(nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles) / 1000.0
    except nvml.NVMLError:
        return None


def mean_power(points: list[tuple[float, float]]) -> float | None:
    """Watts from (time, cumulative joules) samples: the counter's change over the time between the first and the
    last sample. None with fewer than two samples or no time between them."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
