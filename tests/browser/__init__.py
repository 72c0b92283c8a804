"""Tests in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


def launch_chromium(pw: Any) -> Any:
    """A headless Chromium browser from a `sync_playwright()` handle; fails the test if chromium is missing."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (make test installs the Debian package)")
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
