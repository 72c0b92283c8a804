"""Our OpenAI Locust user against a server that is not llama-server: llama-cpp-python's own OpenAI server.

Proves the user runs headless against it through the harness's own Locust command and records, and reports
what that server cannot give: llama-cpp-python 0.3.36 drops `ignore_eos` (an unknown field) but forces the
length with `min_tokens`, and its stream carries no `usage` even when `stream_options.include_usage` asks,
so every streamed request is timed but recorded as failed because its lengths cannot be verified.

llama-cpp-python is a third-party program here, not part of the product: it is installed into its own virtual
environment in the test cache (compiled from the sdist once, ~10 min on 2 cores; pip keeps the wheel).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.cache import atomic_dir
from harness.config import LoadConfig
from harness.loadtest.runner import check_complete, headless_command, run_headless
from harness.process import spawn, stop
from harness.server import free_port
from harness.tools import run_logged
from tests.integration.helpers import processes_mentioning

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LLAMA_CPP_PYTHON = "0.3.36"
# Native CPU code, no libcurl (the model is a local file); two compile jobs for the 2 shared cores.
BUILD_ENV = {"CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
STARTUP_TIMEOUT_S = 120.0
UNVERIFIABLE = "the server did not report its token counts (timings/usage); the lengths cannot be verified"


def llama_cpp_python_venv(cache_dir: Path, log_path: Path) -> Path:
    """llama-cpp-python[server] in its own venv under the cache, keyed by version; built whole or not at all."""

    def fill(venv: Path) -> None:
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON}"],
        ):  # fmt: skip
            run = run_logged(cmd, log_path=log_path, env={**os.environ, **BUILD_ENV}, tail=30)
            assert run.ok, f"{' '.join(cmd)} failed ({run.code}):\n" + "\n".join(run.lines)

    return atomic_dir(cache_dir / "thirdparty" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-venv", fill)


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def answers_models(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False  # not listening yet


def test_openai_user_against_llama_cpp_python_reports_unverifiable_lengths(
    tmp_path: Path, cache_dir: Path, smollm2: Path
):
    venv = llama_cpp_python_venv(cache_dir, tmp_path / "pip.log")
    model = tmp_path / "model.gguf"  # a private path: every process of this test mentions tmp_path
    model.symlink_to(smollm2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_cmd = [
        venv / "bin" / "python", "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1",
    ]  # fmt: skip
    server = spawn(server_cmd, log_path=tmp_path / "server.log", cwd=tmp_path)
    cfg = LoadConfig(
        api="openai", prompt_tokens=64, output_tokens=16, steps=[1], requests_per_user=2,
        request_timeout_s=120.0, ready_timeout_s=120.0,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not answers_models(url):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"no answer from {url}/v1/models in {STARTUP_TIMEOUT_S:.0f} s"
            time.sleep(0.2)
        out = tmp_path / "load"
        out.mkdir()
        result = run_headless(
            headless_command(cfg, url, out),
            records=out / "requests.jsonl",
            log_path=out / "locust.log",
            deadline_s=300,
            watch=lambda: None if server.poll() is None else "llama-cpp-python's server died",
        )
        # Not streamed, the same length fields do give an exact count: min_tokens holds back end-of-sequence.
        forced = post_json(
            url + "/v1/completions",
            {"prompt": "Once upon a time", "max_tokens": 16, "min_tokens": 16, "ignore_eos": True, "stream": False},
        )
    finally:
        stop(server)
    check_complete(result, 1)
    assert processes_mentioning(str(tmp_path)) == []

    records = result.requests
    assert len(records) == 2 and {(r.api, r.route, r.status) for r in records} == {("openai", "/v1/completions", 200)}
    for r in records:
        # Streamed and timed like any request, but no server count came back: a failure that says why.
        assert r.measured and r.token_events >= 1 and r.ttft_s is not None and r.e2e_s is not None
        assert (r.prompt_tokens, r.output_tokens, r.server_timings) == (None, None, None)
        assert not r.ok and r.error == UNVERIFIABLE
    assert result.exit_code == 1  # Locust's own verdict on a run with failed requests
    assert f"POST /v1/completions (1 users): {UNVERIFIABLE}" in result.log_path.read_text()  # its error report
    assert forced["usage"]["completion_tokens"] == 16
