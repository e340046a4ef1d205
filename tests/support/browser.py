"""Debian's Chromium, headless, driven by Playwright, for the live page's tests.

Playwright's own browser download cannot work here, so it launches `/usr/bin/chromium`
(`.ci/run` installs the package when it is missing). Without the background-networking
flags Chromium keeps trying to reach Google's hosts, which this machine refuses.

Playwright's sync API runs in one worker thread per session (`in_browser`), so the test's
Trio loop (and the fakes it serves) keeps running; a step that needs Trio calls
`trio.from_thread.run` from there. Under CI=true a missing Chromium or Playwright fails
the test; locally it is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

CHROMIUM = os.environ.get("DYNAMO_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 720}
PHONE = {"width": 390, "height": 844}
# Generous: the machine is shared; nothing here measures speed.
EXPECT_TIMEOUT_MS = 30_000


def require_browser() -> None:
    """Fails (CI=true) or skips unless Playwright and Chromium are installed."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        problem = f"playwright is not installed: {exc}"
    if problem is None and not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


async def in_browser(
    steps: Callable[[Any], None], *, screenshot: Path, viewport: dict = DESKTOP
) -> None:
    """Runs `steps(page)` in a fresh headless Chromium page; a screenshot of the end state
    (or of the failure) is saved at `screenshot` either way."""

    def session() -> None:
        from playwright.sync_api import expect, sync_playwright

        expect.set_options(timeout=EXPECT_TIMEOUT_MS)
        # trio-asyncio's policy would give Playwright's own asyncio loop a trio-asyncio
        # one; outside Trio it lets a thread choose its own (thread-local) policy.
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        try:
            run_session(sync_playwright)
        finally:
            asyncio.set_event_loop_policy(None)

    def run_session(sync_playwright) -> None:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=viewport)
                page.set_default_timeout(EXPECT_TIMEOUT_MS)
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                # A Content-Security-Policy refusal is only a console message.
                page.on("console", lambda message: errors.append(message.text)
                        if "Content Security Policy" in message.text else None)
                try:
                    steps(page)
                    assert errors == [], f"the page raised: {errors}"
                finally:
                    page.screenshot(path=str(screenshot), full_page=True)
            finally:
                browser.close()

    await trio.to_thread.run_sync(session)


def sign_in(page, url: str, token: str) -> None:
    from playwright.sync_api import expect

    page.goto(url + "/")
    page.get_by_label("Bearer token").fill(token)
    page.locator("#sign-in-form button").click()
    expect(page.locator("#live")).to_have_attribute("data-state", "on")
