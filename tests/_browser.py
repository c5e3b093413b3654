"""Open a static HTML page from disk in headless Chromium (the Debian package, driven by
Playwright's Python package through ``executable_path``; Playwright's own browser download is
never used) and report console errors and broken images."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The system Chromium: ``$NEARID_CHROMIUM`` or the first of ``_CANDIDATES`` on PATH."""
    given = os.environ.get("NEARID_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, _CANDIDATES) if p), None)


def require_browser() -> str:
    """Skip (with the reason) when Playwright or Chromium is missing; .ci/run installs both."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on PATH: apt-get install chromium (scripts/run-tests.sh does this where apt exists)")
    return path


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # {"src", "naturalWidth"} of every <img>
    load_seconds: float = 0.0

    @property
    def broken_images(self) -> list[str]:
        return [i["src"] for i in self.images if not i["naturalWidth"]]


def open_page(html_file: Path, screenshot: Path, full_page: bool = True) -> PageCheck:
    """Load ``html_file`` (``file://``), load every image (lazy ones too), screenshot it."""
    import time

    from playwright.sync_api import sync_playwright

    check = PageCheck()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=require_browser(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: check.page_errors.append(str(e)))
            page.on("requestfailed", lambda r: check.failed_requests.append(r.url))
            t0 = time.perf_counter()
            page.goto(html_file.resolve().as_uri(), wait_until="load")
            check.load_seconds = time.perf_counter() - t0
            # lazy images load only near the viewport: make them eager, then wait for all
            page.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=60_000)
            check.images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'), naturalWidth: i.naturalWidth}))")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return check
