"""The load stage's other targets: llama-cpp-python's OpenAI server (its bindings, installed once into a cached
environment, on the harness's own llama.cpp build) and an endpoint that is already running. Real servers, real
Locust, exact counts on every request.

llama-cpp-python streams no usage: prompts are counted by its /extras/tokenize/count before any step and outputs by
the per-token data it streams (`logprobs`); every request below must come out exact, or fail with the reason.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from harness.build import Build
from harness.config import Experiment, LoadConfig, ServerConfig
from harness.context import RunContext
from harness.errors import LoadTestError
from harness.loadtest import run_load_stage, run_variant
from harness.rundir import RunDir
from harness.server import LlamaServer, ServerSizing, free_port
from harness.targets import TargetConfig, target_config
from harness.targets.llama_cpp_python import LlamaCppPythonEnv, LlamaCppPythonServer, llama_cpp_python_env
from locustfiles import read_records
from tests.integration.helpers import processes_mentioning, write_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"prompt_tokens": 64, "output_tokens": 16, "steps": [1, 2], "requests_per_user": 2,
         "request_timeout_s": 120.0, "ready_timeout_s": 120.0, "sample_interval_s": 0.25}  # fmt: skip
LLAMA_CPP_PYTHON = target_config(dict(kind="llama-cpp-python"))


def experiment(run_dir: Path, cache_dir: Path, *, targets: list[TargetConfig], **load: object) -> Experiment:
    return Experiment(
        name="targets", run_dir=run_dir, cache_dir=cache_dir, load=LoadConfig(**{**SMALL, **load}),
        server=ServerConfig(threads=1), targets=targets,
    )  # fmt: skip


def context(exp: Experiment, build: Build) -> RunContext:
    return RunContext.of(exp, build)


def assert_exact(records, prompt_tokens: int, output_tokens: int) -> None:
    assert records
    for r in records:
        assert r.ok, r.error
        assert (r.prompt_tokens, r.output_tokens) == (prompt_tokens, output_tokens)


@pytest.fixture(scope="module")
def venv(cache_dir: Path, current_build: Build, tmp_path_factory) -> LlamaCppPythonEnv:
    """llama-cpp-python 0.3.36 (the version whose sdist the current build comes from), installed once and cached."""
    exp = experiment(tmp_path_factory.mktemp("venv"), cache_dir, targets=[LLAMA_CPP_PYTHON])
    return llama_cpp_python_env(context(exp, current_build), "0.3.36")


def test_the_environment_is_made_once_and_reused(venv, cache_dir: Path, current_build: Build, tmp_path):
    assert venv.python.exists() and venv.venv.parent == cache_dir / "thirdparty"
    log = venv.venv.with_name(venv.venv.name + ".log")
    stamps = {p: p.stat().st_mtime_ns for p in (venv.venv, venv.python, log) if p.exists()}
    exp = experiment(tmp_path, cache_dir, targets=[LLAMA_CPP_PYTHON])
    assert llama_cpp_python_env(context(exp, current_build), "0.3.36") == venv
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no pip ran: nothing was touched


def test_its_bindings_load_the_builds_own_libraries(venv, cache_dir: Path, current_build: Build, smollm2, tmp_path):
    # The build came from 0.3.36's sdist with shared libraries: the environment compiled no llama.cpp of its own
    # (its package holds no library), and its server maps the build's libllama and libggml-cpu, the ones whose
    # instruction sets the build check proved on this machine.
    assert current_build.bindings == "0.3.36" and venv.libraries == current_build.bin_dir
    assert not list(venv.venv.rglob("libllama*.so*")) and not list(venv.venv.rglob("libggml*.so*"))
    exp = experiment(tmp_path, cache_dir, targets=[LLAMA_CPP_PYTHON])
    server = LlamaCppPythonServer(context(exp, current_build), LLAMA_CPP_PYTHON, {"Q4_1": smollm2},
                                  log_path=tmp_path / "server.log", embedding=False)  # fmt: skip
    with server:
        assert server.pid is not None
        maps = {line.split()[-1] for line in Path(f"/proc/{server.pid}/maps").read_text().splitlines()
                if ".so" in line}  # fmt: skip
    libraries = current_build.bin_dir.resolve()
    for name in ("libllama.so", "libggml-cpu.so", "libggml-base.so"):
        assert any(m.startswith(str(libraries / name)) for m in maps), (name, sorted(maps))
    assert f"LLAMA_CPP_LIB_PATH={current_build.bin_dir}" in (tmp_path / "server.log").read_text()
    assert server.describe()["llama_cpp"].startswith("llama-cpp-python 0.3.36's bindings on the harness's")


@pytest.mark.parametrize("api", ["openai", "chat"])
def test_llama_cpp_python_every_request_exact(venv, api: str, cache_dir: Path, current_build: Build, smollm2, tmp_path):
    model = tmp_path / "model.gguf"  # a private path: every process of this test mentions tmp_path
    model.symlink_to(smollm2)
    exp = experiment(tmp_path, cache_dir, api=api, targets=[LLAMA_CPP_PYTHON])
    summary = run_variant(context(exp, current_build), "Q4_1", model, target=exp.targets[0])
    out = RunDir(tmp_path).load("llama-cpp-python", "Q4_1")
    requests, steps = read_records(out / "requests.jsonl")
    assert_exact(requests, 64, 16)
    assert {r.route for r in requests} == {"/v1/completions" if api == "openai" else "/v1/chat/completions"}
    assert all(r.counts == "per-token data; prompt counted by the server's tokenizer" for r in requests)
    assert [s.users for s in summary.steps] == [1, 2] and all(s.requests >= s.users for s in summary.steps)
    assert summary.target_kind == "llama-cpp-python" and summary.serializes and summary.server["version"] == "0.3.36"
    assert processes_mentioning(str(tmp_path)) == []


def test_embeddings_user_on_both_servers(venv, cache_dir: Path, current_build: Build, smollm2, tmp_path):
    exp = experiment(
        tmp_path, cache_dir, api="embeddings", prompt_tokens=48,
        targets=[target_config(dict(kind="llama-server")), LLAMA_CPP_PYTHON],
    )  # fmt: skip
    write_models(RunDir(tmp_path), {"Q4_1": smollm2})
    summaries = run_load_stage(context(exp, current_build))
    for target in ("llama-server", "llama-cpp-python"):
        summary = summaries[(target, "Q4_1")]
        requests, _ = read_records(RunDir(tmp_path).load(target, "Q4_1") / "requests.jsonl")
        assert_exact(requests, 48, 0)
        assert {r.route for r in requests} == {"/v1/embeddings"} and summary.api == "embeddings"
        assert all(s.input_tokens_per_s > 0 and s.e2e_s.n == s.requests for s in summary.steps)


def test_one_llama_cpp_python_server_for_several_models(venv, cache_dir: Path, current_build: Build, smollm2, tmp_path):
    other = tmp_path / "other.gguf"
    other.symlink_to(smollm2)
    target = target_config(dict(kind="llama-cpp-python", name="lcp-multi", multi_model=True))
    exp = experiment(tmp_path, cache_dir, steps=[1], targets=[target])
    write_models(RunDir(tmp_path), {"F16": smollm2, "copy": other})
    summaries = run_load_stage(context(exp, current_build))
    config = json.loads((RunDir(tmp_path).load_target("lcp-multi") / "llama-cpp-python.json").read_text())
    assert [m["model_alias"] for m in config["models"]] == ["F16", "copy"]  # one server, both models
    for variant in ("F16", "copy"):
        summary = summaries[("lcp-multi", variant)]
        assert summary.model_name == variant  # the users named the model; the results are attributed to it
        requests, _ = read_records(RunDir(tmp_path).load("lcp-multi", variant) / "requests.jsonl")
        assert_exact(requests, 64, 16)
    assert processes_mentioning(str(tmp_path)) == []


def test_llama_cpp_python_killed_mid_step(venv, cache_dir: Path, current_build: Build, smollm2, tmp_path):
    model = tmp_path / "model.gguf"
    model.symlink_to(smollm2)
    # No restart allowed: the crash ends the variant (test_faults.py shows the restart on llama-server).
    exp = experiment(tmp_path, cache_dir, requests_per_user=3, targets=[LLAMA_CPP_PYTHON], server_restarts=0)
    records = RunDir(tmp_path).load("llama-cpp-python", "Q4_1") / "requests.jsonl"
    killed: list[int] = []

    def kill_during_step_2() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and not killed:
            time.sleep(0.05)
            if records.exists() and '"users":2' in records.read_text():
                for proc in psutil.Process().children(recursive=True):
                    if "llama_cpp.server" in " ".join(proc.cmdline()):
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)

    killer = threading.Thread(target=kill_during_step_2, daemon=True)
    killer.start()
    with pytest.raises(LoadTestError, match="llama-cpp-python died during the load test"):
        run_variant(context(exp, current_build), "Q4_1", model, target=exp.targets[0])
    killer.join(timeout=5)
    assert killed
    requests, _ = read_records(records)
    assert any(r.ok and r.users == 1 for r in requests)  # what was measured before the kill is kept
    assert [r for r in requests if not r.ok] and all(r.error for r in requests if not r.ok)
    assert processes_mentioning(str(tmp_path)) == []


def test_external_endpoint_is_measured_as_it_is(cache_dir: Path, current_build: Build, smollm2, tmp_path):
    sizing = ServerSizing(parallel=2, prompt_tokens=64, output_tokens=16, margin_tokens=16)
    one_thread = ServerConfig(threads=1)
    with LlamaServer(current_build, smollm2, sizing, log_path=tmp_path / "server.log", settings=one_thread) as server:
        target = target_config(dict(kind="external", name="running", url=server.url))
        exp = experiment(tmp_path, cache_dir, targets=[target])
        summary = run_variant(context(exp, current_build), "endpoint", None, target=target)
        requests, _ = read_records(RunDir(tmp_path).load("running", "endpoint") / "requests.jsonl")
        assert_exact(requests, 64, 16)
        assert summary.target_kind == "external" and summary.server["llama_server"] is True
        # A model name the endpoint does not serve is one clear error before any load.
        wrong = target_config(dict(kind="external", name="wrong", url=server.url, model_name="no-such-model"))
        with pytest.raises(LoadTestError, match=r"does not serve model 'no-such-model'; it serves: "):
            run_variant(
                context(experiment(tmp_path, cache_dir, targets=[wrong]), current_build), "x", None, target=wrong
            )
        assert server.pid is not None and psutil.pid_exists(server.pid)  # an external endpoint is never stopped


def test_unreachable_endpoint_is_one_clear_error(cache_dir: Path, current_build: Build, tmp_path):
    target = target_config(dict(kind="external", name="gone", url=f"http://127.0.0.1:{free_port()}"))
    exp = experiment(tmp_path, cache_dir, targets=[target])
    with pytest.raises(LoadTestError, match=rf"target gone: cannot reach {target.url} \(.*refused"):
        run_variant(context(exp, current_build), "endpoint", None, target=target)
