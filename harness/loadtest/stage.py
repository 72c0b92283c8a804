"""The load stage: for each target and variant, its server (sized for the largest step) or the running endpoint, one
warm-up request, the stepped Locust run (headless, as a child process), server sampling, and the per-step summary;
plus `serve_with_web_ui` for interactive use."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.bandwidth import decode_cost, kv_memory_bound, llama_bench_generation, memory_bandwidth
from harness.config import LoadConfig, TargetConfig
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
from harness.loadtest.sampling import ResourceSampler
from harness.loadtest.summary import Decode, LoadSummary, capacity, summarize_step
from harness.models.convert import gguf_info
from harness.process import spawn
from harness.records import is_fresh, read_record, write_record
from harness.server import Endpoint, LlamaServer, check_port_free
from harness.targets import open_endpoint, sizing_for
from locustfiles import USER_KINDS
from locustfiles._options import DEFAULT_PROMPT_TEXT
from locustfiles._slo import Objective

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = 4  # bump when the records or the summary change meaning: finished runs are measured again
EXTERNAL_MODEL = "endpoint"  # the label of an external endpoint's model when the target names none


class LoadStage(Stage):
    """Every variant under the stepped Locust load on every target (llama-server, llama-cpp-python, an endpoint)."""

    name = "load"

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.experiment.load.enabled

    def inputs(self, ctx: RunContext, item: str | None = None) -> Any:
        """`item` is "<target>/<variant>": one target's measurement of one variant (or of an external endpoint)."""
        if item is None or "/" not in item:
            raise LoadTestError("the load stage's inputs are per target and variant")
        label, variant = item.split("/", 1)
        target = _target(ctx, label)
        inputs: dict[str, Any] = {
            "schema": SUMMARY_SCHEMA,
            "target": target.model_dump(mode="json"),
            "api": target.route_api(ctx.experiment.load.api),
            "load": ctx.experiment.load.model_dump(mode="json"),
            # The objectives judge the steps, end them early and steer the search: they decide what is measured.
            "slo": ctx.experiment.slo.model_dump(mode="json"),
        }
        if target.kind == "external":
            return inputs
        model = ctx.models()[variant].path
        try:
            stat = model.stat()
        except FileNotFoundError:
            raise LoadTestError(f"model file not found: {model}") from None
        return {
            **inputs,
            "model": str(model),
            "model_size": stat.st_size,
            "model_mtime_ns": stat.st_mtime_ns,
            "build": ctx.build.cache_key,
            "server": ctx.experiment.server.model_dump(mode="json"),
        }

    def run(self, ctx: RunContext) -> None:
        run_load_stage(ctx)


def _target(ctx: RunContext, label: str) -> TargetConfig:
    for target in ctx.experiment.targets:
        if target.label == label:
            return target
    raise LoadTestError(f"no target named {label!r}; targets: {', '.join(t.label for t in ctx.experiment.targets)}")


def units(ctx: RunContext, target: TargetConfig) -> dict[str, Path | None]:
    """What `target` measures: every variant (name -> GGUF), or an external endpoint's one model."""
    if target.kind == "external":
        return {target.model_name or EXTERNAL_MODEL: None}
    return {name: artifact.path for name, artifact in ctx.models().items()}


def run_load_stage(ctx: RunContext) -> dict[tuple[str, str], LoadSummary]:
    """Load-test every variant on every target, skipping what is fresh; returns the summaries by (target, variant).

    llama-server and llama-cpp-python get a fresh server per variant (or one llama-cpp-python server holding every
    variant, with multi_model); an external endpoint is measured once, as it is.
    """
    results: dict[tuple[str, str], LoadSummary] = {}
    stage = LoadStage()
    for target in ctx.experiment.targets:
        todo = {}
        for variant, model in units(ctx, target).items():
            path, digest = ctx.run.load_summary(target.label, variant), stage.digest(ctx, f"{target.label}/{variant}")
            if is_fresh(path, digest):
                results[(target.label, variant)] = read_record(path, LoadSummary)
            else:
                todo[variant] = (model, path, digest)
        if not todo:
            continue
        if target.multi_model:
            models = {variant: model for variant, (model, _, _) in todo.items() if model is not None}
            log_path = ctx.run.load_target(target.label) / "server.log"
            plans = {variant: plan_variant(ctx, target, variant, model) for variant, model in models.items()}
            with open_endpoint(ctx, target, models, log_path=log_path) as endpoint:
                for variant, (_, path, digest) in todo.items():
                    write_record(path, measure(ctx, target, endpoint, variant, plans.get(variant)), digest=digest)
                    results[(target.label, variant)] = read_record(path, LoadSummary)
            continue
        for variant, (model, path, digest) in todo.items():
            write_record(path, run_variant(ctx, variant, model, target=target), digest=digest)
            results[(target.label, variant)] = read_record(path, LoadSummary)
    return results


def start_server(ctx: RunContext, model: Path, log_path: Path, *, port: int | None = None) -> LlamaServer:
    """llama-server for `model` as the experiment's [server] section says (`port` overrides server.port)."""
    settings = ctx.experiment.server
    if port is not None:
        settings = settings.model_copy(update={"port": port})
    return LlamaServer(
        ctx.build, model, sizing_for(ctx.experiment), log_path=log_path, settings=settings,
        embeddings=ctx.experiment.load.api == "embeddings",
    )  # fmt: skip


def warm_up(endpoint: Endpoint, cfg: LoadConfig, api: str, model_name: str | None = None) -> None:
    """The unmeasured warm-up request, cut from the same text as the load's prompts."""
    text = (cfg.prompt_text or DEFAULT_PROMPT_TEXT).read_text(encoding="utf-8")
    endpoint.warm_up(api, text, prompt_tokens=cfg.prompt_tokens, output_tokens=cfg.output_tokens, model=model_name)


@dataclass(frozen=True)
class LoadPlan:
    """What is known before a variant's load: how many users a step may have (and what limits it), and what its
    decoding reads from memory."""

    bound: int
    bound_reason: str  # "steps" (no search), "max_users", or "memory" (the KV cache the server's memory holds)
    decode: Decode | None = None


def plan_variant(ctx: RunContext, target: TargetConfig, variant: str, model: Path | None) -> LoadPlan:
    """The bound and the decode figures of `model` on `target`: its tensor table, this machine's memory bandwidth,
    llama-bench's single-stream rate (llama-server targets), and the KV cache that fits in free memory."""
    exp = ctx.experiment
    cfg = exp.load
    bound, reason = cfg.bound, "max_users" if cfg.search else "steps"
    if model is None or target.kind == "external":
        return LoadPlan(bound, reason)
    out = ctx.run.load(target.label, variant)
    cost = decode_cost(gguf_info(model, ctx.build, log=out / "gguf-info.log"))
    threads = exp.server.threads or os.cpu_count() or 1
    bandwidth = memory_bandwidth(ctx.cache, threads=threads, gpu=ctx.build.has_gpu)
    generation = None
    if target.kind == "llama-server":
        compute = ctx.compute(exp.server.threads)
        generation = llama_bench_generation(ctx.tools, model, compute=compute, log_path=out / "llama-bench.log")
        if cfg.search:
            per_slot = sizing_for(exp, 1).per_slot
            fits, where = kv_memory_bound(
                cost, per_slot_tokens=per_slot, model_bytes=model.stat().st_size, gpu=ctx.build.has_gpu
            )
            if fits < bound:
                bound, reason = max(fits, max(cfg.steps)), f"memory ({where} holds {fits} slots)"
    return LoadPlan(bound, reason, Decode(cost=cost, bandwidth=bandwidth, llama_bench_tg_tps=generation))


def run_variant(
    ctx: RunContext, variant: str, model: Path | None, *, target: TargetConfig | None = None
) -> LoadSummary:
    """One variant on one target (default: the experiment's first): its server up (or the endpoint reached), the
    steps run headless, everything stopped, the records summarised."""
    target = target or ctx.experiment.targets[0]
    plan = plan_variant(ctx, target, variant, model)
    models = {variant: model} if model is not None else {}
    out = ctx.run.load(target.label, variant)
    with open_endpoint(ctx, target, models, log_path=out / "server.log", parallel=plan.bound) as endpoint:
        return measure(ctx, target, endpoint, variant, plan)


def measure(
    ctx: RunContext, target: TargetConfig, endpoint: Endpoint, variant: str, plan: LoadPlan | None = None
) -> LoadSummary:
    """The stepped load on a running endpoint: warm-up, Locust headless, server sampling, the per-step summary."""
    cfg = ctx.experiment.load
    plan = plan or LoadPlan(cfg.bound, "max_users" if cfg.search else "steps")
    objectives = ctx.experiment.slo.objectives()
    api = target.route_api(cfg.api)
    # The users name the model when the server needs it: the target's name, a multi-model alias, else none.
    model_name = target.model_name or (variant if target.multi_model else None)
    out = ctx.run.load(target.label, variant)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("requests.jsonl", "resources.jsonl"):  # a re-run measures afresh, it does not append
        (out / stale).unlink(missing_ok=True)
    records = out / "requests.jsonl"
    log.info("load: %s on %s (%s), steps %s%s", variant, target.label, api, cfg.steps,
             f", searching up to {plan.bound} users" if cfg.search else "")  # fmt: skip
    warm_up(endpoint, cfg, api, model_name)
    cmd = headless_command(
        cfg, endpoint.url, out, api=api, model_name=model_name, objectives=objectives, max_users=plan.bound
    )
    bar = progress_bar(_expected_requests(cfg), f"load {target.label} {variant}", "req")
    try:
        with contextlib.ExitStack() as stack:
            sampler = None
            if endpoint.pid is not None:
                metrics = endpoint.url + "/metrics" if endpoint.kind == "llama-server" else None
                sampler = stack.enter_context(
                    ResourceSampler(endpoint.pid, metrics, out / "resources.jsonl", interval_s=cfg.sample_interval_s)
                )
            result = run_headless(
                cmd,
                records=records,
                log_path=out / "locust.log",
                deadline_s=_deadline_s(cfg),
                watch=lambda: f"{variant}: {problem}" if (problem := endpoint.problem()) else None,
                on_progress=lambda n: advance(bar, n),
            )
        samples = sampler.samples if sampler else []
    finally:
        bar.close()
    check_complete(result, len(cfg.steps))
    context = cfg.prompt_tokens + (0 if api == "embeddings" else cfg.output_tokens / 2)  # mean context in decode
    steps = [
        summarize_step(
            step, result.requests, samples, objectives=objectives, decode=plan.decode, context_tokens=context
        )
        for step in result.steps
    ]
    empty = [s for s in steps if s.requests - s.failures == 0]
    if empty:
        reasons = next(iter(empty[0].failure_reasons), "no request finished inside the step")
        raise LoadTestError(
            f"{target.label} {variant}: step with {empty[0].users} users measured no successful request: {reasons} "
            f"(records: {records})"
        )
    _, user = user_for(api)
    route = next((r.route for r in result.requests), "")
    found = capacity(steps, bound=plan.bound, searched=cfg.search, bound_reason=plan.bound_reason)
    if found is not None:
        log.info("load: %s on %s: capacity %d users within %s (first miss: %s)", variant, target.label, found.low,
                 ", ".join(o.describe() for o in objectives), found.high)  # fmt: skip
    return LoadSummary(
        variant=variant,
        target=target.label,
        target_kind=target.kind,
        serializes=endpoint.serializes,
        model_name=model_name,
        api=api,
        route=route,
        prompt_tokens=cfg.prompt_tokens,
        output_tokens=0 if api == "embeddings" else cfg.output_tokens,
        steps=steps,
        requests=len(result.requests),
        failures=sum(not r.ok for r in result.requests),
        objectives=[o.describe() for o in objectives],
        capacity=found,
        decode=plan.decode,
        server=endpoint.describe(),
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


def web_ui_command(
    cfg: LoadConfig,
    host: str,
    out: Path,
    *,
    web_host: str,
    web_port: int,
    objectives: Sequence[Objective] = (),
) -> list[str]:
    """Locust's web UI with every user class and the step shape selectable (Locust's class picker); with
    objectives, each step's pass or miss shows in its statistics as an "SLO" row (a miss as a failure)."""
    files = sorted({str(kind.path) for kind in USER_KINDS.values()})
    return [
        sys.executable, "-m", "locust", "-f", ",".join(files),
        "--class-picker", "--host", host, "--web-host", web_host, "--web-port", str(web_port),
        "--stop-timeout", stop_timeout(cfg), "--loglevel", "INFO",
    ] + load_arguments(cfg, out / "requests.jsonl", objectives=objectives)  # fmt: skip


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
        cmd = web_ui_command(
            ctx.experiment.load, server.url, out, web_host=web_host, web_port=web_port,
            objectives=ctx.experiment.slo.objectives(),
        )  # fmt: skip
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
