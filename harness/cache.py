"""Cache entries that appear whole or not at all: filled in a temporary sibling, renamed under a file lock.

A killed run never leaves a half entry, and two runs never fill the same entry at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create `final` by filling a temporary sibling and renaming it: a killed run leaves no half entry."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            fill(tmp)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
