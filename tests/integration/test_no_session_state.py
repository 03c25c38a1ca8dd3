"""Nothing the service does depends on session state, so that its pool can go through PgBouncer in
transaction pooling: the limits are set per transaction, the migrations' lock per transaction, and
the LISTEN connection proves it hears the pool's database (or says loudly that it does not)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from aiohttp.test_utils import TestClient

from message_broker.db.driver import ListenConnection, Pool, connect
from message_broker.db.errors import DatabaseUnavailable, QueryTimeout
from message_broker.db.listener import Listener
from message_broker.db.migrate import available_migrations, migrate
from message_broker.db.options import ConnectionOptions, dsn_with_database
from message_broker.http import keys

from .. import pg
from ..conftest import MakeClient
from ..helpers import create_user, eventually, post_task, wait_processed


def _setting(name: str) -> str:
    return f"SELECT current_setting('{name}') AS value"


async def test_every_transaction_carries_the_limits_and_the_session_keeps_none(database_url: str) -> None:
    options = ConnectionOptions(database_url, statement_timeout_ms=1_234, idle_in_transaction_timeout_ms=5_678)
    conn = await connect(options)
    try:
        # A statement on its own and a transaction both run under the limits and in UTC...
        for name, expected in (("statement_timeout", "1234ms"), ("TimeZone", "UTC")):
            assert (await conn.fetch_one(_setting(name))) == {"value": expected}
        async with conn.transaction():
            await conn.execute("SELECT 1")
            assert await conn.fetch_one(_setting("idle_in_transaction_session_timeout")) == {"value": "5678ms"}
        # ...while the session's own values (what RESET restores: the server's defaults plus any
        # startup options) are untouched: what the next client of a pooled server connection sees.
        rows = await conn.fetch_all(
            "SELECT name, setting, reset_val FROM pg_settings"
            " WHERE name IN ('statement_timeout', 'idle_in_transaction_session_timeout') ORDER BY name"
        )
        assert rows == [
            {"name": "idle_in_transaction_session_timeout", "setting": "5678", "reset_val": "0"},
            {"name": "statement_timeout", "setting": "1234", "reset_val": "0"},
        ]
    finally:
        conn.close()


async def test_the_limits_hold_in_a_statement_of_its_own_and_in_a_transaction(database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    conn = await connect(ConnectionOptions(database_url, statement_timeout_ms=200, idle_in_transaction_timeout_ms=300))
    try:
        with pytest.raises(QueryTimeout):
            await conn.execute("SELECT pg_sleep(2)")
        with pytest.raises(QueryTimeout):
            async with conn.transaction():
                await conn.execute("SELECT 1")
                await conn.execute("SELECT pg_sleep(2)")  # a later statement of the transaction
        # Idle in a transaction past its limit: the server ends the session.
        pid = await conn.backend_pid()

        def gone() -> bool:
            sql.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return sql.fetchone() == (0,)

        with pytest.raises(DatabaseUnavailable):
            async with conn.transaction():
                await conn.execute("SELECT 1")
                await eventually(gone, timeout=10, what="the server ended the idle transaction's session")
                await conn.execute("SELECT 1")
    finally:
        conn.close()


async def test_a_listener_on_another_database_is_deaf_says_how_to_fix_it_and_keeps_trying(
    make_client: MakeClient, pg_admin_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A mis-routed LISTEN endpoint: LISTEN is accepted, and the pool's notifications never arrive."""
    caplog.set_level(logging.INFO, logger="message_broker")
    client: TestClient = await make_client(listen_database_url=dsn_with_database(pg_admin_dsn, "postgres"))
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.deaf_connects >= 2, timeout=20, what="two deaf connects")
    response = await client.get("/ready")
    assert response.status == 503
    body = await response.json()
    assert body["checks"]["listener"] is False and body["checks"]["database"] is True
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and all("LISTEN_DATABASE_URL" in e and "transaction pooler" in e for e in errors), errors
    # The safety sweep still applies what arrives, only without wake-ups.
    user = await create_user(client, "deaf", 0)
    task = await post_task(client, user["id"], "replenishment", 5)
    assert (await wait_processed(client, task["id"], timeout=15))["balance_after"] == 5


async def test_ready_waits_for_the_probe_to_be_heard(client: TestClient) -> None:
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=10)
    assert (await client.get("/ready")).status == 200
    assert listener.deaf_connects == 0


async def test_the_pool_sends_the_probe_when_the_connection_is_quiet(
    make_client: MakeClient, database_url: str
) -> None:
    """The quiet-connection probe is the same NOTIFY through the pool, heard on the LISTEN connection."""
    client = await make_client(probe_interval=0.2, probe_timeout=2.0)
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=10)
    # Another connection listening on the probe channel hears the probes, one after another.
    spy = await ListenConnection.open(ConnectionOptions(database_url), [listener.probe_channel])
    try:
        first = await spy.next_notification(timeout=5)
        second = await spy.next_notification(timeout=5)
    finally:
        spy.close()
    assert first is not None and second is not None
    assert first.channel == second.channel == listener.probe_channel and int(second.payload) > int(first.payload)
    assert listener.connects == 1 and listener.connected


async def test_migrations_of_one_database_in_parallel_hold_no_session_lock(pg_admin_dsn: str) -> None:
    name = "mb_locks_" + str(id(object()))
    with pg.fresh_database(pg_admin_dsn, name) as dsn:
        results = await asyncio.gather(*(migrate(ConnectionOptions(dsn)) for _ in range(3)))
        assert sorted(m.version for run in results for m in run) == [m.version for m in available_migrations()]
        conn = pg.admin_connection(dsn)
        with contextlib.closing(conn), conn.cursor() as cur:
            # pg_locks is the whole server's: this database's only (TEST_DATABASE_URL may be shared).
            cur.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            assert cur.fetchone() == (0,)


async def test_a_probe_the_pool_cannot_send_is_not_the_listeners_fault(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's database refuses connections while the LISTEN connection is fine: no deaf ERROR
    and no reconnecting; the LISTEN connection is kept (a round trip shows it is alive) and the
    probe tried again, and the listener does not claim to hear."""
    caplog.set_level(logging.INFO, logger="message_broker")
    dead = ConnectionOptions(f"postgresql://nobody@127.0.0.1:{pg.free_port()}/none", connect_timeout=1.0)
    pool = await Pool.open(dead, min_size=0, max_size=2, acquire_timeout=0.5)
    listener = Listener(ConnectionOptions(database_url), pool, probe_interval=0.3, probe_timeout=0.6, max_backoff=0.2)
    task = asyncio.create_task(listener.run())
    try:

        def not_sent() -> int:
            return sum("listen probe_not_sent" in r.getMessage() for r in caplog.records)

        await eventually(lambda: not_sent() >= 2, timeout=15, what="two probes the pool could not send")
        assert listener.connects == 1 and listener.deaf_connects == 0 and not listener.connected
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        listener.interrupt()
        await task
        await pool.close()
