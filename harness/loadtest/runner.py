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

from bench.plan import LoadPlan, format_done
from bench.slo import format_objectives
from harness.config import LoadConfig
from harness.errors import LoadTestError
from harness.process import spawn, stop
from harness.tools import error_line
from locustfiles import EXIT_ABORTED, LOCUSTFILES, USER_KINDS, RequestRecord, StepRecord, read_records

PROJECT_ROOT = LOCUSTFILES.parent


def user_for(api: str) -> tuple[Path, str]:
    """The locustfile and user class of `load.api`."""
    if api not in USER_KINDS:
        raise LoadTestError(USER_KINDS.unknown(api))
    kind = USER_KINDS[api]
    return kind.path, kind.user_class


def stop_timeout(cfg: LoadConfig) -> str:
    """Locust's --stop-timeout (whole seconds): how long in-flight requests may finish when the test is stopped
    (Ctrl-C, the web UI's stop) before they are aborted and recorded as interrupted. Steps never need it: they
    drain on their own before the users change."""
    return f"{math.ceil(cfg.drain_grace_s)}s"


def load_arguments(plan: LoadPlan) -> list[str]:
    """The plan as our locustfiles' custom arguments (the web UI shows them, editable, and builds the same plan
    from them); the inverse of LoadPlan.from_options."""
    arrival = plan.arrival
    args = [
        "--prompt-tokens", str(plan.prompt_tokens),
        "--output-tokens", str(plan.output_tokens),
        "--arrival", arrival.kind,
        "--steps", ",".join(f"{s:g}" for s in plan.steps),
        "--request-timeout", str(plan.request_timeout_s),
        "--ready-timeout", str(plan.ready_timeout_s),
        "--records", plan.records,
        "--prompt-text", str(plan.prompt_text),
    ]  # fmt: skip
    for option in ("max_in_flight", "burstiness"):  # the arrival options the CLI has (bench.plan.add_arguments)
        if option in type(arrival).model_fields:
            args += [f"--{option.replace('_', '-')}", f"{getattr(arrival, option):g}"]
    if plan.step_duration_s is not None:
        args += ["--step-duration", str(plan.step_duration_s)]
    elif plan.open_loop:
        args += ["--requests-per-step", str(plan.requests_per_step)]
    else:
        args += ["--requests-per-user", str(plan.requests_per_user)]
    if plan.model_name:
        args += ["--model-name", plan.model_name]
    if plan.objectives:
        args += ["--slo", format_objectives(plan.objectives)]
    if plan.search:
        args += ["--search", "--max-users", f"{plan.bound:g}", "--search-resolution", f"{plan.search_resolution:g}"]
    if plan.min_requests:
        args += ["--min-requests", str(plan.min_requests)]
    if plan.max_requests:
        args += ["--max-requests", str(plan.max_requests)]
    if plan.run_id:
        args += ["--run-id", plan.run_id]
    if plan.done:
        args += ["--done-steps", format_done(plan.done)]
    return args


def headless_command(
    cfg: LoadConfig, plan: LoadPlan, host: str, out_dir: Path, *, processes: int | None = None, api: str | None = None
) -> list[str]:
    """`locust --headless` for one variant: the plan written to out_dir/plan.json and handed over whole (`--plan`),
    records, CSVs and HTML into `out_dir`. `api` overrides cfg.api (a target's own route)."""
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
    return cmd + ["--plan", str(plan.write(out_dir / "plan.json"))]


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
