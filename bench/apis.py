"""The load APIs: which route each `load.api` streams, whether it generates tokens, and the Locust user that sends it.

One registry (bench.registry) of plain data, read by the settings (what an api is), the harness (which locustfile
and user class to start) and the user classes themselves (their route): a property of the api, such as whether it
generates tokens, is asked here instead of comparing its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.registry import Registry

LOCUSTFILES = Path(__file__).resolve().parents[1] / "locustfiles"

# The names of the load APIs, for settings that take one (the registry below is what each one means).
Api = Literal["native", "openai", "chat", "embeddings"]


@dataclass(frozen=True)
class UserKind:
    """One kind of load: the experiment's `load.api` name, the route it streams, the user class that sends it, and
    whether its requests generate tokens (an embeddings request has an exact input and no output)."""

    api: str
    route: str
    locustfile: str
    user_class: str
    generates_tokens: bool = True

    @property
    def path(self) -> Path:
        return LOCUSTFILES / self.locustfile


USER_KINDS: Registry[UserKind] = Registry("load api")
for _kind in (
    UserKind("native", "/completion", "native.py", "NativeCompletionUser"),
    UserKind("openai", "/v1/completions", "openai_compat.py", "OpenAICompletionUser"),
    UserKind("chat", "/v1/chat/completions", "openai_compat.py", "OpenAIChatUser"),
    UserKind("embeddings", "/v1/embeddings", "embeddings.py", "EmbeddingsUser", generates_tokens=False),
):
    USER_KINDS.register(_kind.api, _kind)


def generates_tokens(api: str) -> bool:
    """Whether requests of `api` generate output tokens (an unknown api is an error naming the known ones)."""
    return USER_KINDS[api].generates_tokens
