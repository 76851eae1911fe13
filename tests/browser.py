"""Shared headless-Chromium setup of the HTML report tests (Playwright driving /usr/bin/chromium)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def need_chromium() -> None:
    """Skip the test when Chromium is missing (fail under CI, where it must be installed)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing under CI: apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); "
                    "the browser test is skipped outside CI")


def playwright_sync_api():
    """``playwright.sync_api`` (a hard requirement under CI, else the test is skipped without it)."""
    if os.environ.get("CI"):
        from playwright import sync_api

        return sync_api
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@contextlib.contextmanager
def opened_page(path: Path, ready: str, width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium page on ``path`` (file://), once ``ready`` (a selector) is there; asserts no
    console / page errors, no failed requests and nothing fetched but the file itself and data: URLs, on
    opening and again when the test is done with the page."""
    need_chromium()
    sync_api = playwright_sync_api()
    errors: list[str] = []
    failed: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(Path(path).resolve().as_uri())
            page.wait_for_selector(ready)
            assert not errors, errors
            assert not failed, failed
            assert all(u.startswith("file://") or u.startswith("data:") for u in requests), requests
            yield page
            assert not errors, errors  # nothing went wrong while the test drove the page either
            assert not failed, failed
        finally:
            browser.close()
