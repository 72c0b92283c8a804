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

from harness.config import LoadConfig
from harness.errors import LoadTestError
from harness.process import spawn, stop
from harness.tools import error_line
from locustfiles import EXIT_ABORTED, LOCUSTFILES, USER_KINDS, RequestRecord, StepRecord, read_records
from locustfiles._slo import Objective, format_objectives

PROJECT_ROOT = LOCUSTFILES.parent


def user_for(api: str) -> tuple[Path, str]:
    """The locustfile and user class of `load.api`."""
    if api not in USER_KINDS:
        raise LoadTestError(f"unknown load api {api!r}; choose one of {', '.join(USER_KINDS)}")
    kind = USER_KINDS[api]
    return kind.path, kind.user_class


def stop_timeout(cfg: LoadConfig) -> str:
    """Locust's --stop-timeout (whole seconds): long enough for an in-flight request to finish."""
    return f"{math.ceil(cfg.request_timeout_s)}s"


def load_arguments(
    cfg: LoadConfig,
    records: Path,
    *,
    model_name: str | None = None,
    objectives: Sequence[Objective] = (),
    max_users: int | None = None,
) -> list[str]:
    """Our locustfiles' custom arguments for this configuration, the `model` the users name (if any), the latency
    objectives every step is judged against and the search's bound."""
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
    return args


def headless_command(
    cfg: LoadConfig,
    host: str,
    out_dir: Path,
    *,
    processes: int | None = None,
    api: str | None = None,
    model_name: str | None = None,
    objectives: Sequence[Objective] = (),
    max_users: int | None = None,
) -> list[str]:
    """`locust --headless` for one variant: records, CSVs and HTML into `out_dir`. `api` overrides cfg.api (a
    target's own route)."""
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
    return cmd + load_arguments(cfg, records, model_name=model_name, objectives=objectives, max_users=max_users)


def locust_env() -> dict[str, str]:
    """Our environment, with the project importable by the locustfile wherever the package is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@contextlib.contextmanager
def locust_running(proc: subprocess.Popen, *, grace_s: float = 15.0) -> Iterator[subprocess.Popen]:
    """Like harness.process.running, but first asks Locust to stop the way Ctrl-C does (SIGINT to the group we
    created): a headless Locust running a load shape has no SIGTERM handler yet and would die without writing
    its CSV and HTML reports. After `grace_s` it is stopped (SIGTERM, then SIGKILL) as any child is."""
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
) -> LocustResult:
    """Run Locust to its end. `watch()` returning a reason (e.g. the server died) stops the run early and
    raises LoadTestError with it; so does passing `deadline_s`. Locust is stopped on every path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
    proc = spawn(cmd, log_path=log_path, env=locust_env(), cwd=log_path.parent)
    problem: str | None = None
    with locust_running(proc):
        started = time.monotonic()
        while proc.poll() is None:
            time.sleep(poll_s)
            if on_progress is not None:
                on_progress(_count_lines(records))
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


def check_complete(result: LocustResult, planned_steps: int) -> None:
    """Raise with the clearest reason when the run did not measure every planned step."""
    errors = [s.error for s in result.steps if s.error]
    if errors or result.exit_code == EXIT_ABORTED:
        reason = errors[0] if errors else error_line(_tail(result.log_path), empty="(empty log)")
        raise LoadTestError(f"load test aborted: {reason} (log: {result.log_path})")
    done = len(result.steps)
    if done < planned_steps:
        why = error_line(_tail(result.log_path), empty="(empty log)")
        raise LoadTestError(
            f"Locust exited ({result.exit_code}) after {done} of {planned_steps} steps: {why} (log: {result.log_path})"
        )


def _count_lines(path: Path) -> int:
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
