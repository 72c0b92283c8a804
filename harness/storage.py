"""Disk checks made before expensive work: a run or cache directory that cannot be written, a disk too full for
what is about to be written, and the one writer a run directory may have at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from harness.errors import ConfigError, DiskError

LOCK_NAME = ".llamasys.lock"


def check_writable(path: Path, what: str) -> None:
    """Fail in one line unless `path` (created if missing) accepts a new file."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DiskError(f"the {what} {path} is not writable ({exc.strerror}); {_hint(what)}") from None


def check_free_space(path: Path, need_bytes: int, what: str) -> None:
    """Fail in one line when the file system holding `path` has less than `need_bytes` free."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise DiskError(
            f"not enough free space for {what} in {path}: {_gib(need_bytes)} needed, {_gib(free)} free; "
            "free some space or point the cache elsewhere (--cache-dir)"
        )


def disk_error(exc: OSError) -> DiskError | None:
    """The one-line error for an OSError that means the disk is full or not writable, else None."""
    name = f" {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(
            f"no space left on the device writing{name}; finished work is kept, the unfinished file is not"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(f"cannot write{name} ({exc.strerror})")
    return None


@contextlib.contextmanager
def sole_writer(root: Path) -> Iterator[None]:
    """Hold the run directory `root` for this process: a second llamasys on the same directory fails at once with
    who holds it. The lock is the kernel's (flock), so a killed run releases it with its last breath."""
    check_writable(root, "run directory")
    fh = open(root / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            raise ConfigError(
                f"run directory {root} is in use by another llamasys run ({owner}); wait for it to finish or use "
                "another --run-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


def _hint(what: str) -> str:
    return "use another --run-dir" if what == "run directory" else "use another --cache-dir"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
