"""Headless Debian Chromium driven by Playwright, never its own browser download (not a test module)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def log_in_to_label_studio(page: Any, url: str) -> None:
    """Log ``page`` in to the Label Studio at ``url`` as the tests' admin user."""
    from defect_assist_tools.local_label_studio import PASSWORD, USER

    page.goto(f"{url}/user/login/")
    page.fill("input[name=email]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda current: "/user/login" not in current, timeout=60_000)


@contextmanager
def headless_browser() -> Iterator[Any]:
    """A Playwright ``Browser`` on Debian's chromium; skips the test when chromium is not installed."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
