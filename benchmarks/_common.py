"""What the benchmarks that drive llama.cpp share: the cache they reuse and how they report their figures."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from harness.cache import default_cache_dir
from harness.errors import HarnessError


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
