import asyncio

from message_broker.db.migrate import available_migrations, create_database_if_missing, migrate
from message_broker.db.options import ConnectionOptions, dsn_with_database

from .. import pg


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
