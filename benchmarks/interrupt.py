"""How long Ctrl-C takes: from the signal to the process gone with the report rendered, during a load step at the
study's shape (2560 prompt / 768 output tokens, every user mid-request), once (in-flight requests get
load.drain_grace_s, then are aborted and recorded) and twice (the second press stops at once).

    .venv/bin/python benchmarks/interrupt.py                       # 4 users, the default 10 s grace
    .venv/bin/python benchmarks/interrupt.py --users 8 --grace 30

It runs `llamasys demo` (the models and MMLU are cached after the first demo) with one llama-server target and one
step, waits until every user is streaming, sends SIGINT (and a second one a second later for "twice"), and prints
the seconds to exit, whether report.html was rendered after the signal, and that no process of the run is left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def interrupt(args: argparse.Namespace, run_dir: Path, presses: int) -> dict:
    cmd = [
        sys.executable, "-m", "harness.cli", "demo", "--run-dir", str(run_dir), "--no-progress",
        "--set", f"load.prompt_tokens={args.prompt_tokens}", "--set", f"load.output_tokens={args.output_tokens}",
        "--set", f"load.steps=[{args.users}]", "--set", "load.search=false",
        "--set", f"load.drain_grace_s={args.grace}", "--set", 'targets=[{kind="llama-server"}]',
        "--set", "tune.enabled=false",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    locust_log = run_dir / "load" / "llama-server"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(locust_log.glob("*/locust.log"))
        if logs and "All users spawned" in logs[-1].read_text(errors="replace"):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        raise SystemExit(f"the load never started: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    time.sleep(args.streaming_s)  # every user mid-request
    children = psutil.Process(proc.pid).children(recursive=True)
    sent = time.monotonic()
    sent_wall = time.time()
    proc.send_signal(signal.SIGINT)
    if presses == 2:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=args.grace + 300)
    seconds = time.monotonic() - sent
    left = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    report = run_dir / "report.html"
    missing = json.loads((run_dir / "results.json").read_text())["missing"] if report.exists() else None
    return {
        "presses": presses,
        "exit_code": proc.returncode,
        "seconds_to_exit": round(seconds, 1),
        "report_rendered_after_signal": report.exists() and report.stat().st_mtime > sent_wall,
        "processes_left": left,
        "missing": missing,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=2560)
    parser.add_argument("--output-tokens", type=int, default=768)
    parser.add_argument("--grace", type=float, default=10.0, help="load.drain_grace_s")
    parser.add_argument("--streaming-s", type=float, default=15.0, help="how long the users stream before Ctrl-C")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="interrupt-"))
    for presses in (1, 2):
        print(json.dumps(interrupt(args, work / f"press-{presses}", presses)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
