"""What is settled before a variant's load: the server (sized for the load's concurrency) and its warm-up, the highest
level a step may have (memory may lower it), the decode figures (bandwidth bound, llama-bench), and how long the
whole load may take.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from bench.apis import generates_tokens
from bench.plan import DEFAULT_PROMPT_TEXT, LoadPlan
from harness.bandwidth import decode_cost, kv_memory_bound, llama_bench_generation, memory_bandwidth
from harness.config import LoadConfig, TargetConfig
from harness.context import RunContext
from harness.errors import HarnessError
from harness.loadtest.summary import Decode
from harness.models.convert import gguf_info
from harness.server import Endpoint, LlamaServer

log = logging.getLogger(__name__)


def start_server(ctx: RunContext, model: Path, log_path: Path, *, port: int | None = None) -> LlamaServer:
    """llama-server for `model` as the experiment's [server] section says (`port` overrides server.port)."""
    settings = ctx.experiment.server
    if port is not None:
        settings = settings.model_copy(update={"port": port})
    return LlamaServer(
        ctx.build, model, ctx.experiment.sizing(), log_path=log_path, settings=settings,
        embeddings=not generates_tokens(ctx.experiment.load.api),
    )  # fmt: skip


def warm_up(endpoint: Endpoint, cfg: LoadConfig, api: str, model_name: str | None = None) -> None:
    """The unmeasured warm-up request, cut from the same text as the load's prompts."""
    text = (cfg.prompt_text or DEFAULT_PROMPT_TEXT).read_text(encoding="utf-8")
    endpoint.warm_up(api, text, prompt_tokens=cfg.prompt_tokens, output_tokens=cfg.output_tokens, model=model_name)


@dataclass(frozen=True)
class ServerPlan:
    """What is known before a variant's load: the highest level a step may have (and what limits it), and what its
    decoding reads from memory."""

    bound: float
    bound_reason: str  # "steps" (no search), "max_users", or "memory" (the KV cache the server's memory holds)
    decode: Decode | None = None


def plan_variant(ctx: RunContext, target: TargetConfig, variant: str, model: Path | None) -> ServerPlan:
    """The bound and the decode figures of `model` on `target`: its tensor table, this machine's memory bandwidth,
    llama-bench's single-stream rate (llama-server targets), and the KV cache that fits in free memory."""
    exp = ctx.experiment
    cfg = exp.load
    bound, reason = cfg.bound, "max_users" if cfg.search else "steps"
    if model is None or not target.target.managed:
        return ServerPlan(bound, reason)
    out = ctx.run.load(target.label, variant)
    # The bandwidth figures are context for the measurement, not part of it: when the GGUF does not give its
    # shapes or llama-bench cannot run, the load goes on without them (the server then says what is wrong).
    try:
        cost = decode_cost(gguf_info(model, ctx.build, log=out / "gguf-info.log"))
    except HarnessError as exc:
        log.warning("load: %s: no bandwidth figures: %s", variant, exc)
        return ServerPlan(bound, reason)
    threads = exp.server.threads or os.cpu_count() or 1
    bandwidth = memory_bandwidth(ctx.cache, threads=threads, gpu=ctx.build.has_gpu)
    generation = None
    if target.target.runs_llama_bench:
        compute = ctx.compute(exp.server.threads)
        try:
            generation = llama_bench_generation(ctx.tools, model, compute=compute, log_path=out / "llama-bench.log")
        except HarnessError as exc:
            log.warning("load: %s: no llama-bench reference: %s", variant, exc)
        if cfg.search and target.target.sized_by_slots and not exp.plan().open_loop:  # users are the slots
            per_slot = exp.sizing(1).per_slot
            fits, where = kv_memory_bound(
                cost, per_slot_tokens=per_slot, model_bytes=model.stat().st_size, gpu=ctx.build.has_gpu
            )
            if fits < bound:
                bound, reason = max(fits, max(cfg.steps)), f"memory ({where} holds {fits} slots)"
    return ServerPlan(bound, reason, Decode(cost=cost, bandwidth=bandwidth, llama_bench_tg_tps=generation))


def expected_requests(plan: LoadPlan) -> int | None:
    """The requests the configured levels still to run will make (for the progress bar), when that is known."""
    measured = {level for level, _ in plan.done}
    todo = [level for level in plan.steps if level not in measured]
    if plan.step_duration_s is not None:
        return None
    if plan.open_loop:
        return len(todo) * (plan.requests_per_step or 0)
    return int(sum(todo)) * (plan.requests_per_user or 0)


def deadline_s(plan: LoadPlan) -> float:
    """A bound on the whole run: every level's readiness, its measurement, and one request timeout to drain; the
    search adds at most two probes per doubling of the level (or of its resolution, for rates)."""
    per_step = plan.ready_timeout_s + plan.request_timeout_s
    if plan.step_duration_s is not None:
        per_step += plan.step_duration_s
    elif plan.open_loop:
        # Its arrivals take count / rate seconds (the lowest level is the slowest), each may wait and run.
        per_step += (plan.requests_per_step or 0) / min(plan.steps) * 2 + plan.request_timeout_s
    else:
        # A closed-loop user's requests run one after another; the slowest user bounds the step.
        per_step += (plan.requests_per_user or 0) * plan.request_timeout_s
    doublings = math.ceil(math.log2(max(plan.bound / plan.search_resolution, 2))) + 1
    probes = 2 * doublings if plan.search else 0
    return (len(plan.steps) + probes) * per_step + 120.0
