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


def stats_column(page, header: str) -> list[str]:
    """Every row's cell under `header` in the statistics table (the aggregated row included)."""
    headers = [" ".join(h.split()) for h in page.locator("table thead th").all_inner_texts()]
    if header not in headers:
        return []
    column = headers.index(header)
    return [row.locator("td").nth(column).inner_text().strip() for row in page.locator("table tbody tr").all()]


def test_web_ui_runs_a_test_in_chromium_and_stops_cleanly(cache_dir: Path, current_build, smollm2: Path, tmp_path):
    from playwright.sync_api import sync_playwright

    model = tmp_path / "model.gguf"  # a private path, so we find exactly our processes by their command lines
    model.symlink_to(smollm2)
    web_port = free_port()
    cmd = [sys.executable, "-m", "harness.cli", "serve", "--model", str(model), "--web-port", str(web_port),
           "--set", "load.steps=[1]", "--set", "load.prompt_tokens=64",
           "--set", "load.output_tokens=8", "--set", "server.threads=1"]  # fmt: skip
    log = tmp_path / "serve.out"
    env = {**os.environ, "LLAMASYS_CACHE_DIR": str(cache_dir)}
    with open(log, "w") as out:
        # No --run-dir: the run directory is named after the model served (runs/serve-model under the cwd).
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**env, "PYTHONPATH": str(REPO)})  # fmt: skip
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
                # As a person first meets it: only the user classes this server can serve are offered (no
                # embeddings user on a completion server), all ticked; Start with the defaults.
                classes = ("NativeCompletionUser", "OpenAIChatUser", "OpenAICompletionUser", "EmbeddingsUser")
                offered = [n for n in classes if page.get_by_role("cell", name=n, exact=True).count()]
                assert offered == ["NativeCompletionUser", "OpenAIChatUser", "OpenAICompletionUser"], offered
                page.get_by_role("button", name="Start", exact=True).click()

                deadline = time.monotonic() + 120
                while (count := ttft_requests(page)) < 2 and time.monotonic() < deadline:
                    assert proc.poll() is None, log.read_text(errors="replace")
                    page.wait_for_timeout(500)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
                assert count >= 2, page.locator("table").all_inner_texts()
                fails = stats_column(page, "# Fails")
                assert fails and all(f == "0" for f in fails), page.locator("table").all_inner_texts()
                page.get_by_role("button", name="Stop", exact=True).click()
                page.get_by_text(re.compile(r"^stopped$", re.IGNORECASE)).wait_for(timeout=30_000)
            finally:
                browser.close()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")
        assert (tmp_path / "runs" / "serve-model" / "load").is_dir()
        psutil.wait_procs(ours, timeout=15)
        left = processes_mentioning(str(tmp_path)) + processes_mentioning(f"--web-port {web_port}")
        assert [p for p in left if p.pid != proc.pid] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
