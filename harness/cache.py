"""Cache entries that appear whole or not at all: filled in a temporary sibling, renamed under a file lock.

A killed run never leaves a half entry, and two runs never fill the same entry at once.
"""

from __future__ import annotations

import hashlib
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


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in blocks (model files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def tree_fingerprint(root: Path, *, skip: tuple[str, ...] = (".",), followlinks: bool = False) -> str:
    """Cheap content identity of a directory tree: every file's relative path, size and mtime."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=followlinks):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(skip))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
