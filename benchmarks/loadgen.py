"""Benchmark of the load generator itself (not of llama.cpp): how many streamed tokens/s one Locust process
sustains, and how late it sees the first token (TTFT error).

It runs the project's own locustfile (locustfiles/native.py, NativeCompletionUser and StepShape, as a separate
`locust --headless` process) against a fake llama-server that streams `/completion` SSE token events at a
controlled rate and reports, in its final event, the true time it sent the first token event. The fake server
exists only to measure the load generator; the product is proven against the real llama-server in the tests.

    .venv/bin/python benchmarks/loadgen.py                 # both measurements, figures as JSON and a summary
    .venv/bin/python benchmarks/loadgen.py serve --port N  # just the fake server (what the benchmark starts)

Targets: >= 20,000 streamed tokens/s per Locust process; median TTFT error < 1 ms at 8 users.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- fake server


def serve(port: int, *, token_interval_s: float, ttft_s: float, vocab: int = 4096) -> None:
    """A minimal HTTP/1.1 keep-alive server speaking just enough of llama-server's API for NativeCompletionUser."""
    from gevent import sleep
    from gevent.server import StreamServer

    token_chunk = _chunk(b'data: {"content":" tok","stop":false}\n\n')

    def respond(sock, status: str, body: bytes, content_type: str = "application/json") -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)

    def completion(sock, request: dict) -> None:
        n_predict = int(request.get("n_predict", 16))
        n_prompt = len(request.get("prompt") or [])
        received = time.time()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if ttft_s:
            sleep(ttft_s)
        first_sent = time.time()
        for i in range(n_predict):
            if i:
                # A zero interval still yields, so concurrent streams interleave as they would on a real server.
                sleep(token_interval_s)
            sock.sendall(token_chunk)
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

    def handle(sock, _address) -> None:
        reader = sock.makefile("rb")
        try:
            while True:
                request_line = reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = json.loads(reader.read(length) or b"{}") if length else {}
                if path == "/completion" and method == "POST":
                    completion(sock, body)
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


def _chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


# ---------------------------------------------------------------------------------------------- measurements


def run_locust(host: str, out: Path, *, users: int, duration_s: float, prompt: int, output: int) -> dict:
    """One headless Locust process (one step of `users`), sampled for CPU; returns its figures."""
    import psutil

    from harness.process import running, spawn, wait_for
    from locustfiles import read_records

    records = out / f"requests-{users}u-{output}.jsonl"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "locustfiles" / "native.py"), "NativeCompletionUser",
        "--headless", "--host", host, "--steps", str(users), "--step-duration", str(duration_s),
        "--prompt-tokens", str(prompt), "--output-tokens", str(output), "--records", str(records),
        "--request-timeout", "60", "--stop-timeout", "60", "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    proc = spawn(cmd, log_path=out / "locust.log")
    cpu: list[float] = []
    with running(proc, grace_s=10):
        ps = psutil.Process(proc.pid)
        ps.cpu_percent()
        deadline = time.monotonic() + duration_s + 120
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                cpu.append(ps.cpu_percent())
            except psutil.NoSuchProcess:
                break
        wait_for(lambda: proc.poll() is not None, timeout_s=5)
    requests, steps = read_records(records)
    if not steps or steps[-1].error:
        raise SystemExit(f"locust run failed ({steps[-1].error if steps else 'no step record'}); see {out}/locust.log")
    step = steps[-1]
    measured = [r for r in requests if r.measured and r.ok]
    failed = [r for r in requests if not r.ok]
    last_end = max(r.ended_at for r in measured)
    window = last_end - step.started_at
    tokens = sum(r.output_tokens or 0 for r in measured)
    errors_ms = [
        ((r.sent_at + r.ttft_s) - r.server_timings["first_token_sent_at"]) * 1000
        for r in measured
        if r.ttft_s is not None and r.server_timings
    ]
    return {
        "users": users,
        "output_tokens": output,
        "requests": len(measured),
        "failed": len(failed),
        "window_s": round(window, 3),
        "tokens_per_s": round(tokens / window, 1),
        "locust_cpu_percent_median": round(statistics.median(cpu), 1) if cpu else None,
        "ttft_error_ms_median": round(statistics.median(errors_ms), 3) if errors_ms else None,
        "ttft_error_ms_p90": round(_quantile(errors_ms, 0.9), 3) if errors_ms else None,
        "ttft_error_ms_p99": round(_quantile(errors_ms, 0.99), 3) if errors_ms else None,
    }


def _quantile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q * 100))


def benchmark(args: argparse.Namespace) -> dict:
    from harness.process import running, spawn, wait_for
    from harness.server import free_port

    out = Path(args.out or tempfile.mkdtemp(prefix="loadgen-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"throughput": [], "ttft": None, "out": str(out)}

    def fake_server(token_interval_s: float, ttft_s: float):
        port = free_port()
        cmd = [sys.executable, __file__, "serve", "--port", str(port),
               "--token-interval", str(token_interval_s), "--ttft", str(ttft_s)]  # fmt: skip
        proc = spawn(cmd, log_path=out / "fake-server.log")
        if not wait_for(lambda: _healthy(port), timeout_s=20):
            raise SystemExit(f"fake server did not start; see {out}/fake-server.log")
        return proc, f"http://127.0.0.1:{port}"

    # 1. Throughput: the server streams as fast as it can; the Locust process is the bottleneck.
    proc, host = fake_server(0.0, 0.0)
    with running(proc, grace_s=5):
        for users in args.users:
            figures = run_locust(host, out, users=users, duration_s=args.duration, prompt=256, output=768)
            results["throughput"].append(figures)
            print(json.dumps(figures), flush=True)
    # 2. TTFT error at 8 users and a realistic pace: 50 ms to the first token, then 100 tokens/s per stream.
    proc, host = fake_server(0.01, 0.05)
    with running(proc, grace_s=5):
        figures = run_locust(host, out, users=8, duration_s=args.duration, prompt=256, output=64)
        results["ttft"] = figures
        print(json.dumps(figures), flush=True)
    return results


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


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
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, token_interval_s=args.token_interval, ttft_s=args.ttft)
        return 0
    sys.path.insert(0, str(ROOT))
    results = benchmark(args)
    best = max(results["throughput"], key=lambda r: r["tokens_per_s"])
    ttft = results["ttft"]
    print(
        f"\nload generator: {best['tokens_per_s']:,.0f} streamed tokens/s in one Locust process "
        f"({best['users']} users, Locust CPU {best['locust_cpu_percent_median']}%); target >= 20,000"
    )
    print(
        f"TTFT error at 8 users: median {ttft['ttft_error_ms_median']} ms, p90 {ttft['ttft_error_ms_p90']} ms, "
        f"p99 {ttft['ttft_error_ms_p99']} ms; target median < 1 ms"
    )
    (Path(results["out"]) / "loadgen.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
