"""Helpers shared by the tests: polling with a deadline, one HTTP request, /metrics samples, the
log's "N more like it" count, and API shortcuts."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from message_broker.db.queries import query

T = TypeVar("T")


def _timed_out(what: str, timeout: float, result: object, on_fail: Callable[[], str] | None) -> AssertionError:
    extra = f"\n{on_fail()}" if on_fail else ""
    return AssertionError(f"{what} not reached within {timeout}s (last result: {result!r}){extra}")


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    on_fail: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` (sync or async) until it returns something truthy, and return that; fail after
    `timeout` seconds, with `what` and whatever `on_fail()` says."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, result, on_fail)
        await asyncio.sleep(interval)


def wait_until(probe: Callable[[], T], timeout: float, what: str = "condition", *, interval: float = 0.02) -> T:
    """eventually() for code without an event loop: blocks between polls."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, result, None)
        time.sleep(interval)


def lock_waiters(sql: Any, statement_part: str = "") -> int:  # a psycopg2 cursor
    """How many statements of the test's database (containing `statement_part`) wait for a lock."""
    sql.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE %s",
        (f"%{statement_part}%",),
    )
    return int(sql.fetchone()[0])


def waits_for_a_lock(sql: Any, statement_part: str) -> Callable[[], bool]:  # a psycopg2 cursor
    """A probe for eventually(): a statement containing `statement_part` waits for a lock."""
    return lambda: lock_waiters(sql, statement_part) > 0


def store_task_by_hand(cur: Any, user_id: int, kind: str, amount: int, *, hold_id: int | None = None) -> dict[str, Any]:
    """One task stored as the service stores every task (the named query insert_tasks), on a
    psycopg2 cursor whose transaction the caller ends: the stored row."""
    cur.execute(
        query("insert_tasks"),
        {
            "user_ids": [user_id],
            "types": [kind],
            "amounts": [amount],
            "counterparty_ids": None,
            "hold_ids": None if hold_id is None else [hold_id],
            "expires_in": None,
            "created_by": ["test"],
            "references": None,
            "metadata": None,
        },
    )
    names = [column.name for column in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def waits_for_a_lock_on(sql: Any, table: str) -> Callable[[], bool]:  # a psycopg2 cursor
    """A probe for eventually(): a statement waits for a lock on `table` (for statements whose
    text pg_stat_activity cuts short, as the service's with their session prefix)."""

    def probe() -> bool:
        # pg_locks is the whole server's, and every test database has the same table oids (one template).
        sql.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (table,),
        )
        return bool(sql.fetchone()[0])

    return probe


async def call(
    method: str, url: str, body: Any = None, *, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """One request on a session of its own: (status, the JSON answer, or its text if it is not JSON)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.request(method, url, json=body, headers=headers) as response,
    ):
        text = await response.text()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


# -- /metrics --------------------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Prometheus text as {(sample name, sorted labels): value}."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(client: TestClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(await response.text())


def value(found: Samples, name: str, /, default: float | None = None, **labels: str) -> float:
    """The sample `name` with exactly these labels; KeyError if there is none, unless a default is given."""
    key = (name, tuple(sorted(labels.items())))
    if default is not None:
        return found.get(key, default)
    return found[key]


# -- logs -------------------------------------------------------------------------------------------------

MORE_LIKE_IT = re.compile(r"\(and (\d+) more like it in the last \d+ s, not logged\)$")


def accounted(lines: list[str]) -> int:
    """The warnings a set of log lines stands for: each line, plus the "N more like it" it names."""
    return sum(1 + (int(found.group(1)) if (found := MORE_LIKE_IT.search(line)) else 0) for line in lines)


# -- the API ----------------------------------------------------------------------------------------------

# A TestClient, or an aiohttp.ClientSession made with the server's base_url.
Client = TestClient | aiohttp.ClientSession


async def create_user(client: Client, username: str, balance: int) -> dict[str, Any]:
    response = await client.post("/api/v1/user/", json={"username": username, "balance": balance})
    assert response.status == 201, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def post_task(client: Client, user_id: str, task_type: str, amount: int) -> dict[str, Any]:
    response = await client.post(f"/api/v1/user/{user_id}/amount/", json={"type": task_type, "amount": amount})
    assert response.status == 202, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def wait_processed(client: Client, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        response = await client.get(f"/api/v1/task/{task_id}")
        task = await response.json()
        return task if task["status"] != "pending" else None

    return await eventually(finished, timeout=timeout)
