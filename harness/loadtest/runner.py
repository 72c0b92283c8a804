"""Locust as a child process: the command line for our locustfiles, and a headless run watched to its end.

Locust runs in its own process (harness.process: own group, dies with us, stopped by PID on every path) because
importing it gevent-patches the importing process; the harness process stays a plain threaded program.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import LoadConfig
from harness.errors import LoadTestError
from harness.process import spawn, stop
from harness.tools import error_line
from locustfiles import EXIT_ABORTED, LOCUSTFILES, USER_KINDS, RequestRecord, StepRecord, read_records
from locustfiles._slo import Objective, format_objectives
from locustfiles._steps import StepPlan

PROJECT_ROOT = LOCUSTFILES.parent


def user_for(api: str) -> tuple[Path, str]:
    """The locustfile and user class of `load.api`."""
    if api not in USER_KINDS:
        raise LoadTestError(f"unknown load api {api!r}; choose one of {', '.join(USER_KINDS)}")
    kind = USER_KINDS[api]
    return kind.path, kind.user_class


def stop_timeout(cfg: LoadConfig) -> str:
    """Locust's --stop-timeout (whole seconds): how long in-flight requests may finish when the test is stopped
    (Ctrl-C, the web UI's stop) before they are aborted and recorded as interrupted. Steps never need it: they
    drain on their own before the users change."""
    return f"{math.ceil(cfg.drain_grace_s)}s"


def load_arguments(
    cfg: LoadConfig,
    records: Path,
    *,
    model_name: str | None = None,
    objectives: Sequence[Objective] = (),
    max_users: int | None = None,
    run_id: str = "",
    done: Sequence[tuple[int, bool | None]] = (),
) -> list[str]:
    """Our locustfiles' custom arguments for this configuration, the `model` the users name (if any), the latency
    objectives every step is judged against, the search's bound, and for an attempt of a resumed run its records'
    id and the steps already measured."""
    args = [
        "--prompt-tokens", str(cfg.prompt_tokens),
        "--output-tokens", str(cfg.output_tokens),
        "--steps", ",".join(str(s) for s in cfg.steps),
        "--request-timeout", str(cfg.request_timeout_s),
        "--ready-timeout", str(cfg.ready_timeout_s),
        "--records", str(records),
    ]  # fmt: skip
    if cfg.step_duration_s is not None:
        args += ["--step-duration", str(cfg.step_duration_s)]
    else:
        args += ["--requests-per-user", str(cfg.requests_per_user)]
    if cfg.prompt_text is not None:
        args += ["--prompt-text", str(cfg.prompt_text)]
    if model_name:
        args += ["--model-name", model_name]
    if objectives:
        args += ["--slo", format_objectives(objectives)]
    if cfg.search:
        args += [
            "--search",
            "--max-users",
            str(max_users or cfg.bound),
            "--search-resolution",
            str(cfg.search_resolution),
        ]
    if cfg.min_requests:
        args += ["--min-requests", str(cfg.min_requests)]
    if cfg.max_requests:
        args += ["--max-requests", str(cfg.max_requests)]
    if run_id:
        args += ["--run-id", run_id]
    if done:
        args += ["--done-steps", StepPlan.format_done(done)]
    return args


def headless_command(
    cfg: LoadConfig,
    host: str,
    out_dir: Path,
    *,
    processes: int | None = None,
    api: str | None = None,
    **arguments: Any,
) -> list[str]:
    """`locust --headless` for one variant: records, CSVs and HTML into `out_dir`. `api` overrides cfg.api (a
    target's own route); `arguments` are `load_arguments`' keywords (model name, objectives, bound, run id, done
    steps)."""
    locustfile, user = user_for(api or cfg.api)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(locustfile), user,
        "--headless", "--host", host,
        "--csv", str(out_dir / "locust"), "--html", str(out_dir / "locust.html"),
        # Users finish their in-flight request when Locust stops them, instead of being cut mid-stream.
        "--stop-timeout", stop_timeout(cfg),
        "--loglevel", "INFO",
    ]  # fmt: skip
    n = cfg.processes if processes is None else processes
    if n > 1:
        cmd += ["--processes", str(n)]
    records = out_dir / "requests.jsonl"
    return cmd + load_arguments(cfg, records, **arguments)


def locust_env() -> dict[str, str]:
    """Our environment, with the project importable by the locustfile wherever the package is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# After its users' grace (--stop-timeout), Locust writes its CSV and HTML reports and exits: seconds at most.
LOCUST_SHUTDOWN_S = 15.0


@contextlib.contextmanager
def locust_running(proc: subprocess.Popen, *, grace_s: float = LOCUST_SHUTDOWN_S) -> Iterator[subprocess.Popen]:
    """Like harness.process.running, but first asks Locust to stop the way Ctrl-C does (SIGINT to the group we
    created): its users get their --stop-timeout to finish in-flight requests (recorded as interrupted if they
    do not), then it writes its CSV and HTML reports; a headless Locust running a load shape has no SIGTERM handler
    yet and would die without writing them. After `grace_s` it is stopped (SIGTERM, then SIGKILL) as any child
    is; a second Ctrl-C while it stops kills it at once."""
    try:
        yield proc
    finally:
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass  # stop() below escalates
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the second Ctrl-C: no more waiting
            raise
        finally:
            stop(proc, grace_s=5.0)


@dataclass
class LocustResult:
    exit_code: int
    requests: list[RequestRecord]
    steps: list[StepRecord]
    log_path: Path


def run_headless(
    cmd: Sequence[str],
    *,
    records: Path,
    log_path: Path,
    deadline_s: float,
    watch: Callable[[], str | None] = lambda: None,
    on_progress: Callable[[int], None] | None = None,
    poll_s: float = 0.2,
    stop_grace_s: float = LOCUST_SHUTDOWN_S,
) -> LocustResult:
    """Run Locust to its end. `watch()` returning a reason (e.g. the server died) stops the run early and
    raises LoadTestError with it; so does passing `deadline_s`. Locust is stopped on every path, given
    `stop_grace_s` to let its users finish (their --stop-timeout) and write its reports."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
    proc = spawn(cmd, log_path=log_path, env=locust_env(), cwd=log_path.parent)
    problem: str | None = None
    with locust_running(proc, grace_s=stop_grace_s):
        started = time.monotonic()
        while proc.poll() is None:
            time.sleep(poll_s)
            if on_progress is not None:
                on_progress(count_requests(records))
            problem = watch()
            if problem is None and time.monotonic() - started > deadline_s:
                problem = f"the load test did not finish within {deadline_s:.0f} s"
            if problem is not None:
                break
    requests, steps = read_records(records) if records.exists() else ([], [])
    if on_progress is not None:
        on_progress(len(requests))
    if problem is not None:
        failed = sum(not r.ok for r in requests)
        raise LoadTestError(
            f"{problem}; {len(requests)} requests recorded ({failed} failed), kept in {records} (log: {log_path})"
        )
    return LocustResult(proc.returncode, requests, steps, log_path)


def check_complete(result: LocustResult, *, pending: bool) -> None:
    """Raise with the clearest reason when the run aborted, or ended with steps still to measure (`pending`)."""
    errors = [s.error for s in result.steps if s.error]
    if errors or result.exit_code == EXIT_ABORTED:
        reason = errors[0] if errors else error_line(_tail(result.log_path), empty="(empty log)")
        raise LoadTestError(f"load test aborted: {reason} (log: {result.log_path})")
    if pending:
        done = len(result.steps)
        why = error_line(_tail(result.log_path), empty="(empty log)")
        raise LoadTestError(
            f"Locust exited ({result.exit_code}) after {done} step(s) with steps still to measure: {why} "
            f"(log: {result.log_path})"
        )


def count_requests(path: Path) -> int:
    """How many request records `path` holds so far (0 before it exists), read in chunks."""
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b'"kind":"request"') for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _tail(path: Path, n: int = 60) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []
