"""The systems the load stage measures, behind one interface (`harness.server.Endpoint`), as a registry keyed by
`kind`: `llama-server` (the default), `llama-cpp-python`, `external` (one module each; see `base` for adding one).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from harness.targets import external, llama_cpp_python, llama_server  # noqa: F401 - each registers its kind
from harness.targets.base import TARGETS, Target, TargetConfig, register, target_config

if TYPE_CHECKING:
    from harness.context import RunContext
    from harness.server import Endpoint

__all__ = ["TARGETS", "Target", "TargetConfig", "open_endpoint", "register", "target_config"]


def open_endpoint(
    ctx: RunContext, target: TargetConfig, models: Mapping[str, Path], *, log_path: Path, parallel: int | None = None
) -> Endpoint:
    """The endpoint of `target` for `models` (variant -> GGUF; one, or all for a multi-model server), not started;
    `parallel`: the requests it must serve at once (default: the load's concurrency)."""
    return target.target.open(ctx, target, models, log_path=log_path, parallel=parallel)
