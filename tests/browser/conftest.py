"""Fixtures for the operator console tests: the real server (a subprocess on the test's own
database), headless Debian Chromium driven by selenium, and a folder for screenshots.

Run with `make test-browser`, which installs chromium, chromium-driver and selenium when they
are missing. Without selenium these tests are not even collected (so `make test` never needs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import StartServer
from ..servers import ServerProcess

try:
    import selenium  # noqa: F401
except ImportError:  # `make test`: the browser extra is not installed
    collect_ignore_glob = ["test_*.py"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "console-test-token-0123456789abcdef"

_screenshots: list[Path] = []


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """The folder screenshots go to: $BROWSER_SCREENSHOTS, or a new temporary folder (kept, and
    printed at the end of the run)."""
    named = os.environ.get("BROWSER_SCREENSHOTS")
    folder = Path(named) if named else Path(tempfile.mkdtemp(prefix="console-screenshots-"))
    folder.mkdir(parents=True, exist_ok=True)
    _screenshots.append(folder)
    return folder


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for folder in _screenshots:
        shots = sorted(p.name for p in folder.glob("*.png"))
        terminalreporter.write_line(f"console screenshots: {folder} ({', '.join(shots) or 'none'})")


class Api:
    """Plain HTTP to the server under test, as another client would."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def create_user(self, username: str, balance: int) -> dict[str, Any]:
        status, user = self.call("POST", "/api/v1/user/", {"username": username, "balance": balance})
        assert status == 201, user
        return user  # type: ignore[no-any-return]

    def post_task(self, user_id: str, task_type: str, amount: int) -> dict[str, Any]:
        status, task = self.call("POST", f"/api/v1/user/{user_id}/amount/", {"type": task_type, "amount": amount})
        assert status == 202, task
        return task  # type: ignore[no-any-return]

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a task (a transfer, a hold, a capture or void); the stored task (202)."""
        status, task = self.call("POST", path, body)
        assert status == 202, (path, status, task)
        return task  # type: ignore[no-any-return]

    def transfer(self, user_id: str, to: str, amount: int) -> dict[str, Any]:
        return self.post(f"/api/v1/user/{user_id}/transfer/", {"to": to, "amount": amount})

    def hold(self, user_id: str, amount: int, expires_in: int = 3600) -> dict[str, Any]:
        return self.post(f"/api/v1/user/{user_id}/holds/", {"amount": amount, "expires_in": expires_in})

    def wait_finished(self, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
        status, task = self.call("GET", f"/api/v1/task/{task_id}?wait={timeout}")
        assert status == 200 and task["status"] != "pending", task
        return task  # type: ignore[no-any-return]


StartConsoleServer = Callable[..., ServerProcess]


@pytest.fixture
def console_server(start_server: StartServer) -> StartConsoleServer:
    """start_server (tests/conftest.py), quieter and for these synchronous tests: it returns the
    started server; every one is stopped at the end."""
    return lambda **env: asyncio.run(start_server(**{"LOG_LEVEL": "WARNING", **env}))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, its console messages kept for get_log("browser")."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: make test-browser installs them (Debian packages)")
    os.environ["SE_OFFLINE"] = "true"  # no Selenium Manager downloads
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
