"""The API docs page in a real browser: with reads protected it still opens from the console's
"API docs" link, shows the operations and offers Authorize (the document's bearer scheme)."""

from __future__ import annotations

from typing import Any

import pytest
from selenium.webdriver.common.by import By

from .conftest import TOKEN, StartConsoleServer
from .pages import errors_in_console, wait

pytestmark = pytest.mark.browser


def test_docs_open_from_the_console_with_reads_protected_and_offer_authorize(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server(API_TOKEN=TOKEN, API_TOKEN_PROTECT_READS="true")
    browser.get(server.url + "/console/")
    # The console asks for the token in a modal dialog at once; follow its "API docs" link's address.
    browser.get(browser.find_element(By.LINK_TEXT, "API docs").get_attribute("href"))
    wait(browser, lambda d: d.current_url.endswith("/api/v1/docs"), "the API docs link did not open the docs")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"), "the docs page shows no operation")
    authorize = wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "button.authorize"), "the docs page offers no Authorize"
    )[0]
    assert authorize.is_displayed()
    authorize.click()
    wait(browser, lambda d: "bearerAuth" in d.find_element(By.CSS_SELECTOR, ".modal-ux").text, "no bearer scheme")
    assert not [e for e in errors_in_console(browser, api_refusals=True) if "/api/v1/docs" in e["message"]]
