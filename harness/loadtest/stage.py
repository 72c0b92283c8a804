"""The load stage: for each variant, llama-server sized for the largest step, the stepped Locust run (headless,
as a child process), server sampling, and the per-step summary; plus `serve_with_web_ui` for interactive use."""

from __future__ import annotations

import getpass
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.config import Experiment, LoadConfig
from harness.console import advance, progress_bar
from harness.context import RunContext, Stage
from harness.errors import LoadTestError
from harness.loadtest.runner import (
    check_complete,
    headless_command,
    load_arguments,
    locust_env,
    locust_running,
    run_headless,
    stop_timeout,
    user_for,
)
from harness.loadtest.sampling import ResourceSampler, server_alive
from harness.loadtest.summary import LoadSummary, summarize_step
from harness.process import spawn
from harness.records import is_fresh, read_record, write_record
from harness.server import LlamaServer, ServerSizing, check_port_free
from locustfiles import USER_KINDS
from locustfiles._options import DEFAULT_PROMPT_TEXT

SUMMARY_SCHEMA = 2  # bump when the records or the summary change meaning: finished runs are measured again


class LoadStage(Stage):
    """Every variant under the stepped Locust load on its own llama-server."""

    name = "load"

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.experiment.load.enabled

    def inputs(self, ctx: RunContext, variant: str | None = None) -> Any:
        if variant is None:
            raise LoadTestError("the load stage's inputs are per variant")
        model = ctx.models()[variant].path
        try:
            stat = model.stat()
        except FileNotFoundError:
            raise LoadTestError(f"model file not found: {model}") from None
        return {
            "schema": SUMMARY_SCHEMA,
            "model": str(model),
            "model_size": stat.st_size,
            "model_mtime_ns": stat.st_mtime_ns,
            "build": ctx.build.cache_key,
            "load": ctx.experiment.load.model_dump(mode="json"),
            "server": ctx.experiment.server.model_dump(mode="json"),
        }

    def run(self, ctx: RunContext) -> None:
        run_load_stage(ctx)


def run_load_stage(ctx: RunContext) -> dict[str, LoadSummary]:
    """Load-test every variant the models stage made, skipping those whose summary is fresh."""
    results: dict[str, LoadSummary] = {}
    stage = LoadStage()
    for variant, artifact in ctx.models().items():
        summary_path = ctx.run.load_summary(variant)
        digest = stage.digest(ctx, variant)
        if is_fresh(summary_path, digest):
            results[variant] = read_record(summary_path, LoadSummary)
            continue
        write_record(summary_path, run_variant(ctx, variant, artifact.path), digest=digest)
        results[variant] = read_record(summary_path, LoadSummary)
    return results


def sizing_for(exp: Experiment) -> ServerSizing:
    """One slot per user of the largest step, each holding a whole request."""
    return ServerSizing(
        parallel=max(exp.load.steps),
        prompt_tokens=exp.load.prompt_tokens,
        output_tokens=exp.load.output_tokens,
        margin_tokens=exp.server.margin_tokens,
    )


def start_server(ctx: RunContext, model: Path, log_path: Path, *, port: int | None = None) -> LlamaServer:
    """llama-server for `model` as the experiment's [server] section says (`port` overrides server.port)."""
    settings = ctx.experiment.server
    if port is not None:
        settings = settings.model_copy(update={"port": port})
    return LlamaServer(ctx.build, model, sizing_for(ctx.experiment), log_path=log_path, settings=settings)


def warm_up(server: LlamaServer, cfg: LoadConfig) -> None:
    """The unmeasured warm-up request, cut from the same text as the load's prompts."""
    text = (cfg.prompt_text or DEFAULT_PROMPT_TEXT).read_text(encoding="utf-8")
    server.warm_up(text, prompt_tokens=cfg.prompt_tokens, output_tokens=cfg.output_tokens)


def run_variant(ctx: RunContext, variant: str, model: Path) -> LoadSummary:
    """One variant: server up, steps run headless, everything stopped, records summarised."""
    exp, build = ctx.experiment, ctx.build
    cfg = exp.load
    out = ctx.run.load(variant)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("requests.jsonl", "resources.jsonl"):  # a re-run measures afresh, it does not append
        (out / stale).unlink(missing_ok=True)
    records = out / "requests.jsonl"
    bar = progress_bar(_expected_requests(cfg), f"load {variant}", "req")
    try:
        with start_server(ctx, model, out / "server.log") as server:
            warm_up(server, cfg)
            cmd = headless_command(cfg, server.url, out)
            with ResourceSampler(
                server.pid, server.url + "/metrics", out / "resources.jsonl", interval_s=cfg.sample_interval_s
            ) as sampler:
                result = run_headless(
                    cmd,
                    records=records,
                    log_path=out / "locust.log",
                    deadline_s=_deadline_s(cfg),
                    watch=lambda: _server_problem(server, variant),
                    on_progress=lambda n: advance(bar, n),
                )
            samples = sampler.samples
            props = server.props
    finally:
        bar.close()
    check_complete(result, len(cfg.steps))
    steps = [summarize_step(step, result.requests, samples) for step in result.steps]
    empty = [s for s in steps if s.requests - s.failures == 0]
    if empty:
        reasons = next(iter(empty[0].failure_reasons), "no request finished inside the step")
        raise LoadTestError(
            f"{variant}: step with {empty[0].users} users measured no successful request: {reasons} "
            f"(records: {records})"
        )
    _, user = user_for(cfg.api)
    route = next((r.route for r in result.requests), "")
    sizing = sizing_for(exp)
    return LoadSummary(
        variant=variant,
        api=cfg.api,
        route=route,
        prompt_tokens=cfg.prompt_tokens,
        output_tokens=cfg.output_tokens,
        steps=steps,
        requests=len(result.requests),
        failures=sum(not r.ok for r in result.requests),
        server={
            "model": str(model),
            "build": f"b{build.build_number} ({build.commit})",
            "backend": build.backend,
            "parallel": sizing.parallel,
            "ctx_size": sizing.ctx_size,
            "slot_ctx": (props.get("default_generation_settings") or {}).get("n_ctx"),
            "threads": exp.server.threads,
        },
        locust={"user": user, "processes": cfg.processes, "exit_code": result.exit_code},
        files={
            "requests": "requests.jsonl",
            "resources": "resources.jsonl",
            "server_log": "server.log",
            "locust_log": "locust.log",
            "locust_csv": "locust_stats.csv",
            "locust_html": "locust.html",
        },
    )


def _server_problem(server: LlamaServer, variant: str) -> str | None:
    if server_alive(server.pid):
        return None
    return f"llama-server for {variant} died during the load test (log: {server.log_path})"


def _expected_requests(cfg: LoadConfig) -> int | None:
    return sum(cfg.steps) * cfg.requests_per_user if cfg.requests_per_user else None


def _deadline_s(cfg: LoadConfig) -> float:
    """A bound on the whole run: every step's readiness, its measurement, and one request timeout to drain."""
    per_step = cfg.ready_timeout_s + cfg.request_timeout_s
    if cfg.requests_per_user is not None:
        # A closed-loop user's requests run one after another; the slowest user bounds the step.
        per_step += cfg.requests_per_user * cfg.request_timeout_s
    else:
        per_step += cfg.step_duration_s or 0.0
    return len(cfg.steps) * per_step + 120.0


# ------------------------------------------------------------------------------------------------ web UI


def web_ui_command(cfg: LoadConfig, host: str, out: Path, *, web_host: str, web_port: int) -> list[str]:
    """Locust's web UI with every user class and the step shape selectable (Locust's class picker)."""
    files = sorted({str(kind.path) for kind in USER_KINDS.values()})
    return [
        sys.executable, "-m", "locust", "-f", ",".join(files),
        "--class-picker", "--host", host, "--web-host", web_host, "--web-port", str(web_port),
        "--stop-timeout", stop_timeout(cfg), "--loglevel", "INFO",
    ] + load_arguments(cfg, out / "requests.jsonl")  # fmt: skip


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
    out = ctx.run.load(name) / "webui"
    out.mkdir(parents=True, exist_ok=True)
    web_host = "127.0.0.1"
    check_port_free(web_host, web_port)
    stop = stop or threading.Event()
    with start_server(ctx, Path(model), out / "server.log", port=port) as server:
        warm_up(server, ctx.experiment.load)
        cmd = web_ui_command(ctx.experiment.load, server.url, out, web_host=web_host, web_port=web_port)
        with open(out / "locust.log", "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
        proc = spawn(cmd, log_path=out / "locust.log", env=locust_env(), cwd=out)
        with locust_running(proc):
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
                    if not server_alive(server.pid):
                        raise LoadTestError(f"llama-server for {name} died; see {server.log_path}")
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
