"""What the benchmarks that drive llama.cpp share: the cache they reuse and how they report their figures."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness.cache import default_cache_dir
from harness.errors import HarnessError

REPO = Path(__file__).resolve().parents[1]


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache-dir (the project's cache, as the CLI and the tests resolve it) and --json."""
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    parser.add_argument("--json", type=Path, help="also write the figures here")


def report(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict]) -> int:
    """Run, print the figures as JSON (and write them to --json); a harness error is one line and its exit code."""
    try:
        figures = run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def add_experiment_arguments(parser: argparse.ArgumentParser, default: Path) -> None:
    """--experiment (default: one of harness/experiments/) and --run-dir (default: a fresh temporary directory)."""
    parser.add_argument("--experiment", type=Path, default=default, help="default: %(default)s")
    parser.add_argument("--run-dir", type=Path, help="default: a fresh temporary directory")


def run_experiment(args: argparse.Namespace, prefix: str) -> tuple[Path, float]:
    """`llamasys run` of args.experiment from this checkout's sources, in args.run_dir (or a fresh one) with
    args.cache_dir: the run directory and the run's wall time in seconds."""
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix=f"{prefix}-")) / "run"
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(args.experiment), "--run-dir", str(run_dir), "--no-progress"],
        check=True, cwd=REPO, env={**os.environ, "LLAMASYS_CACHE_DIR": str(args.cache_dir)},
    )  # fmt: skip
    return run_dir, time.monotonic() - started
