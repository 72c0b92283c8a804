"""Benchmark of the load generator itself (not of llama.cpp): how many streamed tokens/s one Locust process
sustains, how late it sees the first token (TTFT error), and how our OpenAI user compares with GuideLLM.

It runs the project's own locustfiles (native.py's NativeCompletionUser, openai_compat.py's OpenAICompletionUser,
each with StepShape as a separate `locust --headless` process) against a fake llama-server that streams `/completion`
and OpenAI `/v1/completions` SSE token events at a controlled rate and reports, in its final native event, the true
time it sent the first token event. For the comparison, GuideLLM runs against the same fake server with the same
lengths (256 in / 768 out), concurrency and duration; it is an optional peer, installed on first use into its own
virtualenv (<cache>/thirdparty/guidellm-<version>-venv, cache = $LLAMASYS_CACHE_DIR or ~/.cache/llamasys), never a
dependency of the project, and its synthetic prompts need a local Hugging Face tokenizer (the demo's SmolLM2 one).
The fake server exists only to measure load generators; the product is proven against the real llama-server in the
tests.

    .venv/bin/python benchmarks/loadgen.py                 # every measurement, figures as JSON and a summary
    .venv/bin/python benchmarks/loadgen.py --only openai   # just ours vs GuideLLM (--no-guidellm: just ours)
    .venv/bin/python benchmarks/loadgen.py serve --port N  # just the fake server (what the benchmark starts)

Targets: >= 20,000 streamed tokens/s per Locust process; median TTFT error < 1 ms at 8 users.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_MODEL = "loadgen-fake"  # the one model the fake server lists (GuideLLM asks /v1/models for it)
GUIDELLM_VERSION = "0.8.1"
PROMPT, OUTPUT = 256, 768  # tokens in and out of every throughput request
MEASUREMENTS = ("throughput", "ttft", "openai")


# ---------------------------------------------------------------------------------------------- fake server


def serve(port: int, *, token_interval_s: float, ttft_s: float, vocab: int = 4096) -> None:
    """A minimal HTTP/1.1 keep-alive server speaking just enough of llama-server's API for NativeCompletionUser,
    and of OpenAI's /v1/completions for OpenAICompletionUser and GuideLLM."""
    from gevent import sleep
    from gevent.server import StreamServer

    token_chunk = _chunk(b'data: {"content":" tok","stop":false}\n\n')
    openai_chunk = _chunk(b'data: {"choices":[{"text":" tok","index":0,"finish_reason":null}]}\n\n')
    openai_last = _chunk(b'data: {"choices":[{"text":" tok","index":0,"finish_reason":"length"}]}\n\n')

    def respond(sock, status: str, body: bytes, content_type: str = "application/json") -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)

    def stream_tokens(sock, n: int, chunk: bytes, last: bytes) -> float:
        """Send the event-stream head and `n` token events at the controlled pace; returns when the first went."""
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if ttft_s:
            sleep(ttft_s)
        first_sent = time.time()
        for i in range(n):
            if i:
                # A zero interval still yields, so concurrent streams interleave as they would on a real server.
                sleep(token_interval_s)
            sock.sendall(last if i == n - 1 else chunk)
        return first_sent

    def completion(sock, request: dict) -> None:
        n_predict = int(request.get("n_predict", 16))
        n_prompt = len(request.get("prompt") or [])
        received = time.time()
        first_sent = stream_tokens(sock, n_predict, token_chunk, token_chunk)
        final = {
            "content": "",
            "stop": True,
            "tokens_evaluated": n_prompt,
            "tokens_predicted": n_predict,
            "timings": {
                "prompt_n": n_prompt,
                "predicted_n": n_predict,
                "received_at": received,
                "first_token_sent_at": first_sent,
            },
        }
        sock.sendall(_chunk(b"data: " + json.dumps(final).encode() + b"\n\n") + b"0\r\n\r\n")

    def openai_completion(sock, request: dict) -> None:
        """OpenAI's /v1/completions: exactly `max_tokens` tokens, the prompt counted as `_prompt_tokens` says; the
        stream ends with a `usage` chunk when asked (stream_options.include_usage: ours and GuideLLM ask), then
        [DONE]. Not streamed: one JSON body with usage (what a user fitting a text prompt asks)."""
        n_prompt = _prompt_tokens(request.get("prompt"))
        if n_prompt is None:
            respond(sock, "400 Bad Request", b'{"error":{"message":"prompt: a string or a list of token ids"}}')
            return
        n_out = int(request.get("max_tokens") or 16)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        if not request.get("stream"):
            choice = {"text": " tok" * n_out, "index": 0, "finish_reason": "length"}
            body = {"object": "text_completion", "model": FAKE_MODEL, "choices": [choice], "usage": usage}
            respond(sock, "200 OK", json.dumps(body).encode())
            return
        stream_tokens(sock, n_out, openai_chunk, openai_last)
        tail = b""
        if (request.get("stream_options") or {}).get("include_usage"):
            tail = _chunk(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        sock.sendall(tail + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def handle(sock, _address) -> None:
        reader = sock.makefile("rb")
        try:
            while True:
                request_line = reader.readline()
                if not request_line:
                    return
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                path = target.split("?", 1)[0]
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = json.loads(reader.read(length) or b"{}") if length else {}
                if path == "/completion" and method == "POST":
                    completion(sock, body)
                elif path == "/v1/completions" and method == "POST":
                    openai_completion(sock, body)
                elif path == "/v1/models":
                    models = {"object": "list", "data": [{"id": FAKE_MODEL, "object": "model", "owned_by": "loadgen"}]}
                    respond(sock, "200 OK", json.dumps(models).encode())
                elif path == "/tokenize":
                    words = str(body.get("content", "")).split()
                    tokens = [hash(w) % vocab for w in words]
                    respond(sock, "200 OK", json.dumps({"tokens": tokens}).encode())
                elif path == "/props":
                    props = {"default_generation_settings": {"n_ctx": 1 << 20}, "total_slots": 1024}
                    respond(sock, "200 OK", json.dumps(props).encode())
                elif path == "/health":
                    respond(sock, "200 OK", b'{"status":"ok"}')
                else:
                    respond(sock, "404 Not Found", b'{"error":"not found"}')
        except (ConnectionError, OSError):
            return
        finally:
            reader.close()
            sock.close()

    server = StreamServer(("127.0.0.1", port), handle, backlog=1024)
    server.serve_forever()


def _prompt_tokens(prompt: object) -> int | None:
    """The fake tokenizer: a list of token ids counts its length, a text its whitespace-separated words (as
    /tokenize splits it), so a client that fits text against the usage gets exact lengths."""
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return _prompt_tokens(prompt[0])
    return None


def _chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


# ---------------------------------------------------------------------------------------------- measurements


class CpuSampler:
    """CPU% of process trees (a load generator may fork workers: GuideLLM does), sampled every half second and kept
    with their times, so only the measured window counts (not start-up, imports or prompt building)."""

    def __init__(self, **pids: int | None) -> None:
        import psutil

        self.roots = {name: psutil.Process(pid) for name, pid in pids.items() if pid}
        self.procs: dict[int, psutil.Process] = {}
        self.samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in self.roots}
        self.last = time.time()
        self.sample()  # primes cpu_percent, whose first call on a process measures nothing

    def sample(self) -> None:
        import psutil

        now = time.time()
        for name, root in self.roots.items():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            total = 0.0
            for proc in tree:
                known = self.procs.setdefault(proc.pid, proc)
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += known.cpu_percent()
            self.samples[name].append((self.last, now, total))
        self.last = now

    def watch(self, proc, timeout_s: float) -> None:
        """Sample until `proc` exits (or `timeout_s` passes)."""
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            self.sample()

    def median(self, name: str, start: float, end: float) -> float | None:
        """Median CPU% of `name`'s tree over the samples that lie wholly inside [start, end]."""
        values = [pct for since, at, pct in self.samples.get(name, []) if since >= start and at <= end]
        return round(statistics.median(values), 1) if values else None


def run_locust(
    host: str,
    out: Path,
    *,
    users: int,
    duration_s: float,
    prompt: int,
    output: int,
    kind: str = "native",
    extra_args: tuple[str, ...] = (),
    server_pid: int | None = None,
) -> dict:
    """One headless Locust process running the user of `kind` (locustfiles.USER_KINDS) for one step of `users`,
    sampled for CPU; returns its figures."""
    from harness.process import running, spawn, wait_for
    from locustfiles import USER_KINDS, read_records

    user = USER_KINDS[kind]
    records = out / f"requests-{kind}-{users}u-{output}.jsonl"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(user.path), user.user_class,
        "--headless", "--host", host, "--steps", str(users), "--step-duration", str(duration_s),
        "--prompt-tokens", str(prompt), "--output-tokens", str(output), "--records", str(records),
        "--request-timeout", "60", "--stop-timeout", "60", "--only-summary", "--loglevel", "WARNING", *extra_args,
    ]  # fmt: skip
    proc = spawn(cmd, log_path=out / "locust.log")
    with running(proc, grace_s=10):
        cpu = CpuSampler(locust=proc.pid, server=server_pid)
        cpu.watch(proc, timeout_s=duration_s + 120)
        wait_for(lambda: proc.poll() is not None, timeout_s=5)
    requests, steps = read_records(records)
    if not steps or steps[-1].error:
        raise SystemExit(f"locust run failed ({steps[-1].error if steps else 'no step record'}); see {out}/locust.log")
    step = steps[-1]
    measured = [r for r in requests if r.measured and r.ok]
    failed = [r for r in requests if not r.ok]
    if not measured:
        raise SystemExit(f"locust measured no successful request ({len(failed)} failed); see {records}")
    last_end = max(r.ended_at for r in measured)
    window = last_end - step.started_at
    tokens = sum(r.output_tokens or 0 for r in measured)
    errors_ms = [
        ((r.sent_at + r.ttft_s) - r.server_timings["first_token_sent_at"]) * 1000
        for r in measured
        if r.ttft_s is not None and r.server_timings
    ]
    return {
        "user": user.user_class,
        "users": users,
        "output_tokens": output,
        "requests": len(measured),
        "failed": len(failed),
        "window_s": round(window, 3),
        "tokens_per_s": round(tokens / window, 1),
        "locust_cpu_percent_median": cpu.median("locust", step.started_at, last_end),
        "server_cpu_percent_median": cpu.median("server", step.started_at, last_end),
        "ttft_error_ms_median": round(statistics.median(errors_ms), 3) if errors_ms else None,
        "ttft_error_ms_p90": round(_quantile(errors_ms, 0.9), 3) if errors_ms else None,
        "ttft_error_ms_p99": round(_quantile(errors_ms, 0.99), 3) if errors_ms else None,
    }


def _quantile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q * 100))


# ---------------------------------------------------------------------------------------------- GuideLLM (a peer)


class GuideLLMSkipped(Exception):
    """Why the comparison with GuideLLM cannot run here (it is optional: the rest of the benchmark goes on)."""


def guidellm_env(cache: Path, version: str = GUIDELLM_VERSION) -> Path:
    """GuideLLM's own virtualenv, <cache>/thirdparty/guidellm-<version>-venv, made once and reused: a peer the
    benchmark compares with, never a dependency of the project. Filled in a temporary sibling and renamed whole, so
    a killed install leaves nothing half made (its console scripts name the temporary path: run `python -m`)."""
    from harness.cache import atomic_dir
    from harness.tools import run_logged

    final = cache / "thirdparty" / f"guidellm-{version}-venv"
    log = final.with_name(final.name + ".log")
    # torch (a dependency of GuideLLM) pinned as the project pins it: unpinned, it resolves to a multi-GB CUDA build.
    constraints = ROOT / "requirements" / "constraints.txt"
    pin = ["-c", str(constraints)] if constraints.is_file() else []

    def fill(venv: Path) -> None:
        print(f"installing GuideLLM {version} once into {final} (log: {log})", flush=True)
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *pin,
             f"guidellm=={version}"],
        ):  # fmt: skip
            run = run_logged(cmd, log_path=log, tail=40)
            if not run.ok:
                raise GuideLLMSkipped(f"cannot install GuideLLM {version}: {run.why()} (log: {log})")

    try:
        return atomic_dir(final, fill)
    except OSError as exc:
        raise GuideLLMSkipped(f"cannot install GuideLLM {version} into {final}: {exc}") from None


def hf_tokenizer_dir(cache: Path) -> Path | None:
    """A local Hugging Face tokenizer for GuideLLM's synthetic prompts (there is no hub access): the project's demo
    leaves SmolLM2's in <cache>/models/smollm2-hf-*/."""
    found = [p for p in (cache / "models").glob("smollm2-hf-*") if (p / "tokenizer.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_guidellm(
    venv: Path,
    host: str,
    out: Path,
    *,
    users: int,
    duration_s: float,
    prompt: int,
    output: int,
    tokenizer: Path,
    server_pid: int | None = None,
) -> dict:
    """GuideLLM's `run` against the fake server's /v1/completions: concurrent profile at `users` streams for
    `duration_s`, synthetic prompts of `prompt` tokens (by `tokenizer`) asking `output` tokens; returns its figures."""
    from harness.process import running, spawn
    from harness.tools import error_line

    report = out / f"guidellm-{users}u-{output}.json"
    log = out / "guidellm.log"
    cmd = [
        str(venv / "bin" / "python"), "-m", "guidellm", "run",
        "--backend", f"kind=openai_http,target={host},request_format=/v1/completions",
        "--profile", f"kind=concurrent,streams={users}",
        "--constraint", f"kind=max_duration,seconds={duration_s:g}",
        "--data", f"kind=synthetic_text,prompt_tokens={prompt},output_tokens={output}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--output", f"kind=json,path={report}",
        "--disable-console-interactive",
    ]  # fmt: skip
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = spawn(cmd, log_path=log, env={**os.environ, **offline}, cwd=out)
    with running(proc, grace_s=10):
        cpu = CpuSampler(guidellm=proc.pid, server=server_pid)
        cpu.watch(proc, timeout_s=duration_s + 600)
    if proc.returncode != 0 or not report.is_file():
        lines = log.read_text(errors="replace").splitlines()[-60:] if log.is_file() else []
        raise GuideLLMSkipped(f"GuideLLM failed (exit {proc.returncode}): {error_line(lines)} (log: {log})")
    bench = json.loads(report.read_text())["benchmarks"][0]
    start, end = float(bench["start_time"]), float(bench["end_time"])
    done = bench["requests"].get("successful") or []
    cut = bench["requests"].get("incomplete") or []
    # The figure: GuideLLM's own headline output throughput, metrics.output_tokens_per_second.total.mean (its
    # "Output Tokens Per Sec" over all requests): every output token that arrived inside its measured window, cut
    # requests' tokens included, over the window (the mean of its duration-weighted rate distribution is that sum
    # over that time). Ours is the output tokens of the requests sent and finished inside the step over the time from
    # the step's start to the last of them ending. Both are streamed tokens delivered per second of wall time while
    # `users` streams were held open; ours leaves out the tokens of requests still in flight when the window closes,
    # so if anything it is a little low. Cross-check: GuideLLM's per-request output tokens (completed and cut) over
    # its window.
    tokens_per_s = float(bench["metrics"]["output_tokens_per_second"]["total"]["mean"])
    from_requests = sum(r.get("output_tokens") or 0 for r in done + cut) / (end - start)
    return {
        "version": GUIDELLM_VERSION,
        "users": users,
        "output_tokens": output,
        "requests": len(done),
        "incomplete": len(cut),
        "failed": len(bench["requests"].get("errored") or []),
        "wrong_length": sum(1 for r in done if r.get("output_tokens") != output),
        "window_s": round(end - start, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_from_requests": round(from_requests, 1),
        "processes": bench["scheduler_state"].get("num_processes"),
        "guidellm_cpu_percent_median": cpu.median("guidellm", start, end),
        "server_cpu_percent_median": cpu.median("server", start, end),
        "report": str(report),
        "command": cmd,
    }


# ---------------------------------------------------------------------------------------------- the benchmark


def benchmark(args: argparse.Namespace) -> dict:
    from harness.process import running, spawn, wait_for
    from harness.server import free_port

    out = Path(args.out or tempfile.mkdtemp(prefix="loadgen-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"throughput": [], "ttft": None, "openai": None, "out": str(out)}

    def fake_server(token_interval_s: float, ttft_s: float):
        port = free_port()
        cmd = [sys.executable, __file__, "serve", "--port", str(port),
               "--token-interval", str(token_interval_s), "--ttft", str(ttft_s)]  # fmt: skip
        proc = spawn(cmd, log_path=out / "fake-server.log")
        if not wait_for(lambda: _healthy(port), timeout_s=20):
            raise SystemExit(f"fake server did not start; see {out}/fake-server.log")
        return proc, f"http://127.0.0.1:{port}"

    # 1. Throughput: the server streams as fast as it can; the Locust process is the bottleneck.
    if "throughput" in args.only:
        proc, host = fake_server(0.0, 0.0)
        with running(proc, grace_s=5):
            for users in args.users:
                figures = run_locust(host, out, users=users, duration_s=args.duration, prompt=PROMPT, output=OUTPUT,
                                     server_pid=proc.pid)  # fmt: skip
                results["throughput"].append(figures)
                print(json.dumps(figures), flush=True)
    # 2. TTFT error at 8 users and a realistic pace: 50 ms to the first token, then 100 tokens/s per stream.
    if "ttft" in args.only:
        proc, host = fake_server(0.01, 0.05)
        with running(proc, grace_s=5):
            figures = run_locust(host, out, users=8, duration_s=args.duration, prompt=PROMPT, output=64)
            results["ttft"] = figures
            print(json.dumps(figures), flush=True)
    # 3. Ours against GuideLLM on OpenAI's /v1/completions: same server streaming as fast as it can, same lengths,
    # concurrency and duration. Both send text prompts (ours fitted to exact length against the server's usage).
    if "openai" in args.only:
        results["openai"] = compare_openai(args, out, fake_server)
    return results


def compare_openai(args: argparse.Namespace, out: Path, fake_server) -> dict:
    """OpenAICompletionUser and GuideLLM against one fake server; GuideLLM is skipped (with the reason) when it
    cannot be had."""
    from harness.cache import default_cache_dir
    from harness.process import running

    users = args.openai_users
    venv: Path | None = None
    skipped: str | None = "--no-guidellm" if args.no_guidellm else None
    if skipped is None:
        try:
            cache = default_cache_dir()
            tokenizer = Path(args.guidellm_tokenizer) if args.guidellm_tokenizer else hf_tokenizer_dir(cache)
            if tokenizer is None or not (tokenizer / "tokenizer.json").is_file():
                raise GuideLLMSkipped(
                    f"no local Hugging Face tokenizer for its synthetic prompts (looked for {cache}/models/"
                    "smollm2-hf-*/tokenizer.json, left by the project's demo; or pass --guidellm-tokenizer DIR)"
                )
            venv = guidellm_env(cache)
        except GuideLLMSkipped as exc:
            skipped = str(exc)
    comparison: dict = {"users": users, "prompt_tokens": PROMPT, "output_tokens": OUTPUT, "duration_s": args.duration}
    proc, host = fake_server(0.0, 0.0)
    with running(proc, grace_s=5):
        ours = run_locust(host, out, users=users, duration_s=args.duration, prompt=PROMPT, output=OUTPUT,
                          kind="openai", extra_args=("--prompt-format", "text"), server_pid=proc.pid)  # fmt: skip
        comparison["ours"] = ours
        print(json.dumps(ours), flush=True)
        if venv is not None:
            try:
                theirs = run_guidellm(venv, host, out, users=users, duration_s=args.duration, prompt=PROMPT,
                                      output=OUTPUT, tokenizer=tokenizer, server_pid=proc.pid)  # fmt: skip
                comparison["guidellm"] = theirs
                print(json.dumps(theirs), flush=True)
            except GuideLLMSkipped as exc:
                skipped = str(exc)
    if skipped is not None:
        comparison["guidellm"] = {"skipped": skipped}
        print(f"GuideLLM comparison skipped: {skipped}", flush=True)
    else:
        theirs = comparison["guidellm"]
        comparison["ratio"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
        # Per CPU-second too: on a small machine the load generator and the server share the cores.
        comparison["ours_tokens_per_cpu_s"] = _per_cpu(ours["tokens_per_s"], ours["locust_cpu_percent_median"])
        comparison["guidellm_tokens_per_cpu_s"] = _per_cpu(
            theirs["tokens_per_s"], theirs["guidellm_cpu_percent_median"]
        )
    return comparison


def _per_cpu(tokens_per_s: float, cpu_percent: float | None) -> float | None:
    return round(tokens_per_s / (cpu_percent / 100), 1) if cpu_percent else None


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def summary(results: dict) -> list[str]:
    """The figures a person reads, one line each, for the measurements that ran."""
    lines = []
    if results["throughput"]:
        best = max(results["throughput"], key=lambda r: r["tokens_per_s"])
        lines.append(
            f"load generator: {best['tokens_per_s']:,.0f} streamed tokens/s in one Locust process "
            f"({best['users']} users, Locust CPU {best['locust_cpu_percent_median']}%); target >= 20,000"
        )
    if ttft := results["ttft"]:
        lines.append(
            f"TTFT error at 8 users: median {ttft['ttft_error_ms_median']} ms, p90 {ttft['ttft_error_ms_p90']} ms, "
            f"p99 {ttft['ttft_error_ms_p99']} ms; target median < 1 ms"
        )
    if cmp := results["openai"]:
        ours, theirs = cmp["ours"], cmp["guidellm"]
        lines.append(
            f"OpenAI /v1/completions, {cmp['users']} users, {cmp['prompt_tokens']} in / {cmp['output_tokens']} out, "
            f"{cmp['duration_s']:g} s: ours (OpenAICompletionUser) {ours['tokens_per_s']:,.0f} streamed tokens/s "
            f"(one Locust process, CPU {ours['locust_cpu_percent_median']}%; server CPU "
            f"{ours['server_cpu_percent_median']}%)"
        )
        if "skipped" in theirs:
            lines.append(f"GuideLLM: skipped ({theirs['skipped']})")
        else:
            lines.append(
                f"GuideLLM {theirs['version']}: {theirs['tokens_per_s']:,.0f} streamed tokens/s ({theirs['processes']} "
                f"worker processes, CPU {theirs['guidellm_cpu_percent_median']}% in all; server CPU "
                f"{theirs['server_cpu_percent_median']}%); ours/GuideLLM = {cmp['ratio']:.2f}; per CPU-second "
                f"{cmp['ours_tokens_per_cpu_s'] or 0:,.0f} vs {cmp['guidellm_tokens_per_cpu_s'] or 0:,.0f} tokens"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    srv = sub.add_parser("serve", help="run only the fake streaming server")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--token-interval", type=float, default=0.0, help="seconds between token events per stream")
    srv.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token event")
    parser.add_argument("--users", type=int, nargs="+", default=[8, 32, 64], help="concurrency for throughput")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measurement")
    parser.add_argument("--out", type=str, default="", help="directory for records and logs (default: a temp dir)")
    parser.add_argument(
        "--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), help="run only these measurements"
    )
    parser.add_argument("--openai-users", type=int, default=32, help="concurrency for ours vs GuideLLM")
    parser.add_argument("--no-guidellm", action="store_true", help="measure ours on /v1/completions, not GuideLLM")
    parser.add_argument(
        "--guidellm-tokenizer", type=str, default="",
        help="local Hugging Face tokenizer directory for GuideLLM's prompts (default: the demo's SmolLM2 one)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, token_interval_s=args.token_interval, ttft_s=args.ttft)
        return 0
    sys.path.insert(0, str(ROOT))
    results = benchmark(args)
    print("\n" + "\n".join(summary(results)))
    (Path(results["out"]) / "loadgen.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
