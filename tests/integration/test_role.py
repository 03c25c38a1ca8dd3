"""The least-privilege role: the whole service works as it, and it can do nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator

import psycopg2
import psycopg2.extensions
import pytest

from message_broker.db.migrate import available_migrations, migrate
from message_broker.db.options import ConnectionOptions
from message_broker.db.roles import create_role

from .. import pg
from ..helpers import create_user, post_task, wait_processed


@pytest.fixture
def app_role(database_url: str) -> Iterator[tuple[str, str]]:
    """(role name, DSN that logs in as it); the role is dropped afterwards (roles are cluster-wide)."""
    role = f"mb_app_{uuid.uuid4().hex[:8]}"
    yield role, psycopg2.extensions.make_dsn(database_url, user=role)
    admin = pg.admin_connection(database_url)
    with contextlib.closing(admin), admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        cur.execute(f'DROP OWNED BY "{role}"')  # this database's grants, and CONNECT on it
        cur.execute(f'DROP ROLE IF EXISTS "{role}"')


async def test_the_service_runs_as_the_least_privilege_role(app_role, database_url: str, make_client) -> None:  # type: ignore[no-untyped-def]
    role, role_dsn = app_role
    assert await create_role(ConnectionOptions(database_url), role) is True
    assert await create_role(ConnectionOptions(database_url), role) is False  # again: no-op
    # serve's start-up migration check, then the whole API and the workers, as the role.
    assert await migrate(ConnectionOptions(role_dsn)) == []
    client = await make_client(database_url=role_dsn)
    user = await create_user(client, "least", 10)
    task = await post_task(client, user["id"], "write-off", 4)
    assert (await wait_processed(client, task["id"]))["balance_after"] == 6
    conn = pg.admin_connection(role_dsn)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone()[0] == role


async def test_an_aborted_transaction_left_by_a_silent_path_is_ended(app_role, database_url: str) -> None:  # type: ignore[no-untyped-def]
    """An error inside a transaction takes away the limits the service sets per transaction, and
    its ROLLBACK may never come (the path went silent): the role's own idle-in-transaction
    default, set by create-role, still ends the backend."""
    role, role_dsn = app_role
    await create_role(ConnectionOptions(database_url, idle_in_transaction_timeout_ms=300), role)
    admin = pg.admin_connection(database_url)
    conn = pg.admin_connection(role_dsn)
    with contextlib.closing(admin), admin.cursor() as watch, contextlib.closing(conn), conn.cursor() as cur:
        conn.autocommit = False
        cur.execute("SELECT pg_backend_pid(), set_config('idle_in_transaction_session_timeout', '60000', true)")
        pid = cur.fetchone()[0]
        with pytest.raises(psycopg2.errors.DivisionByZero):
            cur.execute("SELECT 1 / 0")
        # No ROLLBACK follows, as if the path had gone silent.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            watch.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
            if watch.fetchone() is None:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the backend stayed idle in its aborted transaction")


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM tasks",
        "DELETE FROM users",
        "DELETE FROM holds",
        "SELECT setval('task_batch_positions', 1)",
        "TRUNCATE tasks",
        "DROP TABLE tasks",
        "ALTER TABLE users ADD COLUMN x int",
        "CREATE TABLE intruder (x int)",
        "INSERT INTO schema_migrations (version, name) VALUES (999, 'x')",
        "UPDATE schema_migrations SET name = 'x'",
        "DELETE FROM schema_migrations",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "ALTER TABLE tasks DISABLE TRIGGER USER",
        "SET session_replication_role = replica",
        "CREATE ROLE other",
        "CREATE DATABASE other",
    ],
)
async def test_the_role_can_do_nothing_else(app_role, database_url: str, statement: str) -> None:  # type: ignore[no-untyped-def]
    role, role_dsn = app_role
    await create_role(ConnectionOptions(database_url), role, password="not-used-with-trust-auth")
    conn = pg.admin_connection(role_dsn)
    with contextlib.closing(conn), conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
        cur.execute(statement)


async def test_a_broader_earlier_grant_is_taken_back(app_role, database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    role, role_dsn = app_role
    await create_role(ConnectionOptions(database_url), role)
    sql.execute(f'GRANT ALL ON tasks TO "{role}"')
    await create_role(ConnectionOptions(database_url), role)
    conn = pg.admin_connection(role_dsn)
    with contextlib.closing(conn), conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
        cur.execute("DELETE FROM tasks")


async def test_role_names_and_passwords_are_never_spliced_into_sql(database_url: str) -> None:
    role = f"mb \"odd\" '{uuid.uuid4().hex[:6]}'; DROP TABLE tasks; --"
    try:
        await create_role(ConnectionOptions(database_url), role, password="pa'ss\"word; DROP TABLE users; --")
        conn = pg.admin_connection(database_url)
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,))
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT to_regclass('tasks') IS NOT NULL AND to_regclass('users') IS NOT NULL")
            assert cur.fetchone()[0]
    finally:
        conn = pg.admin_connection(database_url)
        with contextlib.closing(conn), conn.cursor() as cur:
            quoted = role.replace('"', '""')
            cur.execute(f'DROP OWNED BY "{quoted}"')
            cur.execute(f'DROP ROLE IF EXISTS "{quoted}"')


async def test_a_role_and_database_named_with_a_percent_sign_get_their_grants(pg_admin_dsn: str) -> None:
    """Names that need URL-escaping in DATABASE_URL: a % in the role's or the database's name was
    read as a placeholder of the statements that bind the password and the timeout (TypeError)."""
    suffix = uuid.uuid4().hex[:6]
    database, role = f"mb db 100% ü/{suffix}", f"mb app 50%s {suffix}"
    options = ConnectionOptions(psycopg2.extensions.make_dsn(pg_admin_dsn, dbname=database))
    admin = pg.admin_connection(pg_admin_dsn)
    try:
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        await migrate(options)
        assert await create_role(options, role, password="pass%word 100%") is True
        role_dsn = psycopg2.extensions.make_dsn(options.dsn, user=role, password="pass%word 100%")
        assert await migrate(ConnectionOptions(role_dsn)) == []
        conn = pg.admin_connection(options.dsn)
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute(
                "SELECT has_table_privilege(%s, 'tasks', 'INSERT'), has_table_privilege(%s, 'tasks', 'DELETE')",
                (role, role),
            )
            assert cur.fetchone() == (True, False)
            cur.execute(
                "SELECT s.setconfig FROM pg_db_role_setting AS s JOIN pg_roles AS r ON r.oid = s.setrole"
                " JOIN pg_database AS d ON d.oid = s.setdatabase WHERE r.rolname = %s AND d.datname = %s",
                (role, database),
            )
            assert sorted(cur.fetchone()[0]) == ["idle_in_transaction_session_timeout=15000", "search_path=public"]
    finally:
        pg.drop(pg_admin_dsn, f'"{database}"')
        admin = pg.admin_connection(pg_admin_dsn)
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f'DROP ROLE IF EXISTS "{role}"')


async def test_the_role_reaches_tables_the_owner_migrated_into_a_schema_of_its_own(
    pg_admin_dsn: str, make_client
) -> None:  # type: ignore[no-untyped-def]
    """The owner's search_path puts the tables in `ledger`: the role gets USAGE on it, and that
    schema as its own search_path in this database (else its "$user", public missed them)."""
    suffix = uuid.uuid4().hex[:6]
    database, role = f"mb_ledger_{suffix}", f"mb_app_{suffix}"
    owner_dsn = psycopg2.extensions.make_dsn(pg_admin_dsn, dbname=database)
    admin = pg.admin_connection(pg_admin_dsn)
    try:
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {database}")
        conn = pg.admin_connection(owner_dsn)
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute("CREATE SCHEMA ledger")
        owner = ConnectionOptions(psycopg2.extensions.make_dsn(owner_dsn, options="-c search_path=ledger"))
        assert len(await migrate(owner)) == len(available_migrations())
        assert await create_role(owner, role) is True
        role_dsn = psycopg2.extensions.make_dsn(owner_dsn, user=role)
        assert await migrate(ConnectionOptions(role_dsn)) == []
        client = await make_client(database_url=role_dsn, listen_database_url=role_dsn)
        user = await create_user(client, "in ledger", 10)
        task = await post_task(client, user["id"], "write-off", 4)
        assert (await wait_processed(client, task["id"]))["balance_after"] == 6
        await client.close()
    finally:
        pg.drop(pg_admin_dsn, database)
        admin = pg.admin_connection(pg_admin_dsn)
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
