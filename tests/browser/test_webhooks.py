"""The console's webhooks page in a real browser: endpoints with their deliveries by status, the
latest failures with their error, and the retry button that sends one again (with the token the
webhook routes always need when one is set)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from ..helpers import wait_until
from ..webhook_receiver import Answer, Receiver
from .conftest import TOKEN, Api, StartConsoleServer
from .pages import errors_in_console, fill, first, wait, wait_text

pytestmark = pytest.mark.browser


class ThreadedReceiver:
    """The tests' webhook receiver on an event loop of its own (these tests are synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.receiver: Receiver = self.run(Receiver().start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.run(self.receiver.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def receiver() -> Any:
    threaded = ThreadedReceiver()
    yield threaded.receiver
    threaded.close()


def test_the_webhooks_page_shows_failures_and_retries_one(
    console_server: StartConsoleServer, browser: Any, receiver: Receiver
) -> None:
    server = console_server(
        API_TOKEN=TOKEN, WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_RETRY_SCHEDULE="0s", WEBHOOK_TIMEOUT="5"
    )
    api = Api(server.url, token=TOKEN)
    status, hook = api.call("POST", "/api/v1/webhooks/", {"url": receiver.url, "description": "shop"})
    assert status == 201, hook
    receiver.answer = Answer(500)
    user = api.create_user("Hooked", 10)
    task = api.wait_finished(api.post_task(user["id"], "replenishment", 5)["id"])

    (delivery,) = wait_until(
        lambda: api.call("GET", f"/api/v1/webhooks/{hook['id']}/deliveries/?status=failed")[1],
        timeout=15,
        what="the delivery failed",
    )

    browser.get(server.url + "/console/webhooks")
    # The webhook routes need the token even to read: the page asks for it.
    dialog = browser.find_element(By.ID, "token-dialog")
    wait(browser, lambda d: dialog.get_attribute("open") is not None, "the page never asked for the token")
    fill(browser, "token-input", TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_text(browser, "webhooks-state", "1 endpoint")
    endpoint = first(browser, f'#webhooks-body tr[data-webhook-id="{hook["id"]}"]')
    cells = [cell.text for cell in endpoint.find_elements(By.TAG_NAME, "td")]
    assert cells == [hook["id"], receiver.url, "task.done, task.cancelled", "enabled", "0", "0", "1"], cells
    failure = wait(
        browser,
        lambda d: first(d, f'#failures-body tr[data-delivery-id="{delivery["id"]}"]'),
        "the failure never showed",
    )
    assert task["id"] in failure.text and "HTTP 500" in failure.text

    receiver.answer = Answer(200)
    failure.find_element(By.TAG_NAME, "button").click()
    wait_text(browser, "retry-outcome", f"Delivery {delivery['id']} is due again now.")
    wait_text(browser, "failures-state", "No failed deliveries.", timeout=15)
    wait(
        browser,
        lambda d: (
            [c.text for c in first(d, "#webhooks-body tr").find_elements(By.TAG_NAME, "td")][4:] == ["0", "1", "0"]
        ),
        "the counts never showed the delivery delivered",
        timeout=15,
    )
    assert receiver.task_ids() == {task["id"]}
    wait_text(browser, "token-state", "API_TOKEN (read, write, admin)")
    assert errors_in_console(browser, api_refusals=True) == []
