import asyncio
import contextlib

import psycopg2.extensions

from message_broker.db import migrate as migrate_module
from message_broker.db.migrate import Migration, available_migrations, create_database_if_missing, migrate
from message_broker.db.options import ConnectionOptions, dsn_with_database

from .. import pg
from ..faults.harness import FaultProxy


async def test_migrating_again_is_a_no_op(database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    assert await migrate(ConnectionOptions(database_url)) == []
    sql.execute("SELECT version FROM schema_migrations ORDER BY version")
    assert [row[0] for row in sql.fetchall()] == [m.version for m in available_migrations()]


async def test_concurrent_migrations_of_a_new_database_apply_once(pg_admin_dsn: str) -> None:
    name = "mb_fresh_" + str(id(object()))
    options = ConnectionOptions(dsn_with_database(pg_admin_dsn, name))
    try:
        assert await create_database_if_missing(options) is True
        assert await create_database_if_missing(options) is False
        results = await asyncio.gather(*(migrate(options) for _ in range(4)))
        # The pending migrations are one transaction under a transaction-level lock: one of the four
        # applies them all, in order; the others find them recorded.
        assert sorted(([m.version for m in run] for run in results), key=len) == [
            [],
            [],
            [],
            [m.version for m in available_migrations()],
        ]
    finally:
        pg.drop(pg_admin_dsn, name)


async def test_a_migration_whose_path_goes_silent_does_not_keep_the_lock(  # type: ignore[no-untyped-def]
    pg_admin_dsn: str, monkeypatch
) -> None:
    """The path to the server dies while a process migrates (bytes swallowed, nothing closed: the
    server never hears of it). Its transaction holds the migrations' lock, and whatever locks its
    DDL took; the server must end it by itself (the idle-in-transaction limit) so that the next
    start can migrate, instead of waiting for TCP keepalives (two hours by default)."""
    name = "mb_silent_" + str(id(object()))
    params = psycopg2.extensions.parse_dsn(pg_admin_dsn)
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    proxy = FaultProxy(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}")
    await proxy.start()
    direct = ConnectionOptions(dsn_with_database(pg_admin_dsn, name), idle_in_transaction_timeout_ms=1000)
    through = direct.with_changes(
        dsn=psycopg2.extensions.make_dsn(direct.dsn, host="127.0.0.1", port=proxy.port), application_name="mb_silent"
    )
    real = available_migrations()
    slow = Migration(real[-1].version + 1, "slow", "SELECT pg_sleep(0.3)")
    monkeypatch.setattr(migrate_module, "available_migrations", lambda: [*real, slow])
    try:
        await create_database_if_missing(direct)
        first = asyncio.create_task(migrate(through))

        def sleeping() -> bool:
            with contextlib.closing(pg.admin_connection(pg_admin_dsn)) as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'mb_silent' AND query LIKE '%pg_sleep%'"
                )
                return cur.fetchone() is not None

        while not sleeping():
            assert not first.done(), first
            await asyncio.sleep(0.01)
        proxy.stall()  # the answer to the sleep, and everything after it, is lost
        await asyncio.sleep(0.5)
        first.cancel()  # as STARTUP_TIMEOUT gives up on it
        with contextlib.suppress(asyncio.CancelledError):
            await first
        # The next start migrates once the server has ended the silent transaction.
        applied = await asyncio.wait_for(migrate(direct), 10)
        assert [m.version for m in applied] == [m.version for m in [*real, slow]]
    finally:
        await proxy.close()
        pg.drop(pg_admin_dsn, name)
