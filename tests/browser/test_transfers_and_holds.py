"""The user page's transfers and holds in a real browser against the real server process and
database: held and available follow every change live, a transfer shows its outcome on the
sender's page and arrives on the recipient's without a reload, holds are placed, captured (in
part, too much, twice) and voided from the page, and a hold that expires shows released."""

from __future__ import annotations

from typing import Any

import pytest
from selenium.webdriver.common.by import By

from .conftest import Api, StartConsoleServer
from .pages import (
    LIVE_WITHIN,
    errors_in_console,
    fill,
    first,
    mark_page,
    open_user,
    still_same_page,
    submit,
    text_of,
    wait,
    wait_text,
)

pytestmark = pytest.mark.browser


def newest_history_row(driver: Any, task_type: str) -> Any:
    return first(driver, f'#history-body tr[data-type="{task_type}"]')


def hold_row(driver: Any, hold_id: str) -> Any:
    return first(driver, f'#holds-body tr[data-hold-id="{hold_id}"]')


def figures(driver: Any) -> tuple[str, str, str]:
    return text_of(driver, "user-balance"), text_of(driver, "user-held"), text_of(driver, "user-available")


def wait_figures(driver: Any, balance: str, held: str, available: str, timeout: float = 10.0) -> None:
    wait(
        driver,
        lambda d: figures(d) == (balance, held, available),
        f"balance, held, available never became {balance}, {held}, {available} (they are {figures(driver)})",
        timeout,
    )


def test_a_transfer_shows_done_and_reaches_the_recipients_page_live(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server()
    api = Api(server.url)
    alice = api.create_user("Alice", 500)
    bob = api.create_user("Bob", 0)

    open_user(browser, server, bob["id"])  # the recipient's page, open in a window of its own
    mark_page(browser)
    bob_window = browser.current_window_handle
    browser.switch_to.new_window("window")
    open_user(browser, server, alice["id"])
    wait_figures(browser, "500", "0", "500")

    fill(browser, "transfer-to", bob["id"])
    fill(browser, "transfer-amount", "120")
    submit(browser, "action-transfer")
    outcome = wait_text(browser, "transfer-outcome", "Done")
    assert f"transfer out of 120 to user {bob['id']}" in outcome and "Balance now 380" in outcome
    wait_figures(browser, "380", "0", "380")
    sent = wait(browser, lambda d: newest_history_row(d, "transfer"), "the transfer is not in the history")
    assert f"transfer to user {bob['id']}" in sent.text and sent.get_attribute("data-status") == "done"
    link = sent.find_element(By.LINK_TEXT, f"user {bob['id']}")
    assert link.get_attribute("href").endswith(f"/console/user/{bob['id']}")

    fill(browser, "transfer-amount", "5000")  # more than the available balance
    submit(browser, "action-transfer")
    outcome = wait_text(browser, "transfer-outcome", "Cancelled")
    assert "insufficient_funds" in outcome
    assert browser.find_element(By.ID, "transfer-outcome").get_attribute("data-kind") == "cancelled"
    wait(
        browser,
        lambda d: newest_history_row(d, "transfer").get_attribute("data-status") == "cancelled",
        "the cancelled transfer is not in the history",
    )
    assert figures(browser) == ("380", "0", "380")
    assert errors_in_console(browser) == []

    fill(browser, "transfer-to", "987654")  # nobody: the API's 404, in words; the form stays usable
    fill(browser, "transfer-amount", "1")
    submit(browser, "action-transfer")
    outcome = wait_text(browser, "transfer-outcome", "Not found")
    assert "user 987654 does not exist" in outcome and "404 user_not_found" in outcome
    assert browser.find_element(By.CSS_SELECTOR, "#action-transfer fieldset").get_attribute("disabled") is None

    browser.switch_to.window(bob_window)
    incoming = wait(
        browser, lambda d: newest_history_row(d, "transfer-in"), "the transfer-in never showed", LIVE_WITHIN
    )
    assert f"transfer from user {alice['id']}" in incoming.text and incoming.get_attribute("data-status") == "done"
    assert incoming.find_element(By.LINK_TEXT, f"user {alice['id']}")
    wait_figures(browser, "120", "0", "120", LIVE_WITHIN)
    assert still_same_page(browser)
    assert errors_in_console(browser, api_refusals=True) == []


def test_holds_placed_captured_and_voided_from_the_user_page(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    api = Api(server.url)
    alice = api.create_user("Alice", 500)
    open_user(browser, server, alice["id"])
    mark_page(browser)
    assert text_of(browser, "holds-empty") == "No active hold."

    fill(browser, "hold-amount", "100")
    fill(browser, "hold-expires", "600")
    submit(browser, "action-hold")
    outcome = wait_text(browser, "hold-outcome", "Done")
    assert "hold of 100" in outcome and "available 400" in outcome
    wait_figures(browser, "500", "100", "400")
    first = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#holds-body tr"), "the hold is not listed")
    first_id = first.get_attribute("data-hold-id")
    assert first.get_attribute("data-status") == "active" and "100" in first.text

    fill(browser, "hold-amount", "50")
    fill(browser, "hold-expires", "")  # the server's default
    submit(browser, "action-hold")
    wait_text(browser, "hold-outcome", "hold of 50")
    wait_figures(browser, "500", "150", "350")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '#holds-body tr[data-status="active"]')) == 2, "")
    second_id = browser.find_elements(By.CSS_SELECTOR, "#holds-body tr")[1].get_attribute("data-hold-id")
    assert not browser.find_element(By.ID, "holds-empty").is_displayed()
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, button')]"
        ".filter((e) => e.labels ? e.labels.length === 0 && !e.textContent.trim() : false).map((e) => e.id)"
    )
    assert unlabelled == [], f"fields without a label: {unlabelled}"
    # Each row's buttons say which hold they act on (to a screen reader, "Capture" alone would not).
    assert (
        browser.find_element(
            By.CSS_SELECTOR, f'#holds-body tr[data-hold-id="{second_id}"] button.secondary'
        ).get_attribute("aria-label")
        == f"Void hold {second_id}"
    )

    def capture(hold_id: str, amount: str) -> None:
        fill(browser, f"capture-{hold_id}", amount)
        browser.find_element(By.CSS_SELECTOR, f'#holds-body form[data-hold-id="{hold_id}"] button[type=submit]').click()

    capture(first_id, "999")  # more than the hold
    outcome = wait_text(browser, "holds-outcome", "Cancelled")
    assert "amount_exceeds_hold" in outcome and f"hold {first_id}" in outcome
    assert figures(browser) == ("500", "150", "350")
    assert hold_row(browser, first_id).get_attribute("data-status") == "active"

    capture(first_id, "60")  # part of it: the rest is released
    outcome = wait_text(browser, "holds-outcome", "Done")
    assert f"capture of 60 (hold {first_id})" in outcome
    wait_figures(browser, "440", "50", "390")
    resolved = wait(
        browser,
        lambda d: (r := hold_row(d, first_id)).get_attribute("data-status") == "captured" and r,
        "the captured hold does not say so",
    )
    assert "captured 60" in resolved.text
    assert not resolved.find_elements(By.TAG_NAME, "button")  # nothing left to do with it

    # The same hold again, by its id (as an operator would from a ticket): no longer active.
    fill(browser, "hold-by-id-hold", first_id)
    fill(browser, "hold-by-id-amount", "10")
    submit(browser, "hold-by-id")
    outcome = wait_text(browser, "holds-outcome", "Cancelled")
    assert "hold_not_active" in outcome
    wait(browser, lambda d: newest_history_row(d, "capture").get_attribute("data-status") == "cancelled", "")
    assert figures(browser) == ("440", "50", "390")

    browser.find_element(By.CSS_SELECTOR, f'#holds-body form[data-hold-id="{second_id}"] button.secondary').click()
    outcome = wait_text(browser, "holds-outcome", "Done")
    assert f"void of 50 (hold {second_id})" in outcome
    wait_figures(browser, "440", "0", "440")
    wait(browser, lambda d: hold_row(d, second_id).get_attribute("data-status") == "voided", "the void is not shown")
    wait(browser, lambda d: d.find_element(By.ID, "holds-empty").is_displayed(), "'No active hold' never showed")

    # A hold placed by another client shows live, and so does what it holds.
    other = api.hold(alice["id"], 40)
    wait(browser, lambda d: hold_row(d, other["id"]), "another client's hold never showed", LIVE_WITHIN)
    wait_figures(browser, "440", "40", "400", LIVE_WITHIN)

    # Another user's hold is not captured from this page.
    bob = api.create_user("Bob", 100)
    bobs = api.hold(bob["id"], 10)
    api.wait_finished(bobs["id"])
    fill(browser, "hold-by-id-hold", bobs["id"])
    fill(browser, "hold-by-id-amount", "")
    submit(browser, "hold-by-id")
    outcome = wait_text(browser, "holds-outcome", f"belongs to user {bob['id']}")
    assert browser.find_element(By.CSS_SELECTOR, "#holds-outcome a").get_attribute("href").endswith(bob["id"])
    fill(browser, "hold-by-id-hold", "987654")
    submit(browser, "hold-by-id")
    wait_text(browser, "holds-outcome", "There is no hold 987654")
    other_task = api.post_task(alice["id"], "replenishment", 1)["id"]  # a task, not a hold
    fill(browser, "hold-by-id-hold", other_task)
    submit(browser, "hold-by-id")
    wait_text(browser, "holds-outcome", f"Task {other_task} is a replenishment, not a hold.")
    assert api.call("GET", f"/api/v1/hold/{bobs['id']}")[1]["status"] == "active"
    assert still_same_page(browser)
    assert errors_in_console(browser, api_refusals=True) == []


def test_a_hold_that_expires_shows_released_without_a_reload(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    api = Api(server.url)
    alice = api.create_user("Alice", 100)
    open_user(browser, server, alice["id"])
    mark_page(browser)

    fill(browser, "hold-amount", "30")
    fill(browser, "hold-expires", "2")
    submit(browser, "action-hold")
    wait_text(browser, "hold-outcome", "Done")
    hold = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#holds-body tr"), "the hold is not listed")
    hold_id = hold.get_attribute("data-hold-id")
    wait_figures(browser, "100", "30", "70")

    # Released by the server at its deadline, 2 s on: give it that and a few seconds more.
    release = wait(browser, lambda d: newest_history_row(d, "release"), "the release never showed", 8)
    assert f"release of 30 (hold {hold_id})" in release.text and release.get_attribute("data-status") == "done"
    wait(browser, lambda d: hold_row(d, hold_id).get_attribute("data-status") == "expired", "the hold is not expired")
    assert "expired: released" in hold_row(browser, hold_id).text
    wait_figures(browser, "100", "0", "100")
    assert f"Hold {hold_id} expired" in text_of(browser, "holds-note")
    assert text_of(browser, "holds-empty") == "No active hold."
    assert still_same_page(browser)
    assert errors_in_console(browser) == []
