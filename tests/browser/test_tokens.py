"""The console and named tokens: it shows the token's name and scopes, and an action the token's
scopes do not allow is disabled with the reason, until a token that allows it is entered."""

from __future__ import annotations

from typing import Any

import pytest
from selenium.webdriver.common.by import By

from .conftest import TOKEN, Api, StartConsoleServer
from .pages import errors_in_console, fill, open_user, submit, text_of, wait, wait_text

pytestmark = pytest.mark.browser

WRITE_FORMS = ("action-replenish", "action-write-off", "action-transfer", "action-hold", "hold-by-id")


def _use_token(browser: Any, secret: str) -> None:
    browser.find_element(By.ID, "token-button").click()
    fill(browser, "token-input", secret)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()


def _disabled(browser: Any, form_id: str) -> bool:
    buttons = browser.find_elements(By.CSS_SELECTOR, f"#{form_id} button")
    return bool(buttons) and all(not b.is_enabled() for b in buttons)


def test_a_read_only_token_sees_the_write_actions_disabled_with_the_reason(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server(API_TOKEN=TOKEN)
    admin = Api(server.url, token=TOKEN)
    user = admin.create_user("Watched", 100)
    status, reader = admin.call("POST", "/api/v1/tokens/", {"name": "support-desk", "scopes": ["read"]})
    assert status == 201, reader
    status, writer = admin.call("POST", "/api/v1/tokens/", {"name": "shop-backend", "scopes": ["write"]})
    assert status == 201, writer
    admin.call("POST", f"/api/v1/user/{user['id']}/holds/", {"amount": 10})

    open_user(browser, server, user["id"])
    _use_token(browser, reader["secret"])
    wait_text(browser, "token-state", "support-desk (read)")
    for form in WRITE_FORMS:
        wait(browser, lambda d, form=form: _disabled(d, form), f"{form} not disabled for a read-only token")
        note = browser.find_element(By.CSS_SELECTOR, f"#{form} .scope-note").text
        assert "write scope" in note and "support-desk" in note, note
    # The listed hold's capture and void too (rows drawn after the token was checked included).
    wait(browser, lambda d: _disabled(d, "holds-body"), "the hold's capture and void not disabled")
    # Reading still works: the balance is shown.
    wait_text(browser, "user-balance", "100")

    _use_token(browser, writer["secret"])
    wait_text(browser, "token-state", "shop-backend (write)")
    for form in WRITE_FORMS:
        wait(browser, lambda d, form=form: not _disabled(d, form), f"{form} still disabled for a write token")
        assert not browser.find_elements(By.CSS_SELECTOR, f"#{form} .scope-note")
    fill(browser, "replenish-amount", "5")
    submit(browser, "action-replenish")
    wait_text(browser, "replenish-outcome", "Done")
    # The history names the token that posted each task.
    wait(
        browser,
        lambda d: any(c.text == "shop-backend" for c in d.find_elements(By.CSS_SELECTOR, "#history-body td.by")),
        "the history does not show who posted the replenishment",
    )
    assert not errors_in_console(browser, api_refusals=True)


def test_a_revoked_token_is_shown_as_not_accepted(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server(API_TOKEN=TOKEN)
    admin = Api(server.url, token=TOKEN)
    user = admin.create_user("Lost laptop", 1)
    status, laptop = admin.call("POST", "/api/v1/tokens/", {"name": "laptop", "scopes": ["read"]})
    assert status == 201
    assert admin.call("DELETE", f"/api/v1/tokens/{laptop['id']}")[0] == 200
    open_user(browser, server, user["id"])
    _use_token(browser, laptop["secret"])
    wait_text(browser, "token-state", "token not accepted")
    assert text_of(browser, "token-state") == "token not accepted"
    # Nothing is disabled: an action asks for a working token instead.
    assert not _disabled(browser, "action-replenish")
