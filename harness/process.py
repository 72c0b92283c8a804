"""Child processes that never outlive us: own process group, parent-death signal, stop by PID on every path."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from harness.errors import HarnessError

_PR_SET_PDEATHSIG = 1

# What a signal that ends a tool most likely means, for the one line the user reads.
_SIGNAL_MEANINGS = {
    signal.SIGILL: "an instruction this CPU cannot execute",
    signal.SIGKILL: "out of memory? (the kernel's OOM killer sends it), or killed by another process",
    signal.SIGSEGV: "an invalid memory access (the tool crashed)",
    signal.SIGBUS: "a bad memory access (a file it maps truncated or on a failing disk?)",
    signal.SIGABRT: "the tool aborted (a failed assertion or an uncaught exception)",
    signal.SIGFPE: "an arithmetic error (division by zero)",
    signal.SIGTERM: "asked to stop",
    signal.SIGINT: "interrupted (Ctrl-C)",
}


def exit_reason(code: int | None) -> str:
    """How a process ended, for people: `exit 1`, or `killed by SIGILL: an instruction this CPU cannot execute`.

    Python reports death by signal N as -N; a shell reports it as 128 + N, which is taken as a signal above 128."""
    if code is None:
        return "still running"
    number = -code if code < 0 else code - 128 if 128 < code < 128 + 65 else None
    if number is None:
        return f"exit {code}"
    try:
        sig = signal.Signals(number)
    except ValueError:
        return f"killed by signal {number}"
    meaning = _SIGNAL_MEANINGS.get(sig) or signal.strsignal(sig) or ""
    return f"killed by {sig.name}: {meaning}" if meaning else f"killed by {sig.name}"


def died_by_signal(code: int | None, sig: signal.Signals) -> bool:
    return code is not None and (code == -sig or code == 128 + sig)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the kernel sends SIGKILL to the child if the process that started it dies, even by SIGKILL,
    # so a crashed harness cannot leave a llama-server holding a port and gigabytes of memory.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = False,
) -> subprocess.Popen[str]:
    """Start `cmd` in a new process group; output goes to `log_path` (appended), a pipe, or is discarded."""
    stdout: int | object
    if capture:
        stdout = subprocess.PIPE
    elif log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stdout = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed right after Popen
    else:
        stdout = subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [str(c) for c in cmd],
            stdout=stdout,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            text=capture,
            bufsize=1 if capture else -1,
        )
    except FileNotFoundError:
        raise HarnessError(f"program not found: {cmd[0]}") from None
    finally:
        if hasattr(stdout, "close"):
            stdout.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen, *, grace_s: float = 10.0) -> int | None:
    """SIGTERM the process group we created, then SIGKILL after `grace_s`. Returns the exit code."""
    if proc.poll() is not None:
        _reap_group(proc.pid)
        return proc.returncode
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    _reap_group(proc.pid)
    return proc.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # The group id is the PID of the leader we started (start_new_session), so this only reaches our children.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap_group(pgid: int) -> None:
    """Kill anything the leader left behind in its group (helpers it forked), by our own group id."""
    _signal_group(pgid, signal.SIGKILL)


@contextlib.contextmanager
def running(proc: subprocess.Popen, *, grace_s: float = 10.0) -> Iterator[subprocess.Popen]:
    """Context manager that stops `proc` (and its group) on every exit path, Ctrl-C included."""
    try:
        yield proc
    finally:
        stop(proc, grace_s=grace_s)


def wait_for(predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
