"""The Locust web UI as a user meets it: started by `llamasys serve`, driven in headless Chromium, stopped by Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.browser import launch_chromium
from tests.integration.helpers import REPO, processes_mentioning

pytestmark = pytest.mark.browser

ARTIFACTS = Path(os.environ.get("LLAMASYS_TEST_ARTIFACTS", REPO / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_ui(proc: subprocess.Popen, log: Path, web_port: int, timeout_s: float = 120) -> str:
    """Serve's output once it says the UI is up; fails with that output if serve exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Ctrl-C stops everything" in text or proc.poll() is not None:
            break
        time.sleep(0.2)
    assert f"Locust web UI at http://127.0.0.1:{web_port}" in text and "Ctrl-C stops everything" in text, text
    return text


def ttft_requests(page) -> int:
    """The '# Requests' count of the statistics table's TTFT row (0 while there is none)."""
    headers = [" ".join(h.split()) for h in page.locator("table thead th").all_inner_texts()]
    if "# Requests" not in headers:
        return 0
    column = headers.index("# Requests")
    row = page.locator("table tbody tr", has=page.get_by_role("cell", name="TTFT", exact=True))
    if row.count() == 0:
        return 0
    return int(row.first.locator("td").nth(column).inner_text().strip() or 0)


def test_web_ui_runs_a_test_in_chromium_and_stops_cleanly(cache_dir: Path, current_build, smollm2: Path, tmp_path):
    from playwright.sync_api import sync_playwright

    model = tmp_path / "model.gguf"  # a private path, so we find exactly our processes by their command lines
    model.symlink_to(smollm2)
    web_port = free_port()
    cmd = [sys.executable, "-m", "harness.cli", "serve", "--model", str(model), "--web-port", str(web_port),
           "--run-dir", str(tmp_path / "run"), "--set", "load.steps=[1]", "--set", "load.prompt_tokens=64",
           "--set", "load.output_tokens=8", "--set", "server.threads=1"]  # fmt: skip
    log = tmp_path / "serve.out"
    env = {**os.environ, "LLAMASYS_CACHE_DIR": str(cache_dir)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_ui(proc, log, web_port)
        ours = [p for p in processes_mentioning(str(tmp_path)) if p.pid != proc.pid]
        names = sorted(p.name() for p in ours)  # llama-server and the Locust web UI (a Python process)
        assert len(names) == 2 and names[0] == "llama-server" and names[1].startswith("python"), names

        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{web_port}/", wait_until="networkidle")
                # --class-picker ticks every user class; keep only the native /completion user.
                for name in ("NativeCompletionUser", "OpenAIChatUser", "OpenAICompletionUser", "EmbeddingsUser"):
                    row = page.locator("tr", has=page.get_by_role("cell", name=name, exact=True))
                    row.get_by_role("checkbox").set_checked(name == "NativeCompletionUser")
                page.locator("input[name=userCount]").fill("1")
                page.locator("input[name=spawnRate]").fill("1")
                page.get_by_role("button", name="Start", exact=True).click()

                deadline = time.monotonic() + 90
                while (count := ttft_requests(page)) < 1 and time.monotonic() < deadline:
                    assert proc.poll() is None, log.read_text(errors="replace")
                    page.wait_for_timeout(500)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
                assert count >= 1, page.locator("table").all_inner_texts()
                page.get_by_role("button", name="Stop", exact=True).click()
                page.get_by_text(re.compile(r"^stopped$", re.IGNORECASE)).wait_for(timeout=30_000)
            finally:
                browser.close()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")
        psutil.wait_procs(ours, timeout=15)
        left = processes_mentioning(str(tmp_path)) + processes_mentioning(f"--web-port {web_port}")
        assert [p for p in left if p.pid != proc.pid] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
