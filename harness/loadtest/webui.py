"""`llamasys serve`: a variant's llama-server plus the Locust web UI on 127.0.0.1, reached through an SSH tunnel."""

from __future__ import annotations

import getpass
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.plan import LoadPlan
from harness.config import LoadConfig
from harness.context import RunContext
from harness.errors import LoadTestError
from harness.loadtest.runner import (
    LOCUST_SHUTDOWN_S,
    load_arguments,
    locust_env,
    locust_running,
    stop_timeout,
)
from harness.loadtest.serverplan import start_server, warm_up
from harness.process import spawn
from harness.server import check_port_free
from locustfiles import USER_KINDS

log = logging.getLogger(__name__)


def web_ui_command(
    cfg: LoadConfig, plan: LoadPlan, host: str, *, web_host: str, web_port: int, embeddings: bool = False
) -> list[str]:
    """Locust's web UI offering the user classes the server it points at can serve (a server started for
    embeddings: the embeddings user; otherwise the completion and chat users), all ticked, and the step shape
    (Locust's class picker); the plan's settings are its editable custom arguments. With objectives, each step's
    pass or miss shows in its statistics as an "SLO" row (a miss as a failure)."""
    kinds = [k for k in USER_KINDS.values() if k.generates_tokens != embeddings]
    files = sorted({str(kind.path) for kind in kinds})
    return [
        sys.executable, "-m", "locust", "-f", ",".join(files),
        "--class-picker", "--host", host, "--web-host", web_host, "--web-port", str(web_port),
        "--stop-timeout", stop_timeout(cfg), "--loglevel", "INFO",
    ] + load_arguments(plan)  # fmt: skip


def ssh_tunnel_hint(web_port: int) -> str:
    return f"ssh -L {web_port}:127.0.0.1:{web_port} {getpass.getuser()}@{socket.getfqdn()}"


def serve_with_web_ui(
    ctx: RunContext,
    model: Path,
    *,
    port: int | None = None,
    web_port: int = 8089,
    variant: str | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """A variant's llama-server plus the Locust web UI on 127.0.0.1:`web_port`, until Ctrl-C (or `stop`).

    Prints the `ssh -L` line that reaches the UI from another machine. `on_ready(url)` is called once both are
    up. Both processes are stopped on every exit path.
    """
    name = variant or Path(model).stem
    out = ctx.run.load(ctx.experiment.targets[0].label, name) / "webui"
    out.mkdir(parents=True, exist_ok=True)
    web_host = "127.0.0.1"
    check_port_free(web_host, web_port)
    stop = stop or threading.Event()
    with start_server(ctx, Path(model), out / "server.log", port=port) as server:
        warm_up(server, ctx.experiment.load, ctx.experiment.load.api)
        plan = ctx.experiment.plan(records=str(out / "requests.jsonl"))
        cmd = web_ui_command(ctx.experiment.load, plan, server.url, web_host=web_host, web_port=web_port,
                             embeddings=server.embeddings)  # fmt: skip
        with open(out / "locust.log", "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
        proc = spawn(cmd, log_path=out / "locust.log", env=locust_env(), cwd=out)
        with locust_running(proc, grace_s=ctx.experiment.load.drain_grace_s + LOCUST_SHUTDOWN_S):
            url = f"http://{web_host}:{web_port}"
            _wait_web_ui(url, proc, out / "locust.log")
            echo(f"llama-server ({name}) at {server.url}; Locust web UI at {url}")
            echo(f"from your machine: {ssh_tunnel_hint(web_port)}   then open {url}")
            echo("pick a user class and StepShape (or Default for a fixed user count); Ctrl-C stops everything")
            if on_ready is not None:
                on_ready(url)
            try:
                while not stop.wait(0.5):
                    if proc.poll() is not None:
                        raise LoadTestError(f"the Locust web UI exited ({proc.returncode}); see {out / 'locust.log'}")
                    if (problem := server.problem()) is not None:
                        raise LoadTestError(f"{name}: {problem}")
            except KeyboardInterrupt:
                echo("stopping the web UI and llama-server")


def _wait_web_ui(url: str, proc: Any, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LoadTestError(f"the Locust web UI exited ({proc.returncode}) while starting; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        time.sleep(0.2)
    raise LoadTestError(f"the Locust web UI did not answer at {url} within {timeout_s:.0f} s; see {log_path}")
