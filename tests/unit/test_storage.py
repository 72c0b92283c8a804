"""Disk checks and sealed cache entries, on the real file system: one writer per run directory, space and write
checks with one-line errors, and entries that are made again when truncated or altered."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from harness.cache import atomic_dir, atomic_file, damage, seal
from harness.errors import ConfigError, DiskError
from harness.storage import check_free_space, check_writable, disk_error, sole_writer


def test_a_second_writer_is_refused_with_who_holds_the_run_dir(tmp_path):
    with sole_writer(tmp_path):
        refused = rf"run directory {tmp_path} is in use by another llamasys run \(pid "
        with pytest.raises(ConfigError, match=refused), sole_writer(tmp_path):
            pass
        # Another process is refused the same way (flock is per open file, so this is the real case).
        code = textwrap.dedent(f"""
            from pathlib import Path
            from harness.errors import ConfigError
            from harness.storage import sole_writer
            try:
                with sole_writer(Path({str(tmp_path)!r})):
                    print("acquired")
            except ConfigError as exc:
                print(exc)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert f"in use by another llamasys run (pid {os.getpid()}, since " in out
    with sole_writer(tmp_path):  # released at the end of the block
        pass


def test_space_and_write_checks_are_one_line(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "not" / "yet", 1, "a file")  # a missing directory is checked on its parent
    with pytest.raises(DiskError, match=r"not enough free space for the F16 GGUF in .*: .* GiB needed, .* GiB free"):
        check_free_space(tmp_path, free + 2**40, "the F16 GGUF")
    check_writable(tmp_path / "new", "cache directory")
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []  # the probe file is gone
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DiskError, match=r"the cache directory .*/file/sub is not writable \(.*\); use another"):
        check_writable(blocker / "sub", "cache directory")


def test_disk_errors_become_one_line():
    full = disk_error(OSError(errno.ENOSPC, "No space left on device", "/cache/models/x.gguf"))
    assert str(full) == (
        "no space left on the device writing /cache/models/x.gguf; finished work is kept, the unfinished file is not"
    )
    read_only = disk_error(OSError(errno.EROFS, "Read-only file system", "/r"))
    assert str(read_only) == "cannot write /r (Read-only file system)"
    assert disk_error(OSError(errno.ENOENT, "No such file")) is None
    # The kernel's own ENOSPC, from /dev/full, is recognised.
    with pytest.raises(OSError) as caught, open("/dev/full", "w") as fh:
        fh.write("x")
        fh.flush()
    assert disk_error(caught.value) is not None


def test_a_sealed_directory_is_made_again_when_altered_or_truncated(tmp_path, caplog):
    made = []

    def fill(tmp):
        made.append(tmp)
        (tmp / "bin").mkdir()
        (tmp / "bin" / "tool").write_bytes(b"x" * 1000)
        (tmp / "record.json").write_text("{}")

    entry = atomic_dir(tmp_path / "entry", fill)
    assert len(made) == 1 and (entry / ".integrity.json").is_file()
    assert atomic_dir(entry, fill) == entry and len(made) == 1  # intact: used as it is
    tool = entry / "bin" / "tool"
    tool.write_bytes(b"y" * 1000)  # same size, other content
    assert damage(entry) == "bin/tool has changed since it was made"
    with caplog.at_level(logging.WARNING):
        atomic_dir(entry, fill)
    assert len(made) == 2 and tool.read_bytes() == b"x" * 1000
    assert f"cache entry {entry} is damaged (bin/tool has changed since it was made): making it again" in caplog.text
    os.truncate(tool, 10)
    assert damage(entry) == "bin/tool is 10 bytes, 1,000 when it was made"
    (entry / "record.json").unlink()
    assert damage(entry) == "record.json is missing"
    # Files added after the entry was made (a tool's __pycache__, say) are not part of it.
    atomic_dir(entry, fill)
    (entry / "bin" / "extra").write_text("later")
    assert damage(entry) is None


def test_a_sealed_file_is_checked_and_an_unsealed_one_is_taken_as_it_is(tmp_path):
    calls = []

    def fill(tmp):
        calls.append(tmp)
        tmp.write_bytes(b"data" * 100)

    path = atomic_file(tmp_path / "tasks.bin", fill)
    assert (tmp_path / ".tasks.bin.integrity.json").is_file() and path.read_bytes() == b"data" * 100
    atomic_file(path, fill)
    assert len(calls) == 1
    with open(path, "r+b") as fh:
        fh.truncate(7)
    atomic_file(path, fill)
    assert len(calls) == 2 and path.stat().st_size == 400
    # A file from before seals existed is sealed on first use; from then on it is checked like the others.
    old = tmp_path / "old.bin"
    old.write_bytes(b"legacy")
    assert damage(old) is None and (tmp_path / ".old.bin.integrity.json").is_file()
    old.write_bytes(b"LEGACY")
    assert damage(old) == "old.bin has changed since it was made"


def test_an_unchanged_file_is_not_hashed_again(tmp_path, monkeypatch):
    entry = tmp_path / "e"
    entry.mkdir()
    (entry / "model.gguf").write_bytes(b"w" * 4096)
    seal(entry)
    import harness.cache as cache

    hashed = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert damage(entry) is None and hashed == []  # size, inode and times as sealed: no read of the content
    os.utime(entry / "model.gguf", ns=(1, 1))  # touched: checked once more, then remembered
    assert damage(entry) is None and len(hashed) == 1
    assert damage(entry) is None and len(hashed) == 1


def test_processes_making_one_entry_at_once_make_it_once(tmp_path):
    # Runs on different run directories share the cache: four processes ask for the same entry at the same moment;
    # one fills it (the others wait on its lock), every one gets the whole entry.
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from harness.cache import atomic_dir

        def fill(tmp):
            with open({str(tmp_path / "fills.log")!r}, "a") as log:
                log.write("fill\\n")
            time.sleep(0.5)  # long enough for every other process to arrive while this one fills
            (tmp / "model.gguf").write_bytes(b"x" * 4096)

        entry = atomic_dir(Path({str(tmp_path / "entry")!r}), fill)
        print((entry / "model.gguf").stat().st_size)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    sizes = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0] and sizes == ["4096"] * 4
    assert (tmp_path / "fills.log").read_text() == "fill\n"
    assert damage(tmp_path / "entry") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock", "fills.log"]  # no temporary left
