"""Shared headless-Chromium setup of the HTML report tests (Playwright driving /usr/bin/chromium)."""

from __future__ import annotations

import os
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
