"""What the browser tests do with a page, shared by their modules: wait for a condition or a
text, read and fill fields, find the first element that matches, open the console's pages, and
tell a reload from a page that stayed."""

from __future__ import annotations

from typing import Any

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

LIVE_WITHIN = 2.0  # seconds: a task finished elsewhere shows this soon, without a reload
IGNORED = (NoSuchElementException, StaleElementReferenceException)


def wait(driver: Any, condition: Any, message: str, timeout: float = 10.0) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=IGNORED).until(
        condition, message=message
    )


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def wait_text(driver: Any, element_id: str, expected: str, timeout: float = 10.0) -> str:
    """Wait until the element's text contains `expected`; returns the text."""
    return str(
        wait(
            driver,
            lambda d: expected in (t := text_of(d, element_id)) and t,
            f"#{element_id} never said {expected!r} (it says {text_of(driver, element_id)!r})",
            timeout,
        )
    )


def errors_in_console(driver: Any, *, api_refusals: bool = False) -> list[dict[str, Any]]:
    """The browser's SEVERE log entries. With api_refusals, an API call answered 4xx (which
    Chromium logs as a failed resource) is expected and left out."""

    def expected(entry: dict[str, Any]) -> bool:
        message = entry.get("message", "")
        return api_refusals and entry.get("source") == "network" and "/api/v1/" in message and "status of 4" in message

    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and not expected(e)]


def fill(driver: Any, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def submit(driver: Any, form_id: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{form_id} button[type=submit]").click()


def first(driver: Any, css: str) -> Any:
    """The first element that matches `css`, or None."""
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def row(driver: Any, table_body: str, task_id: str) -> Any:
    return first(driver, f'#{table_body} tr[data-task-id="{task_id}"]')


def open_dashboard(driver: Any, server: Any) -> None:
    driver.get(server.url + "/console/")
    wait_text(driver, "stats-state", "Live")
    wait_text(driver, "feed-state", "Live.")


def open_user(driver: Any, server: Any, user_id: str) -> None:
    driver.get(f"{server.url}/console/user/{user_id}")
    wait_text(driver, "stream-state", "Live")
    wait(driver, lambda d: text_of(d, "user-balance") != "\u2013", "the balance never showed")


def mark_page(driver: Any) -> None:
    """A value that a reload would lose: checked by still_same_page()."""
    driver.execute_script("window.__consoleTestMark = 'same page'")


def still_same_page(driver: Any) -> bool:
    return driver.execute_script("return window.__consoleTestMark") == "same page"  # type: ignore[no-any-return]
