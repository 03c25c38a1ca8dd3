"""The user page's balance-at lookup and statement form in a real browser against the real
server: the state at a time, the refusals (before the user existed, not a time), a statement's
summary, and its CSV downloaded through the API client under the server's file name."""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any

import pytest

from .conftest import Api, StartConsoleServer
from .pages import errors_in_console, fill, open_user, submit, text_of, wait_text

pytestmark = pytest.mark.browser


def test_balance_at_and_a_statement_with_its_csv(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    api = Api(server.url)
    alice = api.create_user("Alice", 100)
    first = api.wait_finished(api.post_task(alice["id"], "replenishment", 50)["id"])
    second = api.wait_finished(api.post_task(alice["id"], "write-off", 30)["id"])
    open_user(browser, server, alice["id"])

    fill(browser, "balance-at-time", first["processed_at"])
    submit(browser, "balance-at-form")
    text = wait_text(browser, "balance-at-outcome", f"after task {first['id']}")
    assert "balance 150, held 0, available 150" in text
    fill(browser, "balance-at-time", "2000-01-01T00:00:00Z")
    submit(browser, "balance-at-form")
    wait_text(browser, "balance-at-outcome", "The user was created later")
    fill(browser, "balance-at-time", "next tuesday-ish")
    submit(browser, "balance-at-form")
    wait_text(browser, "balance-at-outcome", "Time must be a date and time")

    # [first, second): the replenishment only.
    fill(browser, "statement-from", first["processed_at"])
    fill(browser, "statement-to", second["processed_at"])
    submit(browser, "statement-form")
    wait_text(browser, "statement-outcome", "Statement from")
    summary = [text_of(browser, f"statement-{name}") for name in ("opening", "credits", "debits", "closing", "entries")]
    assert summary == ["100", "50", "0", "150", "1 (1, 0)"]

    # The page's CSP keeps fetch() off blob: URLs: keep the Blob the page saves, to read it.
    browser.execute_script(
        "window.__blobs = []; const make = URL.createObjectURL;"
        "URL.createObjectURL = (blob) => { window.__blobs.push(blob); return make(blob); };"
    )
    browser.find_element("id", "statement-csv").click()
    wait_text(browser, "statement-outcome", "Downloaded user-")
    name = browser.execute_script("return document.getElementById('statement-download').download")
    downloaded = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];window.__blobs[0].text().then(done, (e) => done(String(e)));"
    )
    query = urllib.parse.urlencode({"from": first["processed_at"], "to": second["processed_at"], "format": "csv"})
    with urllib.request.urlopen(f"{server.url}/api/v1/user/{alice['id']}/statement?{query}", timeout=10) as response:
        expected = response.read().decode()
        disposition = response.headers["Content-Disposition"]
    assert downloaded == expected
    assert disposition == f'attachment; filename="{name}"' and name.startswith(f"user-{alice['id']}-")
    assert expected.splitlines()[2].startswith(f"{first['id']},")
    assert errors_in_console(browser, api_refusals=True) == []
