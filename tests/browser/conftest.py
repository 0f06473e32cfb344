"""A real browser (Debian's Chromium, headless, driven by Playwright) against
the platform running for real: gunicorn, the Celery worker and the relay."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..support import ROOT, Worker, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _ensure_chromium() -> str | None:
    """The path of Chromium, installing Debian's package when it is missing;
    None (with the reason) when that cannot be done here."""
    if Path(CHROMIUM).exists():
        return None
    if shutil.which("apt-get") is None:
        return "apt-get is not available to install chromium"
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", "chromium"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0 or not Path(CHROMIUM).exists():
        return f"could not install chromium: {result.stderr.strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser_session() -> Iterator[Any]:
    """Module-scoped: Playwright's sync API keeps an event loop marked running
    in this thread while it is started, which makes Django refuse ORM calls.
    The test thread is still synchronous, so the guard is lifted for these
    modules only, and Playwright is stopped before any other test runs."""
    problem = _ensure_chromium()
    if problem:
        pytest.skip(f"browser tests skipped: {problem}")
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="session")
def web_server(celery_worker: Worker) -> Iterator[str]:
    """gunicorn serving the test database, like `make run`'s web process."""
    port = _free_port()
    log = open(celery_worker.log_path.parent / "web.log", "ab")
    env = celery_worker.env() | {"DEBUG": "1"}  # DEBUG: whitenoise serves admin assets
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--no-control-socket",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:  # noqa: S310
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, interval=0.2, what="gunicorn to answer /healthz")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def page(
    browser_session: Any, artifacts_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """A fresh browser context; collects console errors; screenshots land in
    the session's test-artifacts/screenshots/."""
    context = browser_session.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    # JavaScript errors, and failed loads other than the favicon (no page of
    # ours links one; the browser asks anyway).
    page.console_errors = []  # type: ignore[attr-defined]
    page.on(
        "console",
        lambda message: (
            message.type == "error"
            and not message.text.startswith("Failed to load resource")
            and page.console_errors.append(message.text)  # type: ignore[attr-defined]
        ),
    )
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))  # type: ignore[attr-defined]
    page.on(
        "response",
        lambda response: (
            response.status >= 400
            and not response.url.endswith("/favicon.ico")
            and not getattr(page, "expect_http_errors", False)
            and page.console_errors.append(f"{response.status} {response.url}")  # type: ignore[attr-defined]
        ),
    )
    shots = artifacts_dir / "screenshots"
    shots.mkdir(exist_ok=True)
    page.shot = lambda name: page.screenshot(  # type: ignore[attr-defined]
        path=str(shots / f"{request.node.name}-{name}.png"), full_page=True
    )
    yield page
    context.close()


def login_admin(page: Any, base: str, username: str, password: str) -> None:
    page.goto(f"{base}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}/admin/")
