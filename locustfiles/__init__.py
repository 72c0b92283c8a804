"""Locust load for llama.cpp's server and OpenAI-compatible servers: users, the stepped shape, per-request records.

Run a locustfile with plain Locust (`locust -f locustfiles/native.py --host URL`) or through `llamasys load`.
Modules whose name starts with `_` are the machinery the locustfiles share (Locust skips them when given the
directory); this package root imports nothing from Locust, so the harness can read the record schema and the
table of users without gevent patching its process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.records import RequestRecord, StepRecord, read_records
from locustfiles._steps import EXIT_ABORTED

LOCUSTFILES = Path(__file__).resolve().parent


@dataclass(frozen=True)
class UserKind:
    """One kind of load: the experiment's `load.api` name, the route it streams, and the user class that sends it."""

    api: str
    route: str
    locustfile: str
    user_class: str

    @property
    def path(self) -> Path:
        return LOCUSTFILES / self.locustfile


# The one table of users: the user classes take their api and route from it, the harness their file and name.
USER_KINDS: dict[str, UserKind] = {
    kind.api: kind
    for kind in (
        UserKind("native", "/completion", "native.py", "NativeCompletionUser"),
        UserKind("openai", "/v1/completions", "openai_compat.py", "OpenAICompletionUser"),
        UserKind("chat", "/v1/chat/completions", "openai_compat.py", "OpenAIChatUser"),
        UserKind("embeddings", "/v1/embeddings", "embeddings.py", "EmbeddingsUser"),
    )
}

__all__ = ["EXIT_ABORTED", "LOCUSTFILES", "USER_KINDS", "RequestRecord", "StepRecord", "UserKind", "read_records"]
