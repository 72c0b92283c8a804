"""One variant's load on one target across attempts: what determines a step's measurement, the steps earlier attempts
finished whole, each attempt's Locust run on a fresh server, and the summary of every kept step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.apis import generates_tokens
from bench.plan import DoneLevel, LoadPlan
from bench.records import RequestRecord, StepRecord, read_records
from harness.cache import content_sha256
from harness.config import TargetConfig
from harness.console import advance, progress_bar
from harness.context import RunContext
from harness.errors import HarnessError, LoadTestError
from harness.loadtest.runner import (
    LOCUST_SHUTDOWN_S,
    check_complete,
    count_requests,
    headless_command,
    run_headless,
    user_for,
)
from harness.loadtest.sampling import ResourceSampler
from harness.loadtest.serverplan import ServerPlan, deadline_s, expected_requests, plan_variant, warm_up
from harness.loadtest.summary import (
    LOAD_MODELS,
    Attempt,
    Attempts,
    LoadSummary,
    capacity,
    energy_source,
    summarize_step,
)
from harness.process import exit_reason
from harness.records import RecordError, inputs_digest, read_record, write_record
from harness.server import Endpoint
from harness.targets import open_endpoint

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = 5  # bump when the records or the summary change meaning: finished runs are measured again
# Load settings that do not change how one step is measured: which steps run, the search, how stopping works.
STEP_INDEPENDENT = ("steps", "search", "max_users", "search_resolution", "drain_grace_s", "server_restarts")


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
        self.model_name = target.model_name or (variant if target.shares_one_server else None)
        self.out = ctx.run.load(target.label, variant)
        self.records = self.out / "requests.jsonl"
        self.attempts_path = self.out / "attempts.json"
        self.plan: ServerPlan | None = None
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
        kept: dict[float, tuple[StepRecord, Attempt]] = {}
        for step in steps:
            attempt, key = by_run.get(step.run), (step.run, step.epoch)
            if attempt is None or step.error or measured[key] != step.measured_requests:
                continue
            if failed[key] == measured[key]:
                continue  # nothing succeeded: a step to measure again once the cause is fixed, not a result
            if attempt.outcome == "server died" and failed[key]:
                continue  # it saw the crash: measured again on the next server
            kept.pop(step.level, None)
            kept[step.level] = (step, attempt)
        return list(kept.values()), requests

    def done_steps(self) -> tuple[DoneLevel, ...]:
        return tuple((step.level, step.slo_passed) for step, _ in self.kept()[0])

    def pending(self) -> bool:
        return self.load_plan(self.done_steps()).pending()

    def load_plan(self, done: tuple[DoneLevel, ...], run_id: str = "") -> LoadPlan:
        """The experiment's load plan for this variant's next attempt: its records, the model the users name, the
        search's bound (memory may lower it), the levels already measured."""
        more: dict[str, Any] = {"records": str(self.records), "model_name": self.model_name or "", "done": done,
                                "run_id": run_id}  # fmt: skip
        if self.cfg.search and self.plan is not None:
            more["max_level"] = self.plan.bound
        return self.ctx.experiment.plan(**more)

    # ---------------------------------------------------------------- measuring

    def measure(self, shared: Endpoints | None = None) -> LoadSummary:
        """Measure every step still missing; a server that dies is started again (load.server_restarts times)."""
        self.plan = plan_variant(self.ctx, self.target, self.variant, self.model)
        restarts = self.cfg.server_restarts
        arrival = self.ctx.experiment.plan().arrival
        log.info("load: %s on %s (%s, %s), steps %s%s", self.variant, self.target.label, self.api, arrival.kind,
                 self.cfg.steps, f", searching up to {arrival.describe_level(self.plan.bound)}" if self.cfg.search
                 else "")  # fmt: skip
        with contextlib.ExitStack() as stack:
            endpoints = shared or stack.enter_context(Endpoints(self._open))
            while self.pending():
                done = self.done_steps()
                if done:
                    levels = ", ".join(f"{lv:g}" for lv, _ in done)
                    log.info("load: %s on %s: keeping the measured steps (%s); measuring the rest",
                             self.variant, self.target.label, levels)  # fmt: skip
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
            unit = self.ctx.experiment.plan().arrival.unit
            at = next((s for s in summary.steps if s.level == found.low), None)
            how = f"{at.slo_basis} from {at.requests} requests" if at is not None and at.slo_basis else "no pass"
            log.info("load: %s on %s: capacity %g %s within %s (%s; first miss: %s)", self.variant, self.target.label,
                     found.low, unit, ", ".join(summary.objectives), how, found.high)  # fmt: skip
        return summary

    def _open(self) -> Endpoint:
        models = {self.variant: self.model} if self.model is not None else {}
        plan = self.load_plan(())
        parallel = plan.concurrency if plan.open_loop else (int(self.plan.bound) if self.plan else None)
        return open_endpoint(self.ctx, self.target, models, log_path=self.out / "server.log", parallel=parallel)

    def _attempt(self, endpoint: Endpoint, done: tuple[DoneLevel, ...]) -> None:
        """One Locust run on `endpoint` for the steps not in `done`; its outcome is written to attempts.json."""
        cfg = self.cfg
        attempt = Attempt(
            number=len(self.attempts) + 1, run_id=f"a{len(self.attempts) + 1}-{uuid.uuid4().hex[:10]}",
            steps_digest=self.digest, started_at=time.time(),
            build=self.ctx.build.cache_key if self.target.target.managed else None,
            model_sha256=content_sha256(self.model) if self.model is not None else None,
            server=endpoint.describe(),
        )  # fmt: skip
        self.attempts.append(attempt)
        self._save_attempts()
        self.out.mkdir(parents=True, exist_ok=True)
        plan = self.load_plan(done, attempt.run_id)
        cmd = headless_command(cfg, plan, endpoint.url, self.out, api=self.api)
        bar = progress_bar(expected_requests(plan), f"load {self.target.label} {self.variant}", "req")
        outcome, error = "failed", None
        try:
            warm_up(endpoint, cfg, self.api, self.model_name)
            with contextlib.ExitStack() as stack:
                if endpoint.pid is not None:
                    metrics = endpoint.url + "/metrics" if self.target.target.has_metrics else None
                    stack.enter_context(
                        ResourceSampler(endpoint.pid, metrics, self.out / "resources.jsonl",
                                        interval_s=cfg.sample_interval_s)
                    )  # fmt: skip
                base = count_requests(self.records)
                result = run_headless(
                    cmd, records=self.records, log_path=self.out / "locust.log",
                    deadline_s=deadline_s(plan),
                    watch=lambda: f"{self.variant}: {problem}" if (problem := endpoint.problem()) else None,
                    on_progress=lambda n: advance(bar, n - base),
                    stop_grace_s=cfg.drain_grace_s + LOCUST_SHUTDOWN_S,
                )  # fmt: skip
            if (problem := endpoint.problem()) is not None:  # died as the last requests failed: still a crash
                raise LoadTestError(f"{self.variant}: {problem}")
            self._check_steps(attempt)
            check_complete(result, pending=self.pending())
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
            attempt.steps = [step.level for step, mine in kept if mine is attempt]
            attempt.failed_requests = sum(1 for r in requests if r.run == attempt.run_id and not r.ok)
            self._save_attempts()

    @property
    def _unit(self) -> str:
        return self.ctx.experiment.plan().arrival.unit

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
                    f"{self.target.label} {self.variant}: step at {step.level:g} {self._unit} measured no successful "
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
        context = cfg.prompt_tokens + (cfg.output_tokens / 2 if generates_tokens(self.api) else 0)  # mean in decode
        configured = sorted((k for k in kept if k[0].level in cfg.steps), key=lambda k: k[0].level)
        probes = sorted((k for k in kept if k[0].level not in cfg.steps), key=lambda k: (k[1].number, k[0].step))
        ordered = configured + probes
        steps = [
            summarize_step(step, requests, samples, objectives=objectives, decode=decode, context_tokens=context)
            .model_copy(update={"attempt": attempt.number, "probe": step.level not in cfg.steps})
            for step, attempt in ordered
        ]  # fmt: skip
        runs = {a.run_id for a in self.attempts}
        mine = [r for r in requests if r.run in runs]
        plan = self.plan or ServerPlan(cfg.bound, "max_users" if cfg.search else "steps")
        load_plan = self.ctx.experiment.plan()
        found = (
            capacity(steps, bound=plan.bound, searched=cfg.search, bound_reason=plan.bound_reason,
                     unit=load_plan.arrival.unit) if complete else None
        )  # fmt: skip
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
            output_tokens=cfg.output_tokens if generates_tokens(self.api) else 0,
            steps=steps,
            load_model=LOAD_MODELS[load_plan.open_loop],
            arrival=load_plan.arrival.model_dump(mode="json"),
            requests=len(mine),
            failures=sum(not r.ok for r in mine),
            objectives=[o.describe() for o in objectives],
            capacity=found,
            decode=decode,
            energy=energy_source(samples),
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


def run_variant(
    ctx: RunContext, variant: str, model: Path | None, *, target: TargetConfig | None = None
) -> LoadSummary:
    """One variant on one target (default: the experiment's first), the steps its earlier attempts left: its server
    up (or the endpoint reached), the steps run headless, everything stopped, the records summarised."""
    target = target or ctx.experiment.targets[0]
    return VariantLoad(ctx, target, variant, model).measure()
