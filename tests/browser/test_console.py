"""The operator console in a real browser (headless Debian Chromium through selenium) against the
real server process and a real database: pages load without a browser error, forms and actions
work and say what happened, the live feed and the user page follow tasks posted by others without
a reload, the token is asked for and used, deep links work, and the layout holds at 1280 and
390 px (screenshots are written for a person to look at)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from message_broker.db.options import dsn_database

from .. import pg
from .conftest import TOKEN, Api, StartConsoleServer
from .pages import (
    LIVE_WITHIN,
    errors_in_console,
    fill,
    mark_page,
    open_dashboard,
    open_user,
    row,
    still_same_page,
    submit,
    text_of,
    wait,
    wait_text,
)

pytestmark = pytest.mark.browser


def test_pages_load_with_no_browser_error_and_every_field_labelled(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server()
    api = Api(server.url)
    user = api.create_user("Loaded", 500)
    api.wait_finished(api.post_task(user["id"], "replenishment", 5)["id"])

    for path, ready in (("/console/", "feed-state"), (f"/console/user/{user['id']}", "stream-state")):
        browser.get(server.url + path)
        wait_text(browser, ready, "Live")
        if path.startswith("/console/user/"):
            wait_text(browser, "user-balance", "505")
            wait(browser, lambda d: row(d, "history-body", "1"), "the history never showed task 1")
        else:
            wait_text(browser, "stats-state", "Live")
            wait_text(browser, "stat-database", "up")
            wait_text(browser, "stat-listener", "up")
        unlabelled = browser.execute_script(
            "return [...document.querySelectorAll('input, select')]"
            ".filter((e) => e.labels.length === 0).map((e) => e.id || e.name)"
        )
        assert unlabelled == [], f"{path}: fields without a label: {unlabelled}"
        assert browser.execute_script("return document.querySelectorAll('[aria-live], [role=status]').length") > 0
        assert errors_in_console(browser) == [], path


def test_stats_figures_follow_the_work(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    api = Api(server.url)
    user = api.create_user("Counted", 10)
    open_dashboard(browser, server)
    api.wait_finished(api.post_task(user["id"], "replenishment", 5)["id"])
    api.wait_finished(api.post_task(user["id"], "write-off", 100)["id"])  # cancelled
    description = browser.find_element(By.CSS_SELECTOR, "#rate-chart desc")
    wait(
        browser,
        lambda d: (
            all(f"{name}: " in (t := description.get_attribute("textContent")) for name in ("Accepted", "Applied"))
            and "peak 1" in t.split("Cancelled: ")[1]
        ),
        "the chart never counted the cancelled task",
    )
    wait(browser, lambda d: "ms" in text_of(d, "stat-p50"), "latency p50 never showed")
    polylines = browser.find_elements(By.CSS_SELECTOR, "#rate-chart polyline")
    assert len(polylines) == 3
    assert "last minute" in browser.find_element(By.CSS_SELECTOR, "#rate-chart desc").get_attribute("textContent")


def test_creating_a_user_with_the_form_shows_it_and_opens_it(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    open_dashboard(browser, server)
    fill(browser, "new-username", "Grace Hopper")
    fill(browser, "new-balance", "1200")
    submit(browser, "create-user")
    outcome = wait_text(browser, "create-outcome", "Created user")
    assert "Grace Hopper" in outcome and "1,200" in outcome
    created = browser.find_element(By.CSS_SELECTOR, "#users-body tr")
    assert "Grace Hopper" in created.text
    user_id = created.get_attribute("data-user-id")
    status, stored = Api(server.url).call("GET", f"/api/v1/user/{user_id}")
    assert status == 200 and stored == {
        "id": user_id,
        "username": "Grace Hopper",
        "balance": 1200,
        "held": 0,
        "available": 1200,
    }

    browser.find_element(By.LINK_TEXT, f"Open user {user_id}").click()
    wait_text(browser, "user-heading", f"User {user_id}")
    wait_text(browser, "user-balance", "1,200")
    assert text_of(browser, "user-name") == "Grace Hopper"


def test_the_create_form_works_from_the_keyboard_with_visible_focus(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server()
    open_dashboard(browser, server)
    body = browser.find_element(By.TAG_NAME, "body")
    body.click()
    for _ in range(40):  # Tab through the page until the username field has the focus
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.switch_to.active_element.get_attribute("id") == "new-username":
            break
    focused = browser.switch_to.active_element
    assert focused.get_attribute("id") == "new-username", "Tab never reached the username field"
    outline = browser.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused field shows no outline"
    focused.send_keys("Keyboard")
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "new-balance"
    browser.switch_to.active_element.send_keys(Keys.CONTROL, "a")
    browser.switch_to.active_element.send_keys("7", Keys.ENTER)
    wait_text(browser, "create-outcome", "Created user")


def test_a_task_posted_elsewhere_shows_live_in_the_feed_and_the_balance(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server()
    api = Api(server.url)
    user = api.create_user("Watched", 100)

    open_dashboard(browser, server)
    mark_page(browser)
    task = api.post_task(user["id"], "replenishment", 25)
    posted = time.monotonic()
    feed_row = wait(browser, lambda d: row(d, "feed-body", task["id"]), "the task never reached the feed", LIVE_WITHIN)
    assert time.monotonic() - posted <= LIVE_WITHIN
    assert "replenishment" in feed_row.text and "done" in feed_row.text and "125" in feed_row.text
    assert still_same_page(browser)

    open_user(browser, server, user["id"])
    assert text_of(browser, "user-balance") == "125"
    mark_page(browser)
    task = api.post_task(user["id"], "write-off", 40)
    wait(browser, lambda d: text_of(d, "user-balance") == "85", "the balance never followed", LIVE_WITHIN)
    wait(browser, lambda d: row(d, "history-body", task["id"]), "the history never showed the task", LIVE_WITHIN)
    assert still_same_page(browser)


def test_the_feed_pauses_resumes_and_filters(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    api = Api(server.url)
    user = api.create_user("Filtered", 10)
    open_dashboard(browser, server)

    done = api.post_task(user["id"], "replenishment", 1)
    wait(browser, lambda d: row(d, "feed-body", done["id"]), "the first task never reached the feed")

    browser.find_element(By.ID, "feed-pause").click()
    assert browser.find_element(By.ID, "feed-pause").get_attribute("aria-pressed") == "true"
    held = api.post_task(user["id"], "replenishment", 2)
    wait_text(browser, "feed-paused-note", "1 new task")
    assert row(browser, "feed-body", held["id"]) is None
    browser.find_element(By.ID, "feed-pause").click()
    wait(browser, lambda d: row(d, "feed-body", held["id"]), "the task kept aside never showed after Resume")

    cancelled = api.post_task(user["id"], "write-off", 10**6)
    wait(browser, lambda d: row(d, "feed-body", cancelled["id"]), "the cancelled task never reached the feed")
    Select(browser.find_element(By.ID, "feed-status")).select_by_value("cancelled")
    wait(browser, lambda d: row(d, "feed-body", done["id"]) is None, "the filter kept a done task")
    statuses = {r.get_attribute("data-status") for r in browser.find_elements(By.CSS_SELECTOR, "#feed-body tr")}
    assert statuses == {"cancelled"}
    assert "insufficient_funds" in row(browser, "feed-body", cancelled["id"]).text
    Select(browser.find_element(By.ID, "feed-status")).select_by_value("")
    Select(browser.find_element(By.ID, "feed-type")).select_by_value("write-off")
    wait(browser, lambda d: row(d, "feed-body", held["id"]) is None, "the type filter kept a replenishment")
    assert row(browser, "feed-body", cancelled["id"]) is not None


def test_finding_users_by_id_and_listing_them(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    api = Api(server.url)
    users = [api.create_user(f"Finder{i:02d}", i) for i in range(25)]
    open_dashboard(browser, server)

    fill(browser, "search-input", users[3]["id"])
    submit(browser, "user-search")
    wait_text(browser, "search-state", f"User {users[3]['id']} found")
    assert browser.find_element(By.CSS_SELECTOR, "#users-body tr").get_attribute("data-user-id") == users[3]["id"]

    fill(browser, "search-input", "987654")
    submit(browser, "user-search")
    wait_text(browser, "search-state", "There is no user 987654")

    fill(browser, "search-input", "")
    submit(browser, "user-search")
    wait_text(browser, "search-state", "Page 1: 20 users")
    browser.find_element(By.ID, "users-next").click()
    wait_text(browser, "search-state", "Page 2: 5 users")
    shown = [r.get_attribute("data-user-id") for r in browser.find_elements(By.CSS_SELECTOR, "#users-body tr")]
    assert shown == [u["id"] for u in users[20:]]
    browser.find_element(By.ID, "users-prev").click()
    wait_text(browser, "search-state", "Page 1: 20 users")

    def names(driver: Any) -> list[str]:
        return [
            r.find_elements(By.TAG_NAME, "td")[1].text for r in driver.find_elements(By.CSS_SELECTOR, "#users-body tr")
        ]

    api.create_user("Finder", 7)  # sorts before "Finder00": usernames in byte order
    fill(browser, "search-input", "Finder")
    submit(browser, "user-search")
    wait_text(browser, "search-state", "Page 1: 20 users whose name starts with “Finder”")
    assert names(browser) == ["Finder"] + [f"Finder{i:02d}" for i in range(19)]
    assert "Available" in browser.find_element(By.ID, "users-table").text
    browser.find_element(By.ID, "users-next").click()
    wait_text(browser, "search-state", "Page 2: 6 users")
    assert names(browser) == [f"Finder{i:02d}" for i in range(19, 25)]
    assert not browser.find_element(By.ID, "users-next").is_displayed()
    browser.find_element(By.ID, "users-prev").click()
    wait_text(browser, "search-state", "Page 1: 20 users whose name starts")

    fill(browser, "search-input", "Finder1")
    submit(browser, "user-search")
    wait_text(browser, "search-state", "Page 1: 10 users whose name starts with “Finder1”")
    assert not browser.find_element(By.ID, "users-next").is_displayed()
    fill(browser, "search-input", "finder")  # case matters
    submit(browser, "user-search")
    wait_text(browser, "search-state", "No users whose name starts with “finder”")
    assert not browser.find_element(By.ID, "users-table").is_displayed()


def test_the_history_pages_newest_first_and_live_tasks_go_on_top(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server()
    api = Api(server.url)
    user = api.create_user("Busy", 0)
    posted = [api.post_task(user["id"], "replenishment", i + 1) for i in range(60)]
    api.wait_finished(posted[-1]["id"])
    ids = [int(t["id"]) for t in posted]

    open_user(browser, server, user["id"])
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history-body tr")) == 50, "not a page of 50")
    shown = [int(r.get_attribute("data-task-id")) for r in browser.find_elements(By.CSS_SELECTOR, "#history-body tr")]
    assert shown == sorted(ids, reverse=True)[:50]
    more = browser.find_element(By.ID, "history-more")
    assert more.is_displayed() and more.text == "Load older tasks"
    more.click()
    wait(
        browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history-body tr")) == 60, "the older page never came"
    )
    shown = [int(r.get_attribute("data-task-id")) for r in browser.find_elements(By.CSS_SELECTOR, "#history-body tr")]
    assert shown == sorted(ids, reverse=True)
    wait(browser, lambda d: not d.find_element(By.ID, "history-more").is_displayed(), "Load older stayed")

    live = api.post_task(user["id"], "write-off", 5)
    top = wait(
        browser,
        lambda d: (
            (r := d.find_element(By.CSS_SELECTOR, "#history-body tr")).get_attribute("data-task-id") == live["id"] and r
        ),
        "the live task did not go on top",
        LIVE_WITHIN,
    )
    assert "write-off of 5" in top.text and top.get_attribute("data-status") == "done"
    assert text_of(browser, "user-balance") == f"{sum(range(1, 61)) - 5:,}"


def test_a_write_off_beyond_the_balance_shows_cancelled_with_its_reason(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server()
    user = Api(server.url).create_user("Short", 100)
    open_user(browser, server, user["id"])

    fill(browser, "write-off-amount", "250")
    submit(browser, "action-write-off")
    outcome = wait_text(browser, "write-off-outcome", "Cancelled")
    assert "insufficient_funds" in outcome
    assert browser.find_element(By.ID, "write-off-outcome").get_attribute("data-kind") == "cancelled"
    assert text_of(browser, "user-balance") == "100"
    history = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, '#history-body tr[data-status="cancelled"]'), "")
    assert "insufficient_funds" in history.text

    fill(browser, "replenish-amount", "50")
    submit(browser, "action-replenish")
    assert "Balance now 150" in wait_text(browser, "replenish-outcome", "Done")
    wait_text(browser, "user-balance", "150")

    fill(browser, "write-off-amount", "abc")
    submit(browser, "action-write-off")
    wait_text(browser, "write-off-outcome", "whole number")


def test_with_a_token_an_action_is_refused_then_done_once_the_token_is_entered(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server(API_TOKEN=TOKEN)
    api = Api(server.url, token=TOKEN)
    user = api.create_user("Guarded", 10)
    open_user(browser, server, user["id"])  # reads are open

    fill(browser, "replenish-amount", "100")
    submit(browser, "action-replenish")
    wait_text(browser, "replenish-outcome", "needs an API token")
    dialog = browser.find_element(By.ID, "token-dialog")
    wait(browser, lambda d: dialog.get_attribute("open") is not None, "the token dialog never opened")
    fill(browser, "token-input", "not-the-token-at-all")
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_text(browser, "replenish-outcome", "did not accept the API token")
    wait(browser, lambda d: dialog.get_attribute("open") is not None, "the dialog did not ask again")
    fill(browser, "token-input", TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_text(browser, "replenish-outcome", "Done")
    wait_text(browser, "user-balance", "110")
    wait_text(browser, "token-state", "API_TOKEN (read, write, admin)")

    # Kept for this tab only, never in a URL; the refused tries stored nothing (one task in all).
    assert browser.execute_script("return sessionStorage.getItem('message_broker.api_token')") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0
    assert TOKEN not in browser.current_url
    _, tasks = api.call("GET", f"/api/v1/user/{user['id']}/tasks")
    assert [(t["type"], t["amount"]) for t in tasks] == [("replenishment", 100)]

    # The next action goes through at once.
    fill(browser, "write-off-amount", "30")
    submit(browser, "action-write-off")
    wait_text(browser, "write-off-outcome", "Done")
    wait_text(browser, "user-balance", "80")


def test_with_reads_protected_the_console_asks_once_and_streams_with_the_token(
    console_server: StartConsoleServer, browser: Any
) -> None:
    server = console_server(API_TOKEN=TOKEN, API_TOKEN_PROTECT_READS="true")
    api = Api(server.url, token=TOKEN)
    user = api.create_user("Secret", 10)
    assert Api(server.url).call("GET", "/api/v1/stats")[0] == 401

    browser.get(server.url + "/console/")  # the page itself is public
    dialog = browser.find_element(By.ID, "token-dialog")
    wait(browser, lambda d: dialog.get_attribute("open") is not None, "the console never asked for the token")
    assert "needs an API token" in text_of(browser, "token-reason")
    fill(browser, "token-input", TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_text(browser, "stats-state", "Live")
    wait_text(browser, "feed-state", "Live.")

    task = api.post_task(user["id"], "replenishment", 5)  # the event stream, read with fetch + the header
    wait(browser, lambda d: row(d, "feed-body", task["id"]), "the task never reached the feed", LIVE_WITHIN)

    browser.get(f"{server.url}/console/user/{user['id']}")  # same tab: the token is still there
    wait_text(browser, "stream-state", "Live")
    wait_text(browser, "user-balance", "15")
    assert browser.find_element(By.ID, "token-dialog").get_attribute("open") is None  # not asked again


def test_deep_links_to_a_user_page(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    api = Api(server.url)
    user = api.create_user("Linked", 300)
    tasks = [api.post_task(user["id"], "write-off", 10) for _ in range(3)]
    api.wait_finished(tasks[-1]["id"])

    for link in (user["id"], f"{user['id']}/", f"00{user['id']}"):  # "007" is user 7
        browser.get(f"{server.url}/console/user/{link}")
        wait_text(browser, "user-heading", f"User {user['id']}")
        wait_text(browser, "user-balance", "270")
        assert text_of(browser, "user-name") == "Linked"
        wait(browser, lambda d: all(row(d, "history-body", t["id"]) for t in tasks), "the history is incomplete")
        assert "Linked" in browser.title
        assert all(browser.find_element(By.ID, form).is_displayed() for form in _ACTION_FORMS)

    browser.get(server.url + "/console/user/not-a-number")
    wait_text(browser, "user-problem", "is not a user id")
    _wait_actions_hidden(browser)
    browser.get(server.url + "/console/user/987654")
    wait_text(browser, "user-problem", "There is no user 987654")
    _wait_actions_hidden(browser)


# Every form that acts on the page's user: replenish, write off, transfer, hold, capture/void by id.
_ACTION_FORMS = ("action-replenish", "action-write-off", "action-transfer", "action-hold", "hold-by-id")


def _wait_actions_hidden(browser: Any) -> None:
    wait(
        browser,
        lambda d: not any(d.find_element(By.ID, form).is_displayed() for form in _ACTION_FORMS),
        "the page offers actions on a user that does not exist",
    )


def _full_page_screenshot(driver: Any, path: Path, width: int) -> None:
    """A screenshot of the whole page as a `width`-px-wide screen shows it (a phone's, for 390)."""
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    wait(driver, lambda d: d.execute_script("return window.innerWidth") == width, f"the page never became {width} px")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": min(int(height), 6000)})
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{path.name}: the page is {overflow} px wider than the {width} px screen"
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_screenshots_at_1280_and_390_px(console_server: StartConsoleServer, browser: Any, screenshots: Path) -> None:
    """Realistic live data for a person to look at (the README's screenshot comes from here):
    balance changes, transfers, holds placed, captured, voided and expiring, some cancelled."""
    server = console_server()
    api = Api(server.url)
    users = [api.create_user(name, 5000) for name in ("Ada", "Grace", "Linus", "Barbara", "Edsger")]
    ids = [u["id"] for u in users]
    stop = threading.Event()

    def load() -> None:
        # Bounded: at most 10 s and 500 requests, at a rate that rises and falls.
        started = time.monotonic()
        holds: list[str] = []
        for i in range(500):
            if stop.is_set() or time.monotonic() - started > 10:
                return
            kind, lap = i % 10, i // 10
            mine = (lap + 2 * kind) % len(ids)  # every kind of task for every user in turn
            user, other = ids[mine], ids[(mine + 1 + lap % (len(ids) - 1)) % len(ids)]
            if kind in (0, 1, 2):
                api.post_task(user, "replenishment", 5 + i % 60)
            elif kind in (3, 4):
                api.post_task(user, "write-off", 1 + i % 40)
            elif kind == 5 and lap % 3 == 0:
                api.post_task(user, "write-off", 10**6)  # cancelled: insufficient_funds
            elif kind == 5:
                api.transfer(user, other, 10**6)  # cancelled too
            elif kind == 6:
                api.transfer(user, other, 1 + i % 90)
            elif kind == 7 and i % 20 == 7:
                api.hold(user, 10 + i % 50, expires_in=2)  # released by the server 2 s on
            elif kind == 7:
                holds.append(api.hold(user, 10 + i % 50, expires_in=600)["id"])
            elif kind == 8 and len(holds) > 2:
                api.post(f"/api/v1/hold/{holds.pop(0)}/capture/", {"amount": 5})
            elif kind == 9 and len(holds) > 2:
                api.post(f"/api/v1/hold/{holds.pop(0)}/void/", {})
            time.sleep(0.01 + 0.04 * abs(((time.monotonic() - started) % 6) - 3) / 3)

    loader = threading.Thread(target=load, name="console-screenshot-load")
    open_dashboard(browser, server)
    loader.start()
    try:
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#feed-body tr")) >= 40, "the feed stayed empty")
        loader.join(timeout=20)
    finally:
        stop.set()
        loader.join()
    wait(browser, lambda d: "ms" in text_of(d, "stat-p99"), "no latency figures")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#feed-body tr[data-type="release"]'), "no hold expired")
    fill(browser, "search-input", "")
    submit(browser, "user-search")
    wait_text(browser, "search-state", "Page 1")
    _full_page_screenshot(browser, screenshots / "dashboard-1280.png", 1280)
    _full_page_screenshot(browser, screenshots / "dashboard-390.png", 390)

    ada, grace = ids[0], ids[1]
    kept = [api.hold(ada, amount, expires_in=seconds)["id"] for amount, seconds in ((150, 3600), (75, 1800))]
    api.wait_finished(kept[-1])
    open_user(browser, server, ada)
    fill(browser, "transfer-to", grace)
    fill(browser, "transfer-amount", "40")
    submit(browser, "action-transfer")
    wait_text(browser, "transfer-outcome", "Done")
    fill(browser, f"capture-{kept[0]}", "100")
    browser.find_element(By.CSS_SELECTOR, f'#holds-body form[data-hold-id="{kept[0]}"] button[type=submit]').click()
    wait_text(browser, "holds-outcome", "Done")
    fill(browser, "write-off-amount", "99999")
    submit(browser, "action-write-off")
    wait_text(browser, "write-off-outcome", "Cancelled")
    _full_page_screenshot(browser, screenshots / "user-1280.png", 1280)
    _full_page_screenshot(browser, screenshots / "user-390.png", 390)
    for name in ("dashboard-1280.png", "dashboard-390.png", "user-1280.png", "user-390.png"):
        assert (screenshots / name).stat().st_size > 10_000, name
    assert errors_in_console(browser) == []


def test_the_event_stream_parser_in_the_browser(console_server: StartConsoleServer, browser: Any) -> None:
    """The fetch-based reader's parser (sse.js), run by the browser on chunks cut anywhere."""
    server = console_server()
    browser.get(server.url + "/console/")
    chunks = [
        ": live\r\n\r\nid: 5\r",  # CRLF split between two chunks
        '\ndata: {"a": 1}\r\n\r\n',
        "id: 6\ndata: line1\ndata: line2\n\n",
        ": ping\n",
        "data: no id",
        "\n\n",  # keeps the last id seen
        "event: other\nid: 7\ndata:x\r\rretry: 2500\n",
        "data: never ended",  # a dropped connection: not an event
    ]
    result = browser.execute_async_script(
        """
        const [chunks, done] = arguments;
        import("/console/assets/sse.js").then(({ SseParser }) => {
          const events = [], comments = [], retries = [];
          const parser = new SseParser({
            onEvent: (e) => events.push(e), onComment: (c) => comments.push(c), onRetry: (r) => retries.push(r),
          });
          for (const chunk of chunks) parser.push(chunk);
          parser.reset();
          done({ events, comments, retries, last: parser.lastEventId });
        }).catch((error) => done({ error: String(error) }));
        """,
        chunks,
    )
    assert "error" not in result, result
    assert result["events"] == [
        {"id": "5", "type": "message", "data": '{"a": 1}'},
        {"id": "6", "type": "message", "data": "line1\nline2"},
        {"id": "6", "type": "message", "data": "no id"},
        {"id": "7", "type": "other", "data": "x"},
    ]
    assert result["comments"] == ["live", "ping"]
    assert result["retries"] == [2500]
    assert result["last"] == "7"


def _finish_by_hand(sql: Any, user_id: str, amount: int) -> str:
    """A replenishment of `amount` applied straight in the database, as if by a server the page
    does not hear from; returns the task's id."""
    sql.execute("BEGIN")
    sql.execute("UPDATE users SET balance = balance + %s WHERE id = %s RETURNING balance", (amount, int(user_id)))
    balance = sql.fetchone()[0]
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'replenishment', %s) RETURNING id",
        (int(user_id), amount),
    )
    task_id = str(sql.fetchone()[0])
    sql.execute(
        "UPDATE tasks SET status = 'done', balance_after = %s, processed_at = now() WHERE id = %s",
        (balance, int(task_id)),
    )
    sql.execute("COMMIT")
    return task_id


def test_after_a_drop_the_feed_resumes_with_last_event_id(
    console_server: StartConsoleServer, browser: Any, sql: Any
) -> None:
    """The server goes away; a task finishes meanwhile (by hand in the database); the server
    comes back on the same address. The reader reconnects with Last-Event-ID, so the server
    replays that task: a stream started afresh would never show it."""
    server = console_server()
    api = Api(server.url)
    user = api.create_user("Resumed", 10)
    open_dashboard(browser, server)
    mark_page(browser)
    seen = api.post_task(user["id"], "replenishment", 1)
    wait(browser, lambda d: row(d, "feed-body", seen["id"]), "the first task never reached the feed")

    assert server.stop() == 0
    wait_text(browser, "feed-state", "reconnecting")
    missed = _finish_by_hand(sql, user["id"], 7)

    asyncio.run(server.start())  # on the same port
    wait(browser, lambda d: row(d, "feed-body", missed), "the task finished while away was never replayed", 30)
    wait_text(browser, "feed-state", "Live.")
    assert still_same_page(browser)


def test_amounts_past_2_to_the_53_stay_exact(console_server: StartConsoleServer, browser: Any) -> None:
    server = console_server()
    user = Api(server.url).create_user("Whale", 2**63 - 2)
    open_user(browser, server, user["id"])
    assert text_of(browser, "user-balance") == "9,223,372,036,854,775,806"
    fill(browser, "replenish-amount", "2")
    submit(browser, "action-replenish")
    outcome = wait_text(browser, "replenish-outcome", "Cancelled")
    assert "balance_overflow" in outcome
    fill(browser, "replenish-amount", "1")
    submit(browser, "action-replenish")
    assert "Balance now 9,223,372,036,854,775,807" in wait_text(browser, "replenish-outcome", "Done")
    wait_text(browser, "user-balance", "9,223,372,036,854,775,807")


def test_the_dashboard_names_what_ready_reports_down(console_server: StartConsoleServer, browser: Any) -> None:
    """The real /ready as the dashboard reads it, and what the console makes of every part of
    its answer (the background loops cannot be made to fail from outside the server)."""
    server = console_server()
    open_dashboard(browser, server)
    wait_text(browser, "stat-background", "running")
    assert not browser.find_element(By.ID, "health-problems").is_displayed()
    status, ready = Api(server.url).call("GET", "/ready")
    assert status == 200 and ready["down"] == [] and ready["checks"]["background"] is True, ready
    cases = [
        [200, ready],
        [
            503,
            {**ready, "status": "unavailable", "checks": {**ready["checks"], "background": False}, "down": ["sweep"]},
        ],
        [
            503,
            {
                "status": "unavailable",
                "checks": {"listener": False, "database": True, "background": False},
                "down": ["hold-deadlines", "listener"],
            },
        ],
        [
            503,
            {"status": "unavailable", "checks": {"listener": True, "database": False, "background": True}, "down": []},
        ],
    ]
    result = browser.execute_async_script(
        """
        const [cases, done] = arguments;
        import("/console/assets/ui.js")
          .then(({ describeReady }) => done(cases.map(([status, body]) => describeReady(status, body))))
          .catch((error) => done({ error: String(error) }));
        """,
        cases,
    )
    assert "error" not in result, result
    assert result[0] == {"problems": [], "down": []}
    assert result[1]["problems"] == ["background loop down (being restarted): sweep"]
    assert result[2]["problems"] == [
        "the LISTEN connection is down: tasks are applied only by the sweeps",
        "background loops down (being restarted): hold-deadlines, listener",
    ]
    assert result[3]["problems"] == ["the database does not answer"]


def test_while_the_database_is_away_the_console_says_so_and_recovers(
    console_server: StartConsoleServer, browser: Any, sql: Any, database_url: str, pg_admin_dsn: str
) -> None:
    """New connections refused and the server's connections ended: the dashboard shows the
    database and the listener down, an action answers 503 with a clear message; once the
    database is back, everything is up again without a reload."""
    server = console_server(POOL_ACQUIRE_TIMEOUT="0.5", RECONNECT_MAX_BACKOFF="0.5", CONNECT_TIMEOUT="1")
    user = Api(server.url).create_user("Patient", 10)
    browser.switch_to.new_window("window")
    open_user(browser, server, user["id"])
    user_window = browser.current_window_handle
    browser.switch_to.window(browser.window_handles[0])
    open_dashboard(browser, server)
    mark_page(browser)

    dbname = dsn_database(database_url)
    admin = pg.admin_connection(pg_admin_dsn)
    cur = admin.cursor()
    cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
    try:
        sql.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        wait_text(browser, "stat-database", "down")
        wait_text(browser, "stat-listener", "down")
        problems = wait_text(browser, "health-problems", "the database does not answer")
        assert "the LISTEN connection is down" in problems

        browser.switch_to.window(user_window)
        fill(browser, "replenish-amount", "5")
        submit(browser, "action-replenish")
        outcome = wait_text(browser, "replenish-outcome", "Unavailable right now")
        assert "503 database_unavailable" in outcome
        assert browser.find_element(By.ID, "replenish-outcome").get_attribute("data-kind") == "error"
    finally:
        cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()

    submit(browser, "action-replenish")
    wait_text(browser, "replenish-outcome", "Done", timeout=15)
    wait_text(browser, "user-balance", "15")
    browser.switch_to.window(browser.window_handles[0])
    wait_text(browser, "stat-database", "up", timeout=15)
    wait_text(browser, "stat-listener", "up", timeout=15)
    wait(browser, lambda d: not d.find_element(By.ID, "health-problems").is_displayed(), "the warning stayed", 15)
    assert still_same_page(browser)


def test_a_resume_too_old_for_the_server_reads_the_user_afresh(
    console_server: StartConsoleServer, browser: Any, sql: Any
) -> None:
    """The server keeps stream positions for EVENT_RETENTION seconds: a reconnect from a task
    older than that is answered 410 last_event_id_expired. The user page then streams from now
    and reads the user, history and holds afresh, so a task finished while it was away shows."""
    server = console_server(EVENT_RETENTION="1")
    api = Api(server.url)
    user = api.create_user("Away", 10)
    seen = api.wait_finished(api.post_task(user["id"], "replenishment", 1)["id"])
    open_user(browser, server, user["id"])
    wait(browser, lambda d: row(d, "history-body", seen["id"]), "the first task never showed")
    api.wait_finished(api.post_task(user["id"], "replenishment", 2)["id"])  # the stream's last event
    wait_text(browser, "user-balance", "13")
    mark_page(browser)

    assert server.stop() == 0
    wait_text(browser, "stream-state", "reconnecting")
    missed = _finish_by_hand(sql, user["id"], 7)  # while the server is away
    sql.execute("SELECT pg_sleep(1.2)")  # the last event the page saw is now older than the retention

    asyncio.run(server.start())  # on the same port
    wait(browser, lambda d: row(d, "history-body", missed), "the task finished while away never showed", 30)
    wait_text(browser, "stream-state", "Live")
    wait_text(browser, "user-balance", "20")
    assert still_same_page(browser)

    # The dashboard's feed, likewise: it goes on from now and says it may have missed tasks.
    open_dashboard(browser, server)
    assert not browser.find_element(By.ID, "feed-gap-note").is_displayed()
    api.wait_finished(api.post_task(user["id"], "replenishment", 1)["id"])
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#feed-body tr"), "the feed saw nothing")
    assert server.stop() == 0
    wait_text(browser, "feed-state", "reconnecting")
    sql.execute("SELECT pg_sleep(1.2)")
    asyncio.run(server.start())
    wait_text(browser, "feed-gap-note", "tasks that finished while the feed was away are not in it", 30)
    wait_text(browser, "feed-state", "Live.")
