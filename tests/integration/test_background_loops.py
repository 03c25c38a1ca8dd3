"""A background loop that keeps failing in a running service is visible: /ready answers 503 and
names it, /metrics counts its restarts and says it is down; once it runs again, all is well."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg2.sql
from aiohttp.test_utils import TestClient

from message_broker.db.options import dsn_database
from message_broker.http import keys

from ..helpers import eventually, scrape

RESTARTS = "message_broker_background_restarts_total"
UP = "message_broker_background_up"


async def test_a_failing_loop_shows_in_ready_and_metrics_until_it_runs_again(client: TestClient) -> None:
    tasks = client.server.app[keys.TASKS]
    await eventually(lambda: _ready(client, 200), timeout=10)
    healthy = asyncio.Event()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if not healthy.is_set():
            raise RuntimeError("the extra loop failed")
        await tasks.stopping.wait()

    tasks.start("extra", flaky)

    body = await eventually(lambda: _ready(client, 503), timeout=10)
    assert body["down"] == ["extra"] and body["checks"]["background"] is False, body
    assert body["checks"]["listener"] is True and body["checks"]["database"] is True, body
    samples = await eventually(lambda: _scraped_down(client), timeout=10)
    assert samples[(RESTARTS, (("loop", "extra"),))] >= 1
    assert samples[(UP, (("loop", "listener"),))] == 1  # the others run

    healthy.set()
    body = await eventually(lambda: _ready(client, 200), timeout=10)
    assert body["down"] == [] and body["checks"]["background"] is True, body
    samples = await scrape(client)
    assert samples[(UP, (("loop", "extra"),))] == 1
    restarts = samples[(RESTARTS, (("loop", "extra"),))]
    assert restarts == tasks.restarts["extra"] == runs - 1 >= 1


async def _ready(client: TestClient, status: int) -> Any:
    response = await client.get("/ready")
    body = await response.json()
    return body if response.status == status else None


async def _scraped_down(client: TestClient) -> Any:
    """A scrape taken while the loop waits to be started again, with a restart counted."""
    samples = await scrape(client)
    down = samples.get((UP, (("loop", "extra"),))) == 0
    return samples if down and samples.get((RESTARTS, (("loop", "extra"),)), 0) >= 1 else None


async def test_ready_is_503_while_the_database_takes_no_writes(client: TestClient, database_url: str, sql: Any) -> None:
    """A database that answers but is read-only (a standby behind a misrouted endpoint, or
    default_transaction_read_only, which managed databases set when their disk fills) answers
    every write 503: /ready said 200, "database": true, all along (its check was a SELECT 1)."""
    await eventually(lambda: _ready(client, 200), timeout=10)
    database = psycopg2.sql.Identifier(dsn_database(database_url))
    sql.execute(psycopg2.sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(database))
    try:
        # The setting reaches new sessions: end the service's, as a failover would, and wait until
        # the listener is back (it hears its probe: notifications still flow) and /ready speaks.
        listener = client.server.app[keys.LISTENER]
        connects = listener.connects
        sql.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        body = await eventually(lambda: _ready_once_reconnected(client, listener, connects), timeout=10)
        assert body["checks"] == {"listener": True, "database": False, "background": True}, body
        assert body["status"] == "unavailable", body
    finally:
        sql.execute(psycopg2.sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(database))
    sql.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    body = await eventually(lambda: _ready(client, 200), timeout=10)
    assert body["checks"]["database"] is True, body


async def _ready_once_reconnected(client: TestClient, listener: Any, connects: int) -> Any:
    if not (listener.connects > connects and listener.connected):
        return None
    return await (await client.get("/ready")).json()
