"""What a target is: its settings (a `[[targets]]` entry) and its kind, a registered class that says how it is
measured. Adding a kind is one module with a `TargetConfig` subclass and a `Target` subclass decorated with
`@register`, imported in `harness/targets/__init__.py`; an unknown kind's error lists the known ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.apis import Api
from bench.registry import Registry

if TYPE_CHECKING:
    from harness.context import RunContext
    from harness.server import Endpoint


class TargetConfig(BaseModel):
    """The settings every target has; each kind's config adds its own (and only those: another key is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "llama-server"
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=64)
    # The route the users load; None = load.api (a kind without the native route takes openai instead).
    api: Api | None = None
    # The `model` field the users send (servers that check it; llama-cpp-python's --config_file aliases).
    model_name: str | None = None
    # The variants a managed target measures (names of [[variants]]); empty = every one. A server compared with
    # another on one variant need not measure the rest (the first target measures every variant: it is the one the
    # recommendation compares).
    variants: list[str] = Field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def target(self) -> type[Target]:
        """This target's kind: what it can do and how it is started."""
        return TARGETS[self.kind]

    def measures(self, variant: str) -> bool:
        """Whether this target measures `variant` (its `variants`, or all)."""
        return not self.variants or variant in self.variants

    def route_api(self, load_api: str) -> str:
        """The api this target is loaded through."""
        return self.target.route_api(self.api or load_api)

    @property
    def shares_one_server(self) -> bool:
        """One server process holds every variant (the users name the model); a kind's config may say so."""
        return False


class Target(ABC):
    """A kind of target: class-level answers about it, and how to open its endpoint for a run."""

    kind: ClassVar[str]
    config: ClassVar[type[TargetConfig]]
    managed: ClassVar[bool] = True  # started and stopped by the harness, once per variant it measures
    serializes: ClassVar[bool] = False  # handles one request at a time (concurrent users queue)
    has_metrics: ClassVar[bool] = False  # Prometheus /metrics, sampled during the load
    runs_llama_bench: ClassVar[bool] = False  # the build's llama-bench is its single-stream reference
    sized_by_slots: ClassVar[bool] = False  # its slots are the concurrency: the search is bounded by the memory

    # The load APIs (bench.apis) it serves; the first stands in for one it does not (llama-cpp-python has no native
    # /completion route: its users load /v1/completions).
    apis: ClassVar[tuple[str, ...]] = ("native", "openai", "chat", "embeddings")

    @classmethod
    def route_api(cls, api: str) -> str:
        return api if api in cls.apis else cls.apis[0]

    @classmethod
    @abstractmethod
    def open(
        cls, ctx: RunContext, target: TargetConfig, models: Mapping[str, Path], *, log_path: Path, parallel: int | None
    ) -> Endpoint:
        """The endpoint measuring `models` (variant -> GGUF; empty for a target that is already running), not
        started; `parallel`: the requests it must serve at once (None: the load's bound)."""


TARGETS: Registry[type[Target]] = Registry("target kind")


def register(cls: type[Target]) -> type[Target]:
    """Class decorator: make `cls` the target of `cls.kind` (a kind registered twice is refused)."""
    return TARGETS.register(cls.kind, cls)


def target_config(data: Any) -> TargetConfig:
    """The settings of one `[[targets]]` entry, validated by its kind's config (ValueError naming what is wrong)."""
    if isinstance(data, TargetConfig):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"a target is a table with a kind, e.g. {{kind = 'llama-server'}}; got {data!r}")
    kind = data.get("kind", "llama-server")
    config = TARGETS[kind].config
    try:
        return config.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown key for a {kind} target; its keys: {', '.join(config.model_fields)}"
            parts.append(f"{where}: {message}" if where else message)
        raise ValueError("; ".join(parts)) from None
