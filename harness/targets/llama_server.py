"""Target kind `llama-server` (the default): the llama-server the harness starts for each variant, one model, as
many slots as the load's concurrency, stopped on every path (`harness.server.LlamaServer`)."""

from __future__ import annotations

from typing import Literal

from bench.apis import generates_tokens
from harness.errors import LoadTestError
from harness.server import LlamaServer
from harness.targets.base import Target, TargetConfig, register


class LlamaServerConfig(TargetConfig):
    """`kind = "llama-server"`: started with the experiment's [server] settings."""

    kind: Literal["llama-server"] = "llama-server"


@register
class LlamaServerTarget(Target):
    kind = "llama-server"
    config = LlamaServerConfig
    has_metrics = True
    runs_llama_bench = True
    sized_by_slots = True

    @classmethod
    def open(cls, ctx, target, models, *, log_path, parallel):  # type: ignore[no-untyped-def]
        if len(models) != 1:
            raise LoadTestError(f"llama-server serves one model at a time, not {len(models)}")
        (model,) = models.values()
        embeddings = not generates_tokens(target.route_api(ctx.experiment.load.api))
        return LlamaServer(
            ctx.build, model, ctx.experiment.sizing(parallel), log_path=log_path, settings=ctx.experiment.server,
            embeddings=embeddings,
        )  # fmt: skip
