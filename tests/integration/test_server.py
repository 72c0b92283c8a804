"""A real llama-server on the real small model: exact token-id requests, sizing checks, clean stops, bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.build import Build
from harness.config import ServerConfig
from harness.errors import ServerError
from harness.server import LlamaServer, ServerSizing
from tests.integration.helpers import REPO, error_line, llamasys, processes_mentioning

pytestmark = pytest.mark.integration

SIZING = ServerSizing(parallel=2, prompt_tokens=64, output_tokens=16, margin_tokens=16)


def test_token_id_prompt_round_trip_and_clean_stop(any_build: Build, smollm2: Path, tmp_path: Path):
    server = LlamaServer(any_build, smollm2, SIZING, log_path=tmp_path / "server.log", settings=ServerConfig(threads=2))
    with server:
        pid = server.pid
        assert server.url.startswith("http://127.0.0.1:")
        assert server.props["total_slots"] == 2
        assert server.props["default_generation_settings"]["n_ctx"] >= 80
        tokens = server.tokenize("The quick brown fox jumps over the lazy dog. " * 4)[:40]
        assert len(tokens) == 40
        body = {"prompt": tokens, "n_predict": 8, "ignore_eos": True, "cache_prompt": False, "temperature": 0}
        reply = server.post_json("/completion", body)
        assert reply["timings"]["predicted_n"] == 8
        assert reply["timings"]["prompt_n"] == 40
        assert reply["tokens_evaluated"] == 40
    assert server.pid is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert processes_mentioning(str(tmp_path)) == []


def test_context_too_small_for_the_request_is_refused(current_build: Build, smollm2: Path, tmp_path: Path):
    # SmolLM2 trains on 8192 tokens; ask for slots of 9000: the server caps the context and we must say so.
    sizing = ServerSizing(parallel=1, prompt_tokens=9000, output_tokens=768, margin_tokens=0)
    server = LlamaServer(
        current_build, smollm2, sizing, log_path=tmp_path / "server.log", settings=ServerConfig(threads=2)
    )
    try:
        with server:
            slot_ctx = server.props["default_generation_settings"]["n_ctx"]
        pytest.skip(f"this build gave the slot {slot_ctx} tokens; nothing to refuse")  # pragma: no cover
    except ServerError as exc:
        assert "tokens of context but a request needs 9768" in str(exc)
    assert processes_mentioning(str(tmp_path)) == []


@pytest.fixture()
def serve_env(cache_dir: Path, current_build: Build) -> dict[str, str]:
    return {"LLAMASYS_CACHE_DIR": str(cache_dir)}


def test_serve_bad_models_are_one_line_errors(serve_env, smollm2: Path, tmp_path: Path):
    missing = llamasys("serve", "--model", str(tmp_path / "nope.gguf"), env=serve_env, timeout=120)
    assert missing.returncode == 5
    assert "model file not found" in error_line(missing.stderr)

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    wrong = llamasys("serve", "--model", str(not_gguf), env=serve_env, timeout=120)
    assert wrong.returncode == 5 and "is not a GGUF file" in error_line(wrong.stderr)

    truncated = tmp_path / "truncated.gguf"
    with open(smollm2, "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    cut = llamasys("serve", "--model", str(truncated), "--run-dir", str(tmp_path / "run"), env=serve_env, timeout=300)
    assert cut.returncode == 5
    line = error_line(cut.stderr)
    assert "llama-server exited" in line and "while starting" in line and str(tmp_path / "run") in line
    assert processes_mentioning(str(tmp_path)) == []


def test_serve_port_taken(serve_env, smollm2: Path, tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = llamasys("serve", "--model", str(smollm2), "--port", str(port), env=serve_env, timeout=120)
    assert result.returncode == 5
    assert f"port {port} on 127.0.0.1 is already in use" in error_line(result.stderr)
    assert processes_mentioning(f"--port {port}") == []


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_serve_never_orphans_the_server(serve_env, smollm2: Path, tmp_path: Path, how: str):
    model = tmp_path / "model.gguf"  # a private path, so we find exactly our server by its command line
    model.symlink_to(smollm2)
    with socket.socket() as sock:  # a free port for the web UI, so parallel runs never collide on 8089
        sock.bind(("127.0.0.1", 0))
        web_port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "harness.cli", "serve", "--model", str(model), "--web-port", str(web_port),
           "--run-dir", str(tmp_path / "run"), "--set", "load.steps=[1]", "--set", "load.prompt_tokens=64",
           "--set", "load.output_tokens=16", "--set", "server.threads=1"]  # fmt: skip
    env = {**os.environ, **serve_env}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops everything" in line or not line:
                break
        text = "".join(lines)
        assert "at http://127.0.0.1:" in text and f"Locust web UI at http://127.0.0.1:{web_port}" in text, (
            text + proc.stderr.read()
        )
        assert f"ssh -L {web_port}:127.0.0.1:{web_port}" in text
        mentioned = processes_mentioning(str(model)) + processes_mentioning(f"--web-port {web_port}")
        servers = list({p.pid: p for p in mentioned if p.pid != proc.pid}.values())
        names = sorted(p.name() for p in servers)  # llama-server and the Locust web UI (a Python process)
        assert len(names) == 2 and names[0] == "llama-server" and names[1].startswith("python"), names
        sig = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[how]
        proc.send_signal(sig)
        proc.wait(timeout=30)
        psutil.wait_procs(servers, timeout=15)
        left = processes_mentioning(str(model)) + processes_mentioning(f"--web-port {web_port}")
        assert [p for p in left if p.pid != proc.pid] == []
        if how == "ctrl-c":
            assert proc.returncode == 0  # Ctrl-C is how serve is meant to end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gpu_offload_only_when_the_backend_has_a_gpu(current_build: Build, smollm2: Path):
    from harness.server import server_args

    args = server_args(current_build, smollm2, SIZING, host="127.0.0.1", port=1)
    assert "--no-kv-unified" in args  # this build has the flag: each slot keeps its own context
    cpu = current_build.tools.command("llama-server", args, current_build.compute(threads=None, gpu_layers=99))
    assert "-ngl" not in cpu
    assert cpu[cpu.index("--ctx-size") + 1] == str(2 * 96) and cpu[cpu.index("--parallel") + 1] == "2"
    gpu_build = current_build.model_copy(update={"backend": "cuda", "tree": None})
    gpu = gpu_build.tools.command("llama-server", args, gpu_build.compute(threads=None, gpu_layers=99))
    assert gpu[gpu.index("-ngl") + 1] == "99"
