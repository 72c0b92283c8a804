"""Target kind `external`: an endpoint that is already running (llama-server or any OpenAI-compatible server),
reached and checked once; no lifecycle, one model (the one it serves), never a variant of ours."""

from __future__ import annotations

import urllib.error
import urllib.parse
from typing import Any, Literal

from pydantic import model_validator

from harness.errors import LoadTestError
from harness.server import Endpoint
from harness.targets.base import Target, TargetConfig, register

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class ExternalConfig(TargetConfig):
    """`kind = "external"`: the endpoint, e.g. url = "http://127.0.0.1:8000" (loopback unless allow_remote)."""

    kind: Literal["external"] = "external"
    url: str
    allow_remote: bool = False

    @model_validator(mode="after")
    def _a_loopback_url(self) -> ExternalConfig:
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if not self.url.startswith(("http://", "https://")) or not host:
            raise ValueError(f"url {self.url!r} is not an http(s) URL with a host")
        if host not in LOOPBACK_HOSTS and not host.startswith("127.") and not self.allow_remote:
            raise ValueError(
                f"url {self.url!r} is not on this machine; load tests target loopback unless allow_remote = true"
            )
        return self


@register
class External(Target):
    kind = "external"
    config = ExternalConfig
    managed = False

    @classmethod
    def open(cls, ctx, target, models, *, log_path, parallel):  # type: ignore[no-untyped-def]
        return ExternalEndpoint(target)  # type: ignore[arg-type]


class ExternalEndpoint(Endpoint):
    """An already running llama-server or OpenAI-compatible server: reached and checked, never started or stopped."""

    kind = "external"

    def __init__(self, target: ExternalConfig) -> None:
        self.target = target
        self._url = target.url.rstrip("/")
        self.props: dict[str, Any] = {}
        self.models: list[str] = []

    @property
    def url(self) -> str:
        return self._url

    def start(self) -> None:
        """Check the endpoint answers, and that it serves the model the users will name (when one is named)."""
        try:
            listed = self.get_json("/v1/models", timeout_s=10)
            self.models = [str(m.get("id")) for m in listed.get("data", []) if isinstance(m, dict)]
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise LoadTestError(
                    f"target {self.target.label}: {self.url}/v1/models answered HTTP {exc.code}"
                ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LoadTestError(f"target {self.target.label}: cannot reach {self.url} ({reason})") from None
        with_props = self._props()
        if with_props is not None:
            self.props = with_props
        name = self.target.model_name
        if name and self.models and name not in self.models:
            raise LoadTestError(
                f"target {self.target.label}: {self.url} does not serve model {name!r}; it serves: "
                f"{', '.join(self.models)}"
            )

    def _props(self) -> dict[str, Any] | None:
        try:
            props = self.get_json("/props", timeout_s=5)
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return props if isinstance(props, dict) else None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "models": self.models, "llama_server": bool(self.props)}
