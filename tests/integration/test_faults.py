"""Faults injected into real runs, and what survives them (the fault table of docs/reliability.md, row by row).

Each case asserts that nothing finished is lost, nothing is left running (no llama-server, Locust, llama-perplexity
or compiler mentioning the test's private paths) and the error is one clear line. Real builds, real llama.cpp
tools, real Locust; the runs are cut down (SmolLM2-135M, short prompts, few questions) to stay short.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness.build import Build
from harness.config import Experiment, LoadConfig, ServerConfig
from harness.context import RunContext
from harness.errors import LoadTestError
from harness.loadtest import LoadSummary, run_load_stage, run_variant
from harness.loadtest.summary import Attempts
from harness.process import running, spawn
from harness.records import read_record
from harness.rundir import RunDir
from locustfiles import read_records
from tests.integration.helpers import (
    REPO,
    error_line,
    llamasys,
    processes_mentioning,
    start_cli,
    stopped_at_the_end,
    wait_until,
    write_models,
)

pytestmark = pytest.mark.integration

DEMO = REPO / "harness" / "experiments" / "demo.toml"
# The demo cut down: two variants, few questions, two short load steps on llama-server only.
SMALL = [
    "--set", 'variants=[{name="F16", type="F16"}, {name="Q4_0", type="Q4_0"}]',
    "--set", 'mmlu.subjects=["anatomy", "astronomy", "virology"]',
    "--set", "mmlu.per_subject=2",
    "--set", "mmlu.kld_chunks=2",
    "--set", "load.prompt_tokens=64",
    "--set", "load.output_tokens=48",
    "--set", "load.steps=[1, 2]",
    "--set", "load.requests_per_user=2",
    "--set", 'targets=[{kind="llama-server"}]',
    "--set", "load.search=false",
    "--set", "tune.enabled=false",  # the demo tunes Q4_K_M-imat, which this cut has not
]  # fmt: skip
LOAD = {"prompt_tokens": 64, "output_tokens": 16, "steps": [1, 2], "requests_per_user": 2,
        "request_timeout_s": 120.0, "ready_timeout_s": 120.0, "sample_interval_s": 0.25}  # fmt: skip
SHARED = ("builds", "sources", "downloads", "datasets", "mmlu", "kld", "corpus", "hardware", "thirdparty", "cpu",
          "probe")  # fmt: skip


@pytest.fixture(scope="module")
def env(cache_dir: Path, current_build) -> dict[str, str]:
    return {"LLAMASYS_CACHE_DIR": str(cache_dir)}


def experiment(run_dir: Path, **load: object) -> Experiment:
    return Experiment(name="faults", run_dir=run_dir, load=LoadConfig(**{**LOAD, **load}),
                      server=ServerConfig(threads=1))  # fmt: skip


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def commands(proc: subprocess.Popen) -> list[tuple[str, str]]:
    """(name, command line) of each live descendant of `proc`; those that end while we look are left out."""
    found = []
    for p in descendants(proc):
        with contextlib.suppress(psutil.Error):
            found.append((p.name(), " ".join(p.cmdline())))
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running (not reaped zombies)."""
    living = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                living.append(p)
        except psutil.NoSuchProcess:
            pass
    return living


def step_recorded(records: Path, users: int) -> bool:
    try:
        return any(s.users == users for s in read_records(records)[1])
    except (FileNotFoundError, ValueError):
        return False


def stage_state(run: RunDir, stage: str) -> str | None:
    try:
        return json.loads(run.manifest.read_text())["stages"].get(stage, {}).get("state")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def private_cache(tmp_path: Path, shared: Path, *, except_for: tuple[str, ...] = (), models: bool = True) -> Path:
    """A cache of this test's own that reaches the shared one's entries through links, so that what the test breaks
    or makes afresh (`except_for`) is its own; `models` links the demo's checkpoint and GGUF but no made model."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in SHARED:
        if name not in except_for and (shared / name).exists():
            (cache / name).symlink_to(shared / name)
    if models:
        (cache / "models").mkdir()
        for entry in (shared / "models").glob("smollm2*"):
            if not entry.name.endswith(".lock"):
                (cache / "models" / entry.name).symlink_to(entry)
    return cache


# ---------------------------------------------------------------- Ctrl-C at each stage


def test_ctrl_c_during_the_build_leaves_no_compiler_and_no_entry(current_build: Build, tmp_path: Path):
    cache = private_cache(tmp_path, Path(current_build.bin_dir).parents[2], except_for=("builds",), models=False)
    identity = ["--set", "llamacpp.build_number=11312", "--set", "llamacpp.build_commit='0c1e57098'"]
    proc = start_cli("build", "--source", "local", "--path", str(current_build.tree), "--cache-dir", str(cache),
                     "--no-progress", *identity, env={})  # fmt: skip
    with stopped_at_the_end(proc):

        def compiling() -> bool:  # the build proper, not CMake's compiler checks during configure
            procs = commands(proc)
            building = any(" --build " in cmdline for _, cmdline in procs)
            return building and any(name in ("cc1plus", "cc1") for name, _ in procs)

        wait_until(compiling, proc, 300, "the compiler ran")
        children = descendants(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; finished work is kept" in err
    assert alive(children) == []  # cmake, make and every compiler are gone
    work = cache / "builds"
    assert not [p for p in work.iterdir() if not p.name.startswith(".")]  # no build entry to be taken as finished
    assert any(work.glob(".work-*/tree/CMakeCache.txt"))  # the work tree is kept: a retry compiles incrementally


def test_ctrl_c_during_the_models_stage(cache_dir: Path, current_build: Build, tmp_path: Path):
    cache = private_cache(tmp_path, cache_dir)
    run = RunDir(tmp_path / "run")
    args = ["run", str(DEMO), "--run-dir", str(run.root), "--cache-dir", str(cache), "--no-progress", *SMALL]
    proc = start_cli(*args, env={})
    with stopped_at_the_end(proc):
        converting = lambda: any("hf_to_gguf_wrapper" in cmdline for _, cmdline in commands(proc))  # noqa: E731
        wait_until(converting, proc, 600, "the conversion started")
        children = descendants(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert alive(children) == []
    assert stage_state(run, "models") == "interrupted" and run.report.is_file()
    # No temporary entry is left to be taken for a finished one; whatever was finished is sealed.
    made = [p for p in (cache / "models").iterdir() if not p.is_symlink() and not p.name.endswith(".lock")]
    assert not [p for p in made if p.name.startswith(".tmp-")]
    assert all((p / ".integrity.json").is_file() for p in made)


def test_ctrl_c_during_mmlu_keeps_the_models(env, tmp_path: Path):
    run = RunDir(tmp_path / "run")
    args = ["run", str(DEMO), "--run-dir", str(run.root), "--no-progress", *SMALL, "--set", "mmlu.per_subject=20"]
    proc = start_cli(*args, env=env)
    with stopped_at_the_end(proc):
        perplexity = lambda: any(name == "llama-perplexity" for name, _ in commands(proc))  # noqa: E731
        wait_until(lambda: stage_state(run, "mmlu") == "running" and perplexity(), proc, 600, "llama-perplexity ran")
        children = descendants(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert alive(children) == []
    assert (stage_state(run, "models"), stage_state(run, "mmlu")) == ("done", "interrupted")
    assert run.models_json.is_file()
    assert json.loads(run.results.read_text())["missing"]  # the partial report says what is missing


def test_a_tool_killed_in_one_variants_mmlu_leaves_the_others_and_the_load_then_exits_6(env, tmp_path: Path):
    # Q4_0's llama-perplexity --multiple-choice is killed as the kernel's OOM killer would (SIGKILL): F16 is
    # scored, the load stage still measures both variants, the report shows the failure, and the run ends with
    # the MMLU error's exit code, naming the signal and the command.
    run = RunDir(tmp_path / "run")
    proc = start_cli("run", str(DEMO), "--run-dir", str(run.root), "--no-progress", *SMALL, env=env)
    with stopped_at_the_end(proc):

        def q4_0_scoring() -> list[psutil.Process]:
            return [p for p in descendants(proc) if "--multiple-choice" in _cmdline(p) and "Q4_0" in _cmdline(p)]

        wait_until(lambda: bool(q4_0_scoring()), proc, 900, "Q4_0's MMLU run")
        for victim in q4_0_scoring():
            victim.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 6, err[-3000:]
    line = error_line(err)
    assert "MMLU failed for Q4_0" in line and "killed by SIGKILL: out of memory?" in line and "command: " in line
    states = {k: v["state"] for k, v in json.loads(run.manifest.read_text())["stages"].items()}
    assert states == {
        "build": "done", "models": "done", "mmlu": "failed", "kld": "done", "load": "done", "report": "done",
    }  # fmt: skip
    results = json.loads(run.results.read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["F16"]["quality"]["accuracy"] is not None
    assert "SIGKILL" in by_name["Q4_0"]["quality"]["mmlu_failure"]
    assert all(by_name[n]["speeds"]["llama-server"]["steps"] for n in ("F16", "Q4_0"))
    assert 'data-failure="mmlu"' in run.report.read_text()


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_ctrl_c_in_the_last_variants_load_then_resume_measures_only_the_rest(env, tmp_path: Path):
    """The issue's "done when": interrupted during the last variant's load, the run again re-measures only the
    steps that had not finished (the kept records keep their timestamps), and the partial report showed them."""
    run = RunDir(tmp_path / "run")
    args = ["run", str(DEMO), "--run-dir", str(run.root), "--no-progress", *SMALL, "--set", "load.drain_grace_s=2"]
    records = run.load("llama-server", "Q4_0") / "requests.jsonl"
    proc = start_cli(*args, env=env)
    with stopped_at_the_end(proc):
        wait_until(lambda: step_recorded(records, 1), proc, 1500, "Q4_0's first step finished")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert processes_mentioning(str(run.root)) == []
    partial = read_record(run.load_summary("llama-server", "Q4_0"), LoadSummary)
    assert not partial.complete and partial.error == "interrupted (Ctrl-C)" and [s.users for s in partial.steps] == [1]
    results = json.loads(run.results.read_text())
    assert any(m.startswith("load: Q4_0 on llama-server (partial: steps measured 1;") for m in results["missing"])
    q4 = next(v for v in results["variants"] if v["name"] == "Q4_0")
    assert [s["users"] for s in q4["speeds"]["llama-server"]["steps"]] == [1]  # shown in the report
    assert 'class="bad partial-load"' in run.report.read_text()
    before, _ = read_records(records)
    kept = {(r.user_id, r.seq): r.sent_at for r in before if r.users == 1 and r.measured}
    f16 = run.load_summary("llama-server", "F16").stat().st_mtime_ns

    again = llamasys("run", str(DEMO), "--run-dir", str(run.root), "--no-progress", *SMALL,
                     "--set", "load.drain_grace_s=2", env=env, timeout=1500)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert run.load_summary("llama-server", "F16").stat().st_mtime_ns == f16  # a finished variant: not touched
    summary = read_record(run.load_summary("llama-server", "Q4_0"), LoadSummary)
    assert summary.complete and [(s.users, s.attempt) for s in summary.steps] == [(1, 1), (2, 2)]
    assert [a.outcome for a in summary.attempts] == ["interrupted", "complete"]
    after, _ = read_records(records)
    assert {(r.user_id, r.seq): r.sent_at for r in after if (r.user_id, r.seq) in kept} == kept
    # Nothing of step 1 was sent again: every request of the second attempt belongs to step 2 or its warm tail.
    second = [r for r in after if r.run == summary.attempts[1].run_id]
    assert second and {r.users for r in second if r.measured} == {2}
    results = json.loads(run.results.read_text())
    assert results["missing"] == []
    attempts = next(v for v in results["variants"] if v["name"] == "Q4_0")["speeds"]["llama-server"]["attempts"]
    assert [(a["outcome"], a["steps"]) for a in attempts] == [("interrupted", [1]), ("complete", [2])]
    assert all(isinstance(a["server"]["pid"], int) and a["server"]["started_at"] > 1e9 for a in attempts)


@contextlib.contextmanager
def a_variant_mid_request(
    tmp_path: Path, build: Build, smollm2: Path, *, drain_grace_s: float
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A child process measuring one step of 2 users with long outputs, yielded once both users are streaming;
    (the child, its load output directory). The child is stopped on the way out whatever the test did."""
    exp = experiment(tmp_path / "run", steps=[2], requests_per_user=3, output_tokens=1500, drain_grace_s=drain_grace_s)
    out = tmp_path / "run" / "load" / "llama-server" / "Q4_1"
    model = tmp_path / "model.gguf"  # a private path: every child process of this run mentions tmp_path
    model.symlink_to(smollm2)
    code = (
        "from pathlib import Path\n"
        "from harness.config import Experiment; from harness.context import RunContext\n"
        "from harness.build import Build; from harness.loadtest import run_variant\n"
        f"exp = Experiment.model_validate_json({exp.model_dump_json()!r})\n"
        f"build = Build.model_validate_json({build.model_dump_json()!r})\n"
        f"run_variant(RunContext.of(exp, build), 'Q4_1', Path({str(model)!r}))\n"
    )
    child = spawn([sys.executable, "-c", code], log_path=tmp_path / "child.log", cwd=REPO, env=dict(os.environ))
    with running(child, grace_s=30):
        # Both users' requests are in flight: the server has started a task for each (its log says so).
        server = out / "server.log"
        wait_until(lambda: server.exists() and server.read_text(errors="replace").count("processing task") >= 2, None,
                   180, "requests in flight")  # fmt: skip
        yield child, out


def test_ctrl_c_twice_stops_at_once(current_build: Build, smollm2: Path, tmp_path: Path):
    # Long requests and a long grace: the first Ctrl-C would wait up to 120 s for them; the second does not wait.
    with a_variant_mid_request(tmp_path, current_build, smollm2, drain_grace_s=120) as (child, out):
        os.kill(child.pid, signal.SIGINT)
        # The first Ctrl-C reached Locust (it says so as it begins to wait for its users) before the second is sent.
        log = out / "locust.log"
        wait_until(lambda: "Exiting due to CTRL+C" in log.read_text(errors="replace"), None, 60, "Locust stopping")
        os.kill(child.pid, signal.SIGINT)
        started = time.monotonic()
        child.wait(timeout=100)
        waited = time.monotonic() - started
    assert waited < 60, f"the second Ctrl-C still waited {waited:.0f} s of the 120 s grace"
    assert processes_mentioning(str(tmp_path)) == []
    assert "KeyboardInterrupt" in (tmp_path / "child.log").read_text()


def test_ctrl_c_once_lets_requests_finish_for_the_grace_then_records_them(current_build: Build, smollm2, tmp_path):
    with a_variant_mid_request(tmp_path, current_build, smollm2, drain_grace_s=1) as (child, out):
        os.kill(child.pid, signal.SIGINT)
        child.wait(timeout=100)
    assert processes_mentioning(str(tmp_path)) == []  # no llama-server and no Locust left behind
    assert "Exiting due to CTRL+C" in (out / "locust.log").read_text()  # Locust was asked, not killed,
    assert (out / "locust_stats.csv").exists() and (out / "locust.html").exists()  # so it wrote its reports
    requests, _ = read_records(out / "requests.jsonl")
    # The two in-flight requests got the 1 s grace, then were aborted and recorded as such.
    assert len(requests) == 2 and all(not r.ok and r.error.startswith("interrupted") for r in requests)
    (attempt,) = read_record(out / "attempts.json", Attempts).attempts
    assert attempt.outcome == "interrupted" and attempt.failed_requests == 2 and attempt.steps == []


# ---------------------------------------------------------------- the harness killed, two runs, a read-only run dir


def test_sigkill_of_the_harness_then_resume_and_one_writer_per_run_dir(env, tmp_path: Path):
    run = RunDir(tmp_path / "run")
    args = ["run", str(DEMO), "--run-dir", str(run.root), "--no-progress", *SMALL]
    records = run.load("llama-server", "F16") / "requests.jsonl"
    proc = start_cli(*args, env=env)
    with stopped_at_the_end(proc):
        wait_until(lambda: stage_state(run, "models") is not None, proc, 600, "the run started")
        second = llamasys(*args, env=env, timeout=120)  # the same run directory while the first runs
        assert second.returncode == 2
        assert f"run directory {run.root} is in use by another llamasys run (pid {proc.pid}" in error_line(
            second.stderr
        )
        wait_until(lambda: step_recorded(records, 1), proc, 1500, "F16's first step finished")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    # The kernel stops what the harness started (parent-death signal): nothing is left.
    wait_until(lambda: processes_mentioning(str(run.root)) == [], None, 30, "the children to die")
    before, _ = read_records(records)
    kept = {(r.user_id, r.seq): r.sent_at for r in before if r.users == 1 and r.measured}

    again = llamasys(*args, env=env, timeout=1500)  # the lock died with the killed run
    assert again.returncode == 0, again.stderr[-3000:]
    summary = read_record(run.load_summary("llama-server", "F16"), LoadSummary)
    assert [(s.users, s.attempt) for s in summary.steps] == [(1, 1), (2, 2)]
    assert summary.attempts[0].outcome == "interrupted" and "harness stopped" in summary.attempts[0].error
    after, _ = read_records(records)
    assert {(r.user_id, r.seq): r.sent_at for r in after if (r.user_id, r.seq) in kept} == kept


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` made unwritable for this process: chmod for a normal user; root ignores modes, so the immutable flag."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        undo = ["chmod", "755", str(path)]
    else:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        undo = ["chattr", "-i", str(path)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_two_runs_on_different_run_dirs_share_one_cache(cache_dir: Path, current_build: Build, tmp_path: Path):
    # Started together on an empty model cache: one converts and quantizes, the other waits for the entries and
    # uses them; both finish with the same files listed.
    cache = private_cache(tmp_path, cache_dir)
    procs = [
        start_cli(
            "models",
            "-e",
            str(DEMO),
            "--run-dir",
            str(tmp_path / name),
            "--cache-dir",
            str(cache),
            "--no-progress",
            *SMALL,
            env={},
        )  # fmt: skip
        for name in ("one", "two")
    ]
    results = []
    for proc in procs:
        with stopped_at_the_end(proc):
            results.append(proc.communicate(timeout=900))
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    errs = [err for _, err in results]
    assert sum(err.count("converting demo model") for err in errs) == 1, errs
    assert sum(err.count("quantizing Q4_0") for err in errs) == 1, errs
    one, two = (json.loads((tmp_path / name / "models" / "models.json").read_text()) for name in ("one", "two"))
    assert [v["path"] for v in one["variants"]] == [v["path"] for v in two["variants"]]
    assert not list((cache / "models").glob(".tmp-*"))  # nothing half-made left beside the entries


def test_read_only_run_dir_is_one_line_before_any_work(env, tmp_path: Path):
    run_dir = tmp_path / "run"
    with read_only(run_dir):
        result = llamasys("run", str(DEMO), "--run-dir", str(run_dir), *SMALL, env=env, timeout=120)
    assert result.returncode == 9
    assert f"the run directory {run_dir} is not writable (" in error_line(result.stderr)
    assert list(run_dir.iterdir()) == []  # nothing written, nothing started


# ---------------------------------------------------------------- servers that die or cannot start


def kill_the_server_in_step_2(records: Path) -> tuple[list[int], threading.Event]:
    """Watch `records` from a thread and SIGKILL this process's llama-server once a step-2 request is on record;
    returns the killed PIDs (filled by the thread) and the event that stops the watch."""
    killed: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 200
        while not killed and not stop.wait(0.05) and time.monotonic() < deadline:
            if records.exists() and '"users":2' in records.read_text():
                for proc in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if proc.name() == "llama-server":
                            proc.send_signal(signal.SIGKILL)
                            killed.append(proc.pid)

    threading.Thread(target=watch, daemon=True).start()
    return killed, stop


def test_server_killed_mid_step_is_restarted_for_the_remaining_steps(tmp_path: Path, current_build: Build, smollm2):
    exp = experiment(tmp_path, steps=[1, 2], requests_per_user=3)
    out = tmp_path / "load" / "llama-server" / "Q4_1"
    records = out / "requests.jsonl"
    killed, stop = kill_the_server_in_step_2(records)
    summary = run_variant(RunContext.of(exp, current_build, RunDir(tmp_path)), "Q4_1", smollm2)
    stop.set()
    assert killed
    first, second = summary.attempts
    assert (first.outcome, first.server_exit_code) == ("server died", -signal.SIGKILL)
    assert first.server["pid"] == killed[0] and first.server_log_tail and first.failed_requests > 0
    assert second.outcome == "complete" and second.server["pid"] != killed[0]
    # Step 1 from the first server, step 2 measured again whole on the second; the cut requests are on record.
    assert [(s.users, s.attempt, s.failures) for s in summary.steps] == [(1, 1, 0), (2, 2, 0)]
    requests, _ = read_records(records)
    assert [r for r in requests if not r.ok and r.run == first.run_id]
    assert not [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


def test_server_killed_with_no_restart_left_fails_the_variant(tmp_path: Path, current_build: Build, smollm2):
    exp = experiment(tmp_path, steps=[1, 2], requests_per_user=3, server_restarts=0)
    records = tmp_path / "load" / "llama-server" / "Q4_1" / "requests.jsonl"
    killed, stop = kill_the_server_in_step_2(records)
    died = r"Q4_1: llama-server died during the load test \(killed by SIGKILL: out of memory\? .*; log: "
    with pytest.raises(LoadTestError, match=died):
        run_variant(RunContext.of(exp, current_build, RunDir(tmp_path)), "Q4_1", smollm2)
    stop.set()
    assert killed
    requests, _ = read_records(records)
    assert any(r.ok and r.users == 1 for r in requests)  # what was measured before the kill is kept


def test_a_variant_whose_server_cannot_start_is_reported_and_the_others_run(current_build: Build, smollm2, tmp_path):
    # The same GGUF naming an architecture llama.cpp does not know: it reads as a GGUF, llama-server refuses it.
    data = bytearray(smollm2.read_bytes())
    at = data.find(b"general.architecture") + len(b"general.architecture") + 4 + 8  # key, type, length, value
    assert data[at : at + 5] == b"llama"
    data[at : at + 5] = b"llamb"
    alien = tmp_path / "alien.gguf"
    alien.write_bytes(data)
    run = RunDir(tmp_path)
    write_models(run, {"alien": alien, "Q4_1": smollm2})
    ctx = RunContext.of(experiment(tmp_path, steps=[1], requests_per_user=1), current_build, run)
    with pytest.raises(LoadTestError, match=r"^load failed for alien on llama-server: llama-server exited \(") as err:
        run_load_stage(ctx)
    assert "llamb" in str(err.value)  # the server's own reason, from its log
    done = read_record(run.load_summary("llama-server", "Q4_1"), LoadSummary)
    assert done.complete and [s.users for s in done.steps] == [1]  # the next variant ran after the failure
    failed = read_record(run.load_summary("llama-server", "alien"), LoadSummary)
    assert not failed.complete and "exited" in failed.error and failed.steps == []
    assert processes_mentioning(str(tmp_path)) == []


# ---------------------------------------------------------------- damaged cache entries


def test_a_truncated_cached_gguf_is_made_again_never_used(cache_dir: Path, current_build: Build, tmp_path: Path):
    cache = private_cache(tmp_path, cache_dir)
    run_dir = tmp_path / "run"
    args = ["models", "-e", str(DEMO), "--run-dir", str(run_dir), "--cache-dir", str(cache), "--no-progress", *SMALL]
    first = llamasys(*args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    variant = json.loads((run_dir / "models" / "models.json").read_text())["variants"][1]
    gguf = Path(variant["path"])
    size = gguf.stat().st_size
    with open(gguf, "r+b") as fh:
        fh.truncate(size // 2)  # what a full disk or a killed copy leaves
    again = llamasys(*args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"cache entry {gguf.parent} is damaged ({gguf.name} is {size // 2:,} bytes, {size:,} when it was made)" \
        in again.stderr, again.stderr  # fmt: skip
    assert gguf.stat().st_size == size  # quantized again, whole
    assert again.stderr.count("is damaged") == 1


def test_an_altered_build_is_never_used(current_build: Build, tmp_path: Path):
    shared = Path(current_build.bin_dir).parents[2]
    cache = private_cache(tmp_path, shared, except_for=("builds",), models=False)
    entry = cache / "builds" / Path(current_build.bin_dir).parent.name
    shutil.copytree(Path(current_build.bin_dir).parent, entry)
    assert llamasys("build", "--cache-dir", str(cache), timeout=300).returncode == 0  # the copy is intact: used
    with open(entry / "bin" / "llama-server", "r+b") as fh:
        fh.seek(4096)
        byte = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([byte[0] ^ 0xFF]))  # one bit pattern changed, same size
    # With no cmake on PATH the rebuild cannot start, which shows the altered entry was refused, not used.
    result = llamasys("build", "--cache-dir", str(cache), env={"PATH": str(tmp_path)}, timeout=300)
    assert f"cache entry {entry} is damaged (bin/llama-server has changed since it was made)" in result.stderr
    assert result.returncode == 3 and "cmake is not installed" in error_line(result.stderr)
    assert not entry.exists()  # removed: nothing can pick it up any more
