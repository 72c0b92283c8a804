"""The load stage: for each target and variant, its server (sized for the largest step) or the running endpoint, one
warm-up request, the stepped Locust run (headless, as a child process), server sampling, and the per-step summary;
plus `serve_with_web_ui` for interactive use."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.bandwidth import decode_cost, kv_memory_bound, llama_bench_generation, memory_bandwidth
from harness.cache import content_sha256
from harness.config import LoadConfig, TargetConfig
from harness.console import advance, progress_bar
from harness.context import RunContext, Stage
from harness.errors import HarnessError, LoadTestError
from harness.loadtest.runner import (
    LOCUST_SHUTDOWN_S,
    check_complete,
    count_requests,
    headless_command,
    load_arguments,
    locust_env,
    locust_running,
    run_headless,
    stop_timeout,
    user_for,
)
from harness.loadtest.sampling import ResourceSampler
from harness.loadtest.summary import Attempt, Attempts, Decode, LoadSummary, capacity, summarize_step
from harness.models.convert import gguf_info
from harness.process import exit_reason, spawn
from harness.records import RecordError, inputs_digest, is_fresh, read_record, write_record
from harness.server import Endpoint, LlamaServer, check_port_free
from harness.targets import open_endpoint, sizing_for
from locustfiles import USER_KINDS, RequestRecord, StepRecord, read_records
from locustfiles._options import DEFAULT_PROMPT_TEXT
from locustfiles._slo import Objective
from locustfiles._steps import StepPlan, steps_pending

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = 5  # bump when the records or the summary change meaning: finished runs are measured again
EXTERNAL_MODEL = "endpoint"
# Load settings that do not change how one step is measured: which steps run, the search, how stopping works.
STEP_INDEPENDENT = ("steps", "search", "max_users", "search_resolution", "drain_grace_s", "server_restarts")


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
        return load_inputs(ctx, target, None if target.kind == "external" else ctx.models()[variant].path)

    def run(self, ctx: RunContext) -> None:
        run_load_stage(ctx)


def load_inputs(ctx: RunContext, target: TargetConfig, model: Path | None) -> dict[str, Any]:
    """Everything that determines one target's summary of one variant (`model`; None for an external endpoint)."""
    inputs: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "target": target.model_dump(mode="json"),
        "api": target.route_api(ctx.experiment.load.api),
        "load": ctx.experiment.load.model_dump(mode="json"),
        # The objectives judge the steps, end them early and steer the search: they decide what is measured.
        "slo": ctx.experiment.slo.model_dump(mode="json"),
    }
    if model is None:
        return inputs
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


def step_inputs(ctx: RunContext, target: TargetConfig, model: Path | None) -> dict[str, Any]:
    """What determines one step's measurement: `load_inputs` without the list of steps and the search (a run with
    more steps keeps the ones measured) or how stopping works, and with the model's content instead of its file's
    name and date."""
    inputs = load_inputs(ctx, target, model)
    inputs["load"] = {k: v for k, v in inputs["load"].items() if k not in STEP_INDEPENDENT}
    for key in ("model", "model_size", "model_mtime_ns"):
        inputs.pop(key, None)
    if model is not None:
        inputs["model_sha256"] = content_sha256(model)
    return inputs


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
    variant, with multi_model); an external endpoint is measured once, as it is. A variant that fails (its server
    cannot start, or dies more often than load.server_restarts allows) is reported and the others still run; the
    stage fails at the end, naming them. Whatever stops a variant, the steps it finished are kept (a partial
    summary the report shows) and a later run measures only the rest.
    """
    results: dict[tuple[str, str], LoadSummary] = {}
    failures: list[str] = []
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
        shared = None
        if target.multi_model:
            models = {variant: model for variant, (model, _, _) in todo.items() if model is not None}
            shared = Endpoints(lambda models=models, target=target: open_endpoint(
                ctx, target, models, log_path=ctx.run.load_target(target.label) / "server.log"
            ))  # fmt: skip
        with shared or contextlib.nullcontext():
            for variant, (model, path, digest) in todo.items():
                load = None
                try:
                    load = VariantLoad(ctx, target, variant, model)
                    summary = load.measure(shared)
                except (KeyboardInterrupt, SystemExit) as stop:
                    if load is not None:
                        why = "interrupted (Ctrl-C)" if isinstance(stop, KeyboardInterrupt) else "stopped by a signal"
                        load.save_partial(path, why)
                    raise
                except HarnessError as exc:
                    if load is not None:
                        load.save_partial(path, str(exc))
                    log.error("load: %s on %s failed: %s", variant, target.label, exc)
                    failures.append(f"{variant} on {target.label}: {exc}")
                    continue
                write_record(path, summary, digest=digest)
                results[(target.label, variant)] = read_record(path, LoadSummary)
    if failures:
        more = f" (and {len(failures) - 1} more; see llamasys.log)" if len(failures) > 1 else ""
        raise LoadTestError(f"load failed for {failures[0]}{more}", partial=True)
    return results


class Endpoints:
    """The endpoint a variant's attempts use: opened (started) when first needed, stopped on every exit path, and
    replaced by a fresh one after it died (`discard`)."""

    def __init__(self, opener: Callable[[], Endpoint]) -> None:
        self._opener = opener
        self._stack = contextlib.ExitStack()
        self.current: Endpoint | None = None

    def __enter__(self) -> Endpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def get(self) -> Endpoint:
        if self.current is None:
            endpoint = self._opener()
            self.current = self._stack.enter_context(endpoint)
        return self.current

    def discard(self) -> None:
        self.current = None
        self._stack.close()
        self._stack = contextlib.ExitStack()


class VariantLoad:
    """One variant's load on one target across attempts (load/<target>/<variant>/attempts.json).

    Every attempt is one Locust run on one server process; its records carry its run id. A step an attempt
    finished whole (its step record written, every measured request recorded) is kept while the step digest (what
    determines a step's measurement, LoadStage.step_inputs) is unchanged, so a resumed or extended run, and a run
    whose server died, measure only the steps still missing, each on a fresh server after a warm-up.
    """

    def __init__(self, ctx: RunContext, target: TargetConfig, variant: str, model: Path | None) -> None:
        self.ctx, self.target, self.variant, self.model = ctx, target, variant, model
        self.digest = inputs_digest(step_inputs(ctx, target, model))
        self.cfg = ctx.experiment.load
        self.api = target.route_api(self.cfg.api)
        # The users name the model when the server needs it: the target's name, a multi-model alias, else none.
        self.model_name = target.model_name or (variant if target.multi_model else None)
        self.out = ctx.run.load(target.label, variant)
        self.records = self.out / "requests.jsonl"
        self.attempts_path = self.out / "attempts.json"
        self.plan: LoadPlan | None = None
        self.attempts = self._history()

    # ---------------------------------------------------------------- what earlier attempts left

    def _history(self) -> list[Attempt]:
        try:
            attempts = read_record(self.attempts_path, Attempts).attempts
        except (FileNotFoundError, RecordError):
            attempts = []
        if any(a.steps_digest != self.digest for a in attempts) or (not attempts and self.records.exists()):
            # Measured for other settings (or by a version that kept no attempts): nothing of it counts any more.
            log.info("load: %s on %s: settings changed since the last run; measuring every step afresh",
                     self.variant, self.target.label)  # fmt: skip
            for stale in ("requests.jsonl", "resources.jsonl", "attempts.json"):
                (self.out / stale).unlink(missing_ok=True)
            return []
        for attempt in attempts:
            if attempt.outcome == "running":  # the harness itself was killed during it
                attempt.outcome, attempt.error = "interrupted", "the harness stopped during this attempt"
        return attempts

    def kept(self) -> tuple[list[tuple[StepRecord, Attempt]], list[RequestRecord]]:
        """The steps finished whole by attempts with this digest (a later measurement of the same users replaces
        an earlier one), in the order they ran, and every request record."""
        if not self.records.exists():
            return [], []
        requests, steps = read_records(self.records)
        measured = Counter((r.run, r.epoch) for r in requests if r.measured)
        failed = Counter((r.run, r.epoch) for r in requests if r.measured and not r.ok)
        by_run = {a.run_id: a for a in self.attempts}
        kept: dict[int, tuple[StepRecord, Attempt]] = {}
        for step in steps:
            attempt, key = by_run.get(step.run), (step.run, step.epoch)
            if attempt is None or step.error or measured[key] != step.measured_requests:
                continue
            if failed[key] == measured[key]:
                continue  # nothing succeeded: a step to measure again once the cause is fixed, not a result
            if attempt.outcome == "server died" and failed[key]:
                continue  # it saw the crash: measured again on the next server
            kept.pop(step.users, None)
            kept[step.users] = (step, attempt)
        return list(kept.values()), requests

    def done_steps(self) -> tuple[tuple[int, bool | None], ...]:
        return tuple((step.users, step.slo_passed) for step, _ in self.kept()[0])

    def pending(self) -> bool:
        return steps_pending(self.step_plan(self.done_steps()))

    def step_plan(self, done: tuple[tuple[int, bool | None], ...]) -> StepPlan:
        plan = self.plan or LoadPlan(self.cfg.bound, "max_users" if self.cfg.search else "steps")
        return StepPlan(
            users=tuple(self.cfg.steps), requests_per_user=self.cfg.requests_per_user,
            duration_s=self.cfg.step_duration_s, objectives=tuple(self.ctx.experiment.slo.objectives()),
            search=self.cfg.search, max_users=plan.bound if self.cfg.search else None,
            search_resolution=self.cfg.search_resolution, min_requests=self.cfg.min_requests,
            max_requests=self.cfg.max_requests, done=done,
        )  # fmt: skip

    # ---------------------------------------------------------------- measuring

    def measure(self, shared: Endpoints | None = None) -> LoadSummary:
        """Measure every step still missing; a server that dies is started again (load.server_restarts times)."""
        self.plan = plan_variant(self.ctx, self.target, self.variant, self.model)
        restarts = self.cfg.server_restarts
        log.info("load: %s on %s (%s), steps %s%s", self.variant, self.target.label, self.api, self.cfg.steps,
                 f", searching up to {self.plan.bound} users" if self.cfg.search else "")  # fmt: skip
        with contextlib.ExitStack() as stack:
            endpoints = shared or stack.enter_context(Endpoints(self._open))
            while self.pending():
                done = self.done_steps()
                if done:
                    users = ", ".join(str(u) for u, _ in done)
                    log.info("load: %s on %s: keeping the measured steps (%s users); measuring the rest",
                             self.variant, self.target.label, users)  # fmt: skip
                endpoint = endpoints.get()
                try:
                    self._attempt(endpoint, done)
                except ServerDied as died:
                    endpoints.discard()
                    if restarts <= 0:
                        raise LoadTestError(
                            f"{self.variant}: {died} (restarted {self.cfg.server_restarts} time(s) already; "
                            f"records: {self.records})"
                        ) from None
                    restarts -= 1
                    log.warning("load: %s on %s: %s; starting it again for the steps still to measure",
                                self.variant, self.target.label, died)  # fmt: skip
        summary = self.summary()
        if (found := summary.capacity) is not None:
            log.info("load: %s on %s: capacity %d users within %s (first miss: %s)", self.variant, self.target.label,
                     found.low, ", ".join(summary.objectives), found.high)  # fmt: skip
        return summary

    def _open(self) -> Endpoint:
        models = {self.variant: self.model} if self.model is not None else {}
        bound = self.plan.bound if self.plan else None
        return open_endpoint(self.ctx, self.target, models, log_path=self.out / "server.log", parallel=bound)

    def _attempt(self, endpoint: Endpoint, done: tuple[tuple[int, bool | None], ...]) -> None:
        """One Locust run on `endpoint` for the steps not in `done`; its outcome is written to attempts.json."""
        cfg = self.cfg
        attempt = Attempt(
            number=len(self.attempts) + 1, run_id=f"a{len(self.attempts) + 1}-{uuid.uuid4().hex[:10]}",
            steps_digest=self.digest, started_at=time.time(),
            build=self.ctx.build.cache_key if self.target.kind != "external" else None,
            model_sha256=content_sha256(self.model) if self.model is not None else None,
            server=endpoint.describe(),
        )  # fmt: skip
        self.attempts.append(attempt)
        self._save_attempts()
        self.out.mkdir(parents=True, exist_ok=True)
        objectives = self.ctx.experiment.slo.objectives()
        cmd = headless_command(
            cfg, endpoint.url, self.out, api=self.api, model_name=self.model_name, objectives=objectives,
            max_users=self.plan.bound if self.plan else None, run_id=attempt.run_id, done=done,
        )  # fmt: skip
        bar = progress_bar(_expected_requests(cfg, done), f"load {self.target.label} {self.variant}", "req")
        outcome, error = "failed", None
        try:
            warm_up(endpoint, cfg, self.api, self.model_name)
            with contextlib.ExitStack() as stack:
                if endpoint.pid is not None:
                    metrics = endpoint.url + "/metrics" if endpoint.kind == "llama-server" else None
                    stack.enter_context(
                        ResourceSampler(endpoint.pid, metrics, self.out / "resources.jsonl",
                                        interval_s=cfg.sample_interval_s)
                    )  # fmt: skip
                base = count_requests(self.records)
                result = run_headless(
                    cmd, records=self.records, log_path=self.out / "locust.log",
                    deadline_s=_deadline_s(cfg, self.plan.bound if self.plan else cfg.bound),
                    watch=lambda: f"{self.variant}: {problem}" if (problem := endpoint.problem()) else None,
                    on_progress=lambda n: advance(bar, n - base),
                    stop_grace_s=cfg.drain_grace_s + LOCUST_SHUTDOWN_S,
                )  # fmt: skip
            if (problem := endpoint.problem()) is not None:  # died as the last requests failed: still a crash
                raise LoadTestError(f"{self.variant}: {problem}")
            self._check_steps(attempt)
            pending = steps_pending(self.step_plan(self.done_steps()))
            check_complete(result, pending=pending)
            outcome = "complete"
        except KeyboardInterrupt:
            outcome, error = "interrupted", "interrupted (Ctrl-C)"
            raise
        except HarnessError as exc:
            error = str(exc)
            code = getattr(endpoint, "returncode", None)
            if code is not None:  # the server process is gone: a crash, not a load problem
                outcome = "server died"
                attempt.server_exit_code, attempt.server_log_tail = code, endpoint.log_tail(12)
                raise ServerDied(f"{endpoint.kind} died during the load test ({exit_reason(code)}; "
                                 f"log: {endpoint.log_path})") from None  # fmt: skip
            raise
        finally:
            bar.close()
            attempt.outcome, attempt.error, attempt.ended_at = outcome, error, time.time()
            kept, requests = self.kept()
            attempt.steps = [step.users for step, mine in kept if mine is attempt]
            attempt.failed_requests = sum(1 for r in requests if r.run == attempt.run_id and not r.ok)
            self._save_attempts()

    def _save_attempts(self) -> None:
        write_record(self.attempts_path, Attempts(attempts=self.attempts))

    def _check_steps(self, attempt: Attempt) -> None:
        """Fail on a step of this attempt in which no request succeeded (with the commonest reason): measuring it
        again as it is would only fail again."""
        requests, steps = read_records(self.records) if self.records.exists() else ([], [])
        for step in steps:
            if step.run != attempt.run_id or step.error:
                continue
            mine = [r for r in requests if r.run == step.run and r.epoch == step.epoch and r.measured]
            if not any(r.ok for r in mine):
                reasons = Counter((r.error or "unknown")[:200] for r in mine).most_common(1)
                reason = reasons[0][0] if reasons else "no request finished inside the step"
                raise LoadTestError(
                    f"{self.target.label} {self.variant}: step with {step.users} users measured no successful "
                    f"request: {reason} (records: {self.records})"
                )

    # ---------------------------------------------------------------- the summary

    def summary(self, *, complete: bool = True, error: str | None = None) -> LoadSummary:
        """Every kept step summarised (configured steps by users, then the search's probes in the order they ran)."""
        cfg = self.cfg
        objectives = self.ctx.experiment.slo.objectives()
        kept, requests = self.kept()
        samples = _read_samples(self.out / "resources.jsonl")
        decode = self.plan.decode if self.plan else None
        context = cfg.prompt_tokens + (0 if self.api == "embeddings" else cfg.output_tokens / 2)  # mean in decode
        configured = sorted((k for k in kept if k[0].users in cfg.steps), key=lambda k: k[0].users)
        probes = sorted((k for k in kept if k[0].users not in cfg.steps), key=lambda k: (k[1].number, k[0].step))
        ordered = configured + probes
        steps = [
            summarize_step(step, requests, samples, objectives=objectives, decode=decode, context_tokens=context)
            .model_copy(update={"attempt": attempt.number, "probe": step.users not in cfg.steps})
            for step, attempt in ordered
        ]  # fmt: skip
        runs = {a.run_id for a in self.attempts}
        mine = [r for r in requests if r.run in runs]
        plan = self.plan or LoadPlan(cfg.bound, "max_users" if cfg.search else "steps")
        found = (
            capacity(steps, bound=plan.bound, searched=cfg.search, bound_reason=plan.bound_reason) if complete else None
        )
        _, user = user_for(self.api)
        last = self.attempts[-1] if self.attempts else None
        return LoadSummary(
            variant=self.variant,
            target=self.target.label,
            target_kind=self.target.kind,
            serializes=bool(last.server.get("serializes")) if last else False,
            model_name=self.model_name,
            api=self.api,
            route=next((r.route for r in mine), ""),
            prompt_tokens=cfg.prompt_tokens,
            output_tokens=0 if self.api == "embeddings" else cfg.output_tokens,
            steps=steps,
            requests=len(mine),
            failures=sum(not r.ok for r in mine),
            objectives=[o.describe() for o in objectives],
            capacity=found,
            decode=decode,
            server=last.server if last else {},
            locust={"user": user, "processes": cfg.processes},
            files={
                "requests": "requests.jsonl",
                "resources": "resources.jsonl",
                "attempts": "attempts.json",
                "server_log": "server.log",
                "locust_log": "locust.log",
                "locust_csv": "locust_stats.csv",
                "locust_html": "locust.html",
            },
            attempts=self.attempts,
            complete=complete,
            error=error,
        )

    def save_partial(self, path: Path, error: str) -> None:
        """The steps finished so far, for the report, written without a digest: a later run measures the rest."""
        try:
            write_record(path, self.summary(complete=False, error=error))
        except (HarnessError, OSError, ValueError) as exc:
            log.warning("load: could not summarise the finished steps of %s on %s: %s",
                        self.variant, self.target.label, exc)  # fmt: skip


class ServerDied(LoadTestError):
    """The server process exited during an attempt."""


def _read_samples(path: Path) -> list[dict[str, Any]]:
    samples = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    samples.append(json.loads(line))
    except FileNotFoundError:
        pass
    return samples


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
    # The bandwidth figures are context for the measurement, not part of it: when the GGUF does not give its
    # shapes or llama-bench cannot run, the load goes on without them (the server then says what is wrong).
    try:
        cost = decode_cost(gguf_info(model, ctx.build, log=out / "gguf-info.log"))
    except HarnessError as exc:
        log.warning("load: %s: no bandwidth figures: %s", variant, exc)
        return LoadPlan(bound, reason)
    threads = exp.server.threads or os.cpu_count() or 1
    bandwidth = memory_bandwidth(ctx.cache, threads=threads, gpu=ctx.build.has_gpu)
    generation = None
    if target.kind == "llama-server":
        compute = ctx.compute(exp.server.threads)
        try:
            generation = llama_bench_generation(ctx.tools, model, compute=compute, log_path=out / "llama-bench.log")
        except HarnessError as exc:
            log.warning("load: %s: no llama-bench reference: %s", variant, exc)
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
    """One variant on one target (default: the experiment's first), the steps its earlier attempts left: its server
    up (or the endpoint reached), the steps run headless, everything stopped, the records summarised."""
    target = target or ctx.experiment.targets[0]
    return VariantLoad(ctx, target, variant, model).measure()


def _expected_requests(cfg: LoadConfig, done: Sequence[tuple[int, bool | None]] = ()) -> int | None:
    measured = {users for users, _ in done}
    todo = [users for users in cfg.steps if users not in measured]
    return sum(todo) * cfg.requests_per_user if cfg.requests_per_user else None


def _deadline_s(cfg: LoadConfig, bound: int) -> float:
    """A bound on the whole run: every step's readiness, its measurement, and one request timeout to drain; the
    search adds at most two probes per doubling of the users."""
    per_step = cfg.ready_timeout_s + cfg.request_timeout_s
    if cfg.requests_per_user is not None:
        # A closed-loop user's requests run one after another; the slowest user bounds the step.
        per_step += cfg.requests_per_user * cfg.request_timeout_s
    else:
        per_step += cfg.step_duration_s or 0.0
    probes = 2 * (max(bound, 1).bit_length() + 1) if cfg.search else 0
    return (len(cfg.steps) + probes) * per_step + 120.0


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
