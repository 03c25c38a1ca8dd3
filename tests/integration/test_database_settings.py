"""The database as DBAs configure it: settings given to the service's role or database (`ALTER
DATABASE ... SET`, `ALTER ROLE ... SET`) that the service must not depend on. Each is set on the
test's own database before the app connects, then the API is driven over real HTTP."""

from __future__ import annotations

import pytest
from psycopg2 import sql as pgsql

from ..conftest import MakeClient
from ..helpers import create_user


def set_database_default(sql, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """`ALTER DATABASE <the test's> SET name = value`: the default of every later connection."""
    sql.execute(
        pgsql.SQL("ALTER DATABASE {} SET {} = {}").format(
            pgsql.Identifier(sql.connection.info.dbname), pgsql.Identifier(name), pgsql.Literal(value)
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
