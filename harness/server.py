"""`LlamaServer`: one llama-server process on loopback, sized for the load it will get, always stopped."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import psutil
from pydantic import BaseModel, ConfigDict, Field

from harness.build import Build
from harness.errors import HarnessError, ServerError
from harness.process import exit_reason, stop
from harness.tools import LOADER_REASON, error_line

GGUF_MAGIC = b"GGUF"
WARM_UP_OUTPUT_TOKENS = 32


class ServerConfig(BaseModel):
    """How llama-server is started for the load stage and `llamasys serve` (the experiment's [server] section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535, description="None = a free port")
    # Headroom per slot beyond prompt + output (BOS, template tokens, rounding).
    margin_tokens: int = Field(default=64, ge=0)
    gpu_layers: int = Field(default=999, ge=0, description="layers offloaded when the backend has a GPU")
    threads: int | None = Field(default=None, ge=1)
    startup_timeout_s: float = Field(default=180.0, gt=0)
    extra_args: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class ServerSizing:
    """Context sized so that every slot holds one whole request: parallel x (prompt + output + margin)."""

    parallel: int
    prompt_tokens: int
    output_tokens: int
    margin_tokens: int = 64

    @property
    def per_slot(self) -> int:
        return self.prompt_tokens + self.output_tokens + self.margin_tokens

    @property
    def ctx_size(self) -> int:
        return self.parallel * self.per_slot


def server_args(
    build: Build, model: Path, sizing: ServerSizing, *, host: str, port: int, extra_args: Sequence[str] = ()
) -> list[str]:
    """llama-server's arguments (threads and GPU layers come from the `Compute` the runner adds); the same flags
    exist in the b3661 era and now."""
    args = [
        "--model", str(model),
        "--host", host,
        "--port", str(port),
        "--ctx-size", str(sizing.ctx_size),
        "--parallel", str(sizing.parallel),
        "--batch-size", str(min(2048, sizing.ctx_size)),
        "--metrics",
    ]  # fmt: skip
    # Current builds may share one KV buffer across slots (--kv-unified); per-slot context is what we size.
    if build.era == "current" and build.tools.supports("llama-server", "--no-kv-unified"):
        args.append("--no-kv-unified")
    return args + list(extra_args)


def check_gguf(model: Path, *, error: type[HarnessError] = ServerError, setting: str = "") -> None:
    """Fail early, in one line, on a path that is not a GGUF file (missing, empty, wrong magic)."""
    where = f" ({setting})" if setting else ""
    if not model.is_file():
        raise error(f"model file not found: {model}{where}")
    with open(model, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise error(f"{model} is not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r}){where}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} on {host} is already in use; pick another with server.port") from None
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class Endpoint:
    """A server the load stage measures, reached over HTTP on its URL: started and stopped by the harness (a context
    manager that stops it on every path) or already running. Subclasses say how it starts and whether it lives."""

    kind: ClassVar[str] = ""
    # Serves one request at a time (concurrent requests queue): said next to its figures.
    serializes: ClassVar[bool] = False
    log_path: Path | None = None
    props: dict[str, Any]

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop what start() started; nothing for an endpoint the harness did not start."""

    def problem(self) -> str | None:
        """Why the endpoint cannot be measured any more (its process died), or None."""
        pid = self.pid
        if pid is None:
            return None
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        return None if alive else f"{self.kind} died during the load test (log: {self.log_path})"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "serializes": self.serializes}

    def get_json(self, path: str, *, timeout_s: float = 10.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())

    def post_json(self, path: str, body: dict[str, Any], *, timeout_s: float = 600.0) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())

    def log_tail(self, n: int = 20) -> list[str]:
        if self.log_path is None:
            return []
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return []

    def warm_up(
        self, api: str, text: str, *, prompt_tokens: int, output_tokens: int, model: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:  # fmt: skip
        """One unmeasured request on the load's route before any step: the weights are paged in and the buffers
        allocated, so the first measured request does not pay for it. Its prompt is about two thirds of the load's
        (whole words of the prompt text; no tokenizer is needed) and it generates at most WARM_UP_OUTPUT_TOKENS."""
        words = text.split()
        prompt = " ".join((words * (prompt_tokens // max(len(words), 1) + 1))[: max(1, prompt_tokens // 2)])
        n = min(output_tokens, WARM_UP_OUTPUT_TOKENS)
        route, body = {
            "native": ("/completion", {"prompt": prompt, "n_predict": n, "cache_prompt": False}),
            "openai": ("/v1/completions", {"prompt": prompt, "max_tokens": n}),
            "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": n}),
            "embeddings": ("/v1/embeddings", {"input": prompt}),
        }[api]
        if model:
            body["model"] = model
        try:
            self.post_json(route, body, timeout_s=timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:300]
            raise ServerError(f"the warm-up request to {self.kind} ({route}) answered {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise ServerError(f"the warm-up request to {self.kind} ({route}) failed: {exc}") from None


class ManagedEndpoint(Endpoint):
    """A server process the harness starts and stops: its PID, when it started, how it ended, and the one wait for
    it to become ready (it may die while loading; the deadline is the experiment's server.startup_timeout_s)."""

    _proc: subprocess.Popen | None = None
    command: Sequence[str] = ()  # the command line its process was started with (set by each kind's start)
    started_at: float | None = None  # wall clock when its process was started
    exit_code: int | None = None  # how it ended by itself (a crash), once it has; None while running or stopped by us

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return self._proc.poll() if self._proc else None

    def stop(self) -> None:
        if self._proc is not None:
            code = self._proc.poll()  # how it ended by itself, before we stop it
            stop(self._proc, grace_s=10.0)
            self.exit_code = code if code is not None else self.exit_code
            self._proc = None

    def describe(self) -> dict[str, Any]:
        """What served the load, for its attempt's record: with the exact command line (`argv`) that started it."""
        return {**super().describe(), "started_at": self.started_at, "pid": self.pid, "argv": list(self.command)}

    def _spawned(self, proc: subprocess.Popen) -> None:
        self._proc, self.started_at = proc, time.time()

    def _wait_ready(self, ready: Callable[[], bool], *, timeout_s: float, name: str) -> None:
        """Poll `ready()` (False: not yet; it raises on a definite problem) until it is true, the process exits
        or `timeout_s` passes."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self.exit_code = code
                if code < 0:  # a signal: the log's last line says nothing of it
                    raise ServerError(f"{name} was {exit_reason(code)} while starting (log: {self.log_path})")
                why = error_line(self.log_tail(40), prefer=LOADER_REASON, empty="(empty log)")
                raise ServerError(f"{name} exited ({code}) while starting: {why} (log: {self.log_path})")
            if ready():
                return
            time.sleep(0.2)
        raise ServerError(f"{name} did not become ready within {timeout_s:.0f} s (log: {self.log_path})")


class LlamaServer(ManagedEndpoint):
    """Context manager around one llama-server: start, wait for /health, verify sizing, stop on every path.

    `settings` says where it listens (host, port: None = a free one), its threads and GPU layers, extra arguments
    and how long it may take to start.
    """

    kind = "llama-server"

    def __init__(
        self,
        build: Build,
        model: Path,
        sizing: ServerSizing,
        *,
        log_path: Path,
        settings: ServerConfig | None = None,
        embeddings: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.embeddings = embeddings  # started for /v1/embeddings: --embeddings with mean pooling
        self.env = env  # variables added to its environment (the build check preloads its SIGILL reporter)
        self.command: list[str] = []
        self.build = build
        self.model = Path(model)
        self.sizing = sizing
        self.log_path = log_path
        self.settings = settings or ServerConfig()
        self.host = self.settings.host
        self.port: int | None = None
        self.props: dict[str, Any] = {}

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("llama-server is not running")
        return f"http://{self.host}:{self.port}"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": str(self.model),
            "build": f"b{self.build.build_number} ({self.build.commit})",
            "backend": self.build.backend,
            "parallel": self.sizing.parallel,
            "ctx_size": self.sizing.ctx_size,
            "slot_ctx": (self.props.get("default_generation_settings") or {}).get("n_ctx"),
            "threads": self.settings.threads,
        }

    def start(self) -> None:
        check_gguf(self.model)
        if self.settings.port is not None:
            check_port_free(self.host, self.settings.port)
            self.port = self.settings.port
        else:
            self.port = free_port(self.host)
        extra = [*self.settings.extra_args, *(["--embeddings", "--pooling", "mean"] if self.embeddings else [])]
        args = server_args(self.build, self.model, self.sizing, host=self.host, port=self.port, extra_args=extra)
        compute = self.build.compute(threads=self.settings.threads, gpu_layers=self.settings.gpu_layers)
        self.command = self.build.tools.command("llama-server", args, compute)
        self._spawned(
            self.build.tools.start("llama-server", args, log_path=self.log_path, compute=compute, env=self.env)
        )
        try:
            self._wait_ready(self._healthy, timeout_s=self.settings.startup_timeout_s, name="llama-server")
            self.props = self.get_json("/props")
            self._verify_sizing()
        except BaseException:
            self.stop()
            raise

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        return list(self.post_json("/tokenize", {"content": text, "add_special": add_special})["tokens"])

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as exc:
            if exc.code != 503:  # 503 = still loading the model
                raise ServerError(f"llama-server /health answered {exc.code}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        return False

    def _verify_sizing(self) -> None:
        settings = self.props.get("default_generation_settings", {})
        slot_ctx = settings.get("n_ctx")
        slots = self.props.get("total_slots")
        if slot_ctx is None or slots is None:
            raise ServerError("llama-server /props does not report n_ctx and total_slots; cannot verify sizing")
        if slots != self.sizing.parallel:
            raise ServerError(f"llama-server runs {slots} slots, asked for {self.sizing.parallel}")
        needed = self.sizing.prompt_tokens + self.sizing.output_tokens
        if slot_ctx < needed:
            raise ServerError(
                f"llama-server gives each slot {slot_ctx} tokens of context but a request needs {needed} "
                f"({self.sizing.prompt_tokens} prompt + {self.sizing.output_tokens} output); "
                "the model's context may be too small"
            )
