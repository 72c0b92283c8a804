"""Energy from the hardware's counters: RAPL's powercap files read and unwrapped, power over a step, J per token.

The files are laid out as Linux's powercap driver writes them (this machine has no readable RAPL; the load tests
check what a real run records here: "not available" and why)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.energy import RaplCounter, mean_power
from harness.loadtest.summary import energy_source, joules_per_token, summarize_resources


def zone(root: Path, name: str, label: str, energy_uj: int, range_uj: int = 262_143_328_850) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return path


def test_rapl_adds_the_packages_not_their_subzones_and_unwraps_the_counter(tmp_path: Path):
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000, range_uj=10_000_000)
    p1 = zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    core = zone(tmp_path, "intel-rapl:0:0", "core", 0)  # a part of package-0: not counted again
    counter = RaplCounter(tmp_path)
    assert counter.source == "RAPL (package-0, package-1)" and counter.why_not is None
    assert counter.joules() == 0.0
    (p0 / "energy_uj").write_text("4000000\n")  # +3 J
    (p1 / "energy_uj").write_text("5500000\n")  # +0.5 J
    (core / "energy_uj").write_text("99000000\n")
    assert counter.joules() == pytest.approx(3.5)
    (p0 / "energy_uj").write_text("1000000\n")  # wrapped at 10 J: +7 J
    assert counter.joules() == pytest.approx(10.5)


def test_no_rapl_says_why(tmp_path: Path):
    counter = RaplCounter(tmp_path / "absent")
    assert counter.source is None and counter.joules() is None
    assert "no RAPL powercap zones" in (counter.why_not or "")


def test_power_and_joules_per_token_over_a_step():
    samples = [{"t": 0.0, "energy": {"cpu": "RAPL (package-0)", "cpu_why_not": None, "gpu": None}}]
    samples += [{"t": float(t), "rss_bytes": 1, "cpu_percent": 100.0, "cpu_energy_j": 50.0 * t} for t in range(1, 6)]
    resources = summarize_resources(samples, 2.0, 4.0)
    assert resources["cpu_power_w"] == pytest.approx(50.0) and resources["gpu_power_w"] is None
    assert resources["samples"] == 3.0  # the header line is not a sample
    assert joules_per_token(resources, output_tps=25.0) == pytest.approx(2.0)
    assert joules_per_token(resources, output_tps=0.0) is None
    assert joules_per_token({"cpu_power_w": None, "gpu_power_w": None}, output_tps=25.0) is None
    assert energy_source(samples) == "RAPL (package-0)"
    assert mean_power([(1.0, 5.0)]) is None


def test_energy_not_available_is_said_with_the_reason():
    header = {"t": 0.0, "energy": {"cpu": None, "cpu_why_not": "no RAPL powercap zones (/x)", "gpu": None}}
    assert energy_source([header]) == "not available (no RAPL powercap zones (/x); no NVML energy counter)"
    assert energy_source([]) == "not available (no resource samples)"
