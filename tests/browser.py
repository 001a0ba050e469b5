"""Shared set-up for browser tests: a real studio server process and Debian's Chromium driven by Playwright.

Screenshots for the README are written to docs/images/ when STUDIO_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

# The first data check in a fresh server imports the ML libraries: give the UI time on a busy 2-core box.
expect.set_options(timeout=90_000)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, port: int, extra_env: dict | None = None, args: list[str] | None = None):
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}/"
        env = dict(os.environ, STUDIO_HOME=str(home), **(extra_env or {}))
        log_path = home.parent / f"server-{port}.log"
        self.log = open(log_path, "ab")
        start = self.log.tell()
        self.process = subprocess.Popen([sys.executable, "-m", "studio.cli", "serve", "--port", str(port), *(args or [])],
                                        cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        # Ready once the server says so: Gradio answers pages a moment before the studio's own routes
        # (/studio/live, /studio/runs) are in place, and a loaded CI machine stretches that moment.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            printed = log_path.read_bytes()[start:]
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {printed.decode(errors='replace')[-2000:]}")
            if b"LoRA Studio is ready on" in printed:
                urllib.request.urlopen(self.url, timeout=10)
                return
            time.sleep(0.5)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("studio") / "ws"
    home.mkdir()
    srv = Server(home, free_port())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def screenshot(page, name: str) -> None:
    if os.environ.get("STUDIO_SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / name), full_page=False)


def status_text(page, key: str) -> str:
    return page.locator(f"#{key}-run-status").inner_text()


def wait_status(page, key: str, predicate, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = status_text(page, key)
        if predicate(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"status never matched; last: {text!r}")


def step_of(text: str) -> int:
    import re
    match = re.search(r"step (\d+)/(\d+)", text)
    return int(match.group(1)) if match else 0


class Calls:
    """The page's requests to URLs holding one of `parts`, and when each was made."""

    def __init__(self, page, *parts: str):
        self.page, self.made = page, []
        page.on("request", lambda request: self.made.append((time.monotonic(), request.url))
                if any(part in request.url for part in parts) else None)

    def during(self, ms: int, quiet: str = "") -> list[str]:
        """Those made over the next `ms`, counted from the first moment 3 s after the last call (holding `quiet`):
        on a busy machine the events that a change sets off (a tab shown, a run's end) come seconds late."""
        deadline = time.monotonic() + 60
        while (last := [when for when, url in self.made if quiet in url]) and time.monotonic() - last[-1] < 3:
            assert time.monotonic() < deadline, f"the page kept calling {quiet or 'the server'}"
            self.page.wait_for_timeout(300)
        start = time.monotonic()
        self.page.wait_for_timeout(ms)
        return [url for when, url in self.made if when > start]
