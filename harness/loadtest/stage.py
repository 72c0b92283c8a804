"""The load stage: every variant on every target, one unit per target and variant (the pipeline keeps what is fresh)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.config import TargetConfig
from harness.context import RunContext
from harness.errors import HarnessError, LoadTestError
from harness.loadtest.attempts import Endpoints, VariantLoad, load_inputs
from harness.loadtest.summary import LoadSummary
from harness.stage import Stage, Unit
from harness.targets import open_endpoint

log = logging.getLogger(__name__)

EXTERNAL_MODEL = "endpoint"


class LoadStage(Stage[LoadSummary]):
    """Every variant under the Locust load on every target (llama-server, llama-cpp-python, an endpoint): one unit
    per target and variant (an external endpoint: its one model).

    llama-server and llama-cpp-python get a fresh server per variant (or one llama-cpp-python server holding every
    variant, with multi_model); an external endpoint is measured once, as it is. A variant that fails (its server
    cannot start, or dies more often than load.server_restarts allows) is reported and the others still run.
    Whatever stops a variant, the steps it finished are kept (a partial summary the report shows) and a later run
    measures only the rest.
    """

    name = "load"
    what = "load"
    record = LoadSummary
    error = LoadTestError

    def enabled(self, ctx: RunContext) -> bool:
        return ctx.experiment.load.enabled

    def units(self, ctx: RunContext) -> list[Unit]:
        return [Unit(f"{t.label}/{variant}", variant=variant, target=t.label, label=f"{variant} on {t.label}")
                for t in ctx.experiment.targets for variant in units(ctx, t)]  # fmt: skip

    def output(self, ctx: RunContext, unit: Unit) -> Path:
        return ctx.run.load_summary(unit.target, unit.variant)  # type: ignore[arg-type]

    def inputs(self, ctx: RunContext, unit: Unit) -> Any:
        target = _target(ctx, unit.target)  # type: ignore[arg-type]
        return load_inputs(ctx, target, units(ctx, target)[unit.variant])  # type: ignore[index]

    def make(self, ctx: RunContext, todo: list[Unit]) -> Iterator[tuple[Unit, LoadSummary | HarnessError]]:
        for target in ctx.experiment.targets:
            mine = [u for u in todo if u.target == target.label]
            if not mine:
                continue
            models = units(ctx, target)
            shared = None
            if target.shares_one_server:
                chosen = {u.variant: models[u.variant] for u in mine if models[u.variant] is not None}
                shared = Endpoints(lambda chosen=chosen, target=target: open_endpoint(
                    ctx, target, chosen, log_path=ctx.run.load_target(target.label) / "server.log"  # type: ignore[arg-type]
                ))  # fmt: skip
            with shared or contextlib.nullcontext():
                for unit in mine:
                    yield unit, self._measure(ctx, target, unit, models[unit.variant], shared)  # type: ignore[index]

    def _measure(self, ctx: RunContext, target: TargetConfig, unit: Unit, model: Path | None,
                 shared: Endpoints | None) -> LoadSummary | HarnessError:  # fmt: skip
        load = None
        path = self.output(ctx, unit)
        try:
            load = VariantLoad(ctx, target, unit.variant, model)  # type: ignore[arg-type]
            return load.measure(shared)
        except (KeyboardInterrupt, SystemExit) as stop:
            if load is not None:
                why = "interrupted (Ctrl-C)" if isinstance(stop, KeyboardInterrupt) else "stopped by a signal"
                load.save_partial(path, why)
            raise
        except HarnessError as exc:
            if load is not None:
                load.save_partial(path, str(exc))
            return exc


def _target(ctx: RunContext, label: str) -> TargetConfig:
    for target in ctx.experiment.targets:
        if target.label == label:
            return target
    raise LoadTestError(f"no target named {label!r}; targets: {', '.join(t.label for t in ctx.experiment.targets)}")


def units(ctx: RunContext, target: TargetConfig) -> dict[str, Path | None]:
    """What `target` measures: every variant (name -> GGUF), or an external endpoint's one model."""
    if not target.target.managed:
        return {target.model_name or EXTERNAL_MODEL: None}
    return {name: artifact.path for name, artifact in ctx.models().items() if target.measures(name)}


def run_load_stage(ctx: RunContext) -> dict[tuple[str, str], LoadSummary]:
    """The load stage as the pipeline runs it (what is fresh is kept); the summaries by (target, variant)."""
    return {(unit.target, unit.variant): summary for unit, summary in LoadStage().run(ctx).items()}  # type: ignore[misc]
