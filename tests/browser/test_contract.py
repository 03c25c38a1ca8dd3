"""The console's side of the API contract that is coming (transfers, holds, held/available,
username search, newest-first history), against an in-memory stand-in that answers as the
contract says (contract_fake.py), so that the console is ready when the real backend lands."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from .contract_fake import FakeServer, Ledger
from .test_console import errors_in_console, fill, row, submit, text_of, wait, wait_text

pytestmark = pytest.mark.browser


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    ledger = Ledger()
    for user_id, name, balance in ((1, "Alice", 500), (2, "Albert", 0), (3, "Bob", 10)):
        ledger.users[user_id] = {"username": name, "balance": balance, "held": 0}
    for name in (f"Al{i:02d}" for i in range(25)):
        ledger.users[len(ledger.users) + 1] = {"username": name, "balance": 1, "held": 0}
    server = FakeServer(ledger).start()
    yield server
    server.stop()


def test_transfer_holds_and_held_available_on_the_user_page(fake: FakeServer, browser: Any) -> None:
    browser.get(fake.url + "/console/user/1")
    wait_text(browser, "stream-state", "Live")
    wait_text(browser, "user-balance", "500")
    wait(browser, lambda d: not d.find_element(By.ID, "held-tile").get_attribute("hidden"), "no Held tile")
    assert text_of(browser, "user-held") == "0" and text_of(browser, "user-available") == "500"
    assert text_of(browser, "history-note") == ""  # newest first: no fallback note

    fill(browser, "transfer-to", "2")
    fill(browser, "transfer-amount", "120")
    submit(browser, "action-transfer")
    assert "transfer out of 120 to user 2" in wait_text(browser, "transfer-outcome", "Done")
    wait_text(browser, "user-balance", "380")
    transfer_row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#history-body tr"), "no history row")
    assert "transfer to user 2" in transfer_row.text
    assert transfer_row.find_element(By.LINK_TEXT, "user 2").get_attribute("href").endswith("/console/user/2")

    fill(browser, "transfer-to", "2")
    fill(browser, "transfer-amount", "5000")
    submit(browser, "action-transfer")
    assert "insufficient_funds" in wait_text(browser, "transfer-outcome", "Cancelled")

    fill(browser, "hold-amount", "100")
    fill(browser, "hold-expires", "600")
    submit(browser, "action-hold")
    wait_text(browser, "hold-outcome", "Done")
    wait_text(browser, "user-held", "100")
    assert text_of(browser, "user-available") == "280"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#holds-body tr[data-hold-id="1"]'), "hold not listed")
    fill(browser, "hold-amount", "50")
    fill(browser, "hold-expires", "")
    submit(browser, "action-hold")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#holds-body tr[data-hold-id="2"]'), "hold 2 not listed")
    wait_text(browser, "user-held", "150")

    fill(browser, "capture-1", "999")
    browser.find_element(By.CSS_SELECTOR, '#holds-body form[data-hold-id="1"] button[type=submit]').click()
    assert "amount_exceeds_hold" in wait_text(browser, "holds-outcome", "Cancelled")
    fill(browser, "capture-1", "60")
    browser.find_element(By.CSS_SELECTOR, '#holds-body form[data-hold-id="1"] button[type=submit]').click()
    assert "capture of 60" in wait_text(browser, "holds-outcome", "Done")
    wait_text(browser, "user-balance", "320")
    wait_text(browser, "user-held", "50")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, '#holds-body tr[data-hold-id="1"]'), "hold 1 stayed")

    browser.find_element(By.CSS_SELECTOR, '#holds-body form[data-hold-id="2"] button.secondary').click()
    assert "void of 50" in wait_text(browser, "holds-outcome", "Done")
    wait_text(browser, "user-held", "0")
    wait_text(browser, "user-available", "320")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#holds-body tr"), "holds stayed listed")
    assert text_of(browser, "holds-empty") == "No active hold."

    # Another client's transfer to this user arrives as a transfer-in, live.
    browser.execute_script("window.__consoleTestMark = 'same page'")
    ledger = fake.ledger

    def transfer_in() -> None:
        ledger.users[1]["balance"] += 7
        ledger.finish(1, "transfer-in", 7, True, None, counterparty_id="3")

    fake.call(transfer_in)

    def newest_is_transfer_in(driver: Any) -> Any:
        newest = driver.find_element(By.CSS_SELECTOR, "#history-body tr")
        return "transfer from user 3" in newest.text and newest

    incoming = wait(browser, newest_is_transfer_in, "the transfer-in never showed")
    assert incoming.get_attribute("data-status") == "done"
    wait_text(browser, "user-balance", "327")
    assert browser.execute_script("return window.__consoleTestMark") == "same page"
    assert errors_in_console(browser) == []


def test_history_pages_newest_first(fake: FakeServer, browser: Any) -> None:
    for i in range(60):
        fake.ledger.finish(3, "replenishment", i + 1, True, None)
    browser.get(fake.url + "/console/user/3")
    wait_text(browser, "stream-state", "Live")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history-body tr")) == 50, "not a page of 50")
    ids = [int(r.get_attribute("data-task-id")) for r in browser.find_elements(By.CSS_SELECTOR, "#history-body tr")]
    assert ids == sorted(ids, reverse=True) and ids[0] == 60
    assert text_of(browser, "history-more") == "Load older tasks"
    browser.find_element(By.ID, "history-more").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history-body tr")) == 60, "older page missing")
    assert not browser.find_element(By.ID, "history-more").is_displayed()


def test_finding_users_by_username_prefix(fake: FakeServer, browser: Any) -> None:
    browser.get(fake.url + "/console/")
    wait_text(browser, "feed-state", "Live.")
    fill(browser, "search-input", "Al")
    submit(browser, "user-search")
    wait_text(browser, "search-state", "Page 1: 20 users whose name starts with “Al”")
    names = [
        r.find_elements(By.TAG_NAME, "td")[1].text for r in browser.find_elements(By.CSS_SELECTOR, "#users-body tr")
    ]
    assert names == sorted(names) and names[0] == "Al00"
    assert browser.find_element(By.ID, "users-available").is_displayed()
    browser.find_element(By.ID, "users-next").click()
    wait_text(browser, "search-state", "Page 2: 7 users")
    names = [
        r.find_elements(By.TAG_NAME, "td")[1].text for r in browser.find_elements(By.CSS_SELECTOR, "#users-body tr")
    ]
    assert names == ["Al20", "Al21", "Al22", "Al23", "Al24", "Albert", "Alice"]


def test_an_action_whose_endpoint_answers_404_is_disabled(fake: FakeServer, browser: Any) -> None:
    fake.ledger.missing.add("transfer")
    browser.get(fake.url + "/console/user/1")
    wait_text(browser, "stream-state", "Live")
    fill(browser, "transfer-to", "2")
    fill(browser, "transfer-amount", "1")
    submit(browser, "action-transfer")
    wait_text(browser, "transfer-outcome", "does not offer this action")
    fieldset = browser.find_element(By.CSS_SELECTOR, "#action-transfer fieldset")
    assert fieldset.get_attribute("disabled") is not None
    assert text_of(browser, "user-balance") == "500"
    assert row(browser, "history-body", "1") is None
