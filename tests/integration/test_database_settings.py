"""The database as DBAs configure it: settings given to the service's role or database (`ALTER
DATABASE ... SET`, `ALTER ROLE ... SET`) that the service must not depend on. Each is set on the
test's own database before the app connects, then the API is driven over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import pytest
from psycopg2 import sql as pgsql

from message_broker.db.migrate import SearchPathMismatch, TriggersOff, available_migrations, migrate
from message_broker.db.options import ConnectionOptions
from message_broker.http import keys

from .. import pg
from ..conftest import MakeClient
from ..helpers import create_user, eventually, lock_waiters
from .test_statements import apply_under_way, balance_at


def set_database_default(sql, name: str, value: str | pgsql.Composable) -> None:  # type: ignore[no-untyped-def]
    """`ALTER DATABASE <the test's> SET name = value`: the default of every later connection (a
    string is one literal; a list, as search_path takes, is SQL)."""
    literal = pgsql.Literal(value) if isinstance(value, str) else value
    sql.execute(
        pgsql.SQL("ALTER DATABASE {} SET {} = {}").format(
            pgsql.Identifier(sql.connection.info.dbname), pgsql.Identifier(name), literal
        )
    )


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
async def test_a_client_encoding_other_than_utf8_changes_no_text(make_client: MakeClient, sql, encoding: str) -> None:  # type: ignore[no-untyped-def]
    """The service reads and writes UTF-8 whatever client_encoding the role or database sets: with
    LATIN1, a username outside Latin-1 was a 500; with SQL_ASCII, any non-ASCII one."""
    set_database_default(sql, "client_encoding", encoding)
    client = await make_client()
    name, note = "Zoë 日本 €", "café ñ 日本 €"
    user = await create_user(client, name, 10)
    assert user["username"] == name
    body = {"type": "replenishment", "amount": 5, "metadata": {"note": note}}
    response = await client.post(f"/api/v1/user/{user['id']}/amount/?wait=5", json=body)
    assert response.status == 200, await response.text()
    task = await response.json()
    assert (task["status"], task["metadata"]) == ("done", {"note": note})
    assert (await (await client.get(f"/api/v1/task/{task['id']}")).json())["metadata"] == {"note": note}
    found = await (await client.get("/api/v1/user/", params={"username": name})).json()
    assert [(u["id"], u["username"], u["balance"]) for u in found] == [(user["id"], name, 15)]
    sql.execute("SELECT username FROM users WHERE id = %s", (int(user["id"]),))
    assert sql.fetchone() == (name,)  # stored as sent, read by a UTF-8 client


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("default_transaction_isolation", "repeatable read"),
        ("default_transaction_isolation", "serializable"),
        ("lock_timeout", "10ms"),
    ],
)
async def test_a_read_waits_for_an_apply_under_way_whatever_the_isolation_level_or_lock_timeout(
    make_client: MakeClient, sql, database_url: str, name: str, value: str
) -> None:  # type: ignore[no-untyped-def]
    """A balance of an instant after the user's last task waits for the apply under way (README,
    "Balance at a time"). Under a default of REPEATABLE READ or SERIALIZABLE the wait ended in a
    serialization failure, and under a small lock_timeout in a lock timeout: 503s, where the
    service's transactions are READ COMMITTED and wait for locks up to their statement_timeout."""
    set_database_default(sql, name, value)
    client = await make_client()
    alice = await create_user(client, "alice", 100)
    with apply_under_way(database_url, int(alice["id"]), 25, 100):
        reading = asyncio.ensure_future(balance_at(client, alice["id"], datetime.now(UTC)))
        await eventually(lambda: lock_waiters(sql) == 1 or reading.done(), what="the read waits for the apply")
        assert not reading.done(), reading.result()
    status, body = await reading
    assert (status, body["balance"]) == (200, 125), body


async def test_an_idle_session_timeout_does_not_end_the_listen_connection(make_client: MakeClient, sql) -> None:  # type: ignore[no-untyped-def]
    """The LISTEN connection is idle while nothing happens: a database's idle_session_timeout ended
    it after that long, over and over (`listen lost`, /ready 503 until the reconnect's probe).
    The pool's idle connections may still be ended: each is checked before it is lent."""
    set_database_default(sql, "idle_session_timeout", "300ms")
    client = await make_client()
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5, what="the listener hears its probe")
    pid, connects = listener.backend_pid, listener.connects
    # Quiet for several times the timeout: the condition under test, not a synchronisation.
    await asyncio.sleep(1.5)
    assert (listener.connected, listener.backend_pid, listener.connects) == (True, pid, connects)
    sql.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert sql.fetchone() == (1,)
    response = await client.get("/ready")
    assert response.status == 200, await response.text()
    user = await create_user(client, "after the quiet", 1)
    assert (await (await client.get(f"/api/v1/user/{user['id']}")).json())["balance"] == 1


def _tables_in(sql, schema: str) -> int:  # type: ignore[no-untyped-def]
    sql.execute("SELECT count(*) FROM pg_class WHERE relnamespace = to_regnamespace(%s) AND relkind = 'r'", (schema,))
    return int(sql.fetchone()[0])


async def test_a_search_path_that_misses_the_services_schema_is_refused_not_a_second_ledger(
    database_url: str, sql
) -> None:  # type: ignore[no-untyped-def]
    """The tables are in public; a search_path of '"$user", other' made the migrations build a
    second, empty ledger in `other` and the service serve it: every user gone from the API."""
    sql.execute("CREATE SCHEMA other")
    set_database_default(sql, "search_path", pgsql.SQL('"$user", other'))
    with pytest.raises(SearchPathMismatch, match=r"tables are in schema public.*does not reach"):
        await migrate(ConnectionOptions(database_url))
    assert _tables_in(sql, "other") == 0


async def test_another_programs_schema_migrations_off_the_path_is_not_taken_for_the_services(
    pg_admin_dsn: str,
) -> None:
    """A new database where another program keeps a schema_migrations of its own, in a schema the
    path does not reach (a Rails or golang-migrate app beside the service): the service's first
    start migrates, it does not refuse as if its own tables were there."""
    with pg.fresh_database(pg_admin_dsn, "mb_shared_" + str(id(object()))) as url:
        with contextlib.closing(pg.admin_connection(url)) as conn, conn.cursor() as cur:
            cur.execute("CREATE SCHEMA billing; CREATE TABLE billing.schema_migrations (version text PRIMARY KEY)")
        applied = await migrate(ConnectionOptions(url))
        assert [m.version for m in applied] == [m.version for m in available_migrations()]


async def test_a_table_named_like_the_services_earlier_on_the_search_path_is_refused(database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    sql.execute("CREATE SCHEMA other; CREATE TABLE other.users (id int, junk text)")
    set_database_default(sql, "search_path", pgsql.SQL("other, public"))
    with pytest.raises(SearchPathMismatch, match=r"users \(in other\).*the service's are in public"):
        await migrate(ConnectionOptions(database_url))


async def test_a_search_path_that_reaches_the_services_tables_first_is_fine(
    make_client: MakeClient, database_url: str, sql
) -> None:  # type: ignore[no-untyped-def]
    sql.execute("CREATE SCHEMA other; CREATE TABLE other.audit_log (id int)")
    set_database_default(sql, "search_path", pgsql.SQL('"$user", public, other'))
    assert await migrate(ConnectionOptions(database_url)) == []
    client = await make_client()
    user = await create_user(client, "on the path", 3)
    assert (await (await client.get(f"/api/v1/user/{user['id']}")).json())["balance"] == 3


async def test_a_session_replication_role_that_keeps_triggers_from_firing_is_refused(database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    """'replica' (a logical replication target's setting) keeps ordinary triggers from firing: the
    service started, /ready 200, and every POST /api/v1/user/ was a 500 (no opening balance)."""
    set_database_default(sql, "session_replication_role", "replica")
    with pytest.raises(TriggersOff, match="session_replication_role is replica"):
        await migrate(ConnectionOptions(database_url))
