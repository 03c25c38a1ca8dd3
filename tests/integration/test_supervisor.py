"""The supervisor through the real database: NOTIFY wake-ups, the sweep, start-up scans,
listener loss, and two supervisors sharing one database."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter

from aiohttp.test_utils import TestClient

from message_broker.db.driver import ListenConnection
from message_broker.db.options import ConnectionOptions, dsn_database
from message_broker.http import keys

from .. import pg
from ..helpers import create_user, eventually, post_task, wait_processed
from ..ledger_check import check_database


async def _balance(client: TestClient, user_id: str) -> int:
    return (await (await client.get(f"/api/v1/user/{user_id}")).json())["balance"]  # type: ignore[no-any-return]


async def test_task_inserted_from_psql_is_applied_within_a_second(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "psql", 10)
    sql.execute("INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'replenishment', 5)", (int(user["id"]),))
    await eventually(lambda: _is(client, user["id"], 15), timeout=1.0)


async def _is(client: TestClient, user_id: str, balance: int) -> bool:
    return await _balance(client, user_id) == balance


async def test_task_processed_notification_carries_the_outcome(client: TestClient, database_url: str) -> None:
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed"])
    try:
        user = await create_user(client, "notified", 3)
        task = await post_task(client, user["id"], "write-off", 5)
        notification = await listener.next_notification(timeout=10)
        assert notification is not None
        payload = json.loads(notification.payload)
        assert payload["id"] == task["id"] and payload["user_id"] == user["id"]
        assert {k: payload[k] for k in ("type", "amount", "status", "reason", "balance_after")} == {
            "type": "write-off",
            "amount": 5,
            "status": "cancelled",
            "reason": "insufficient_funds",
            "balance_after": 3,
        }
    finally:
        listener.close()


async def test_missed_notification_is_found_by_the_safety_sweep(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    supervisor = client.server.app[keys.SUPERVISOR]
    # Let the start-up scan pass first, so that it cannot be the one to find the task.
    await eventually(lambda: supervisor.scans >= 1, timeout=5)
    user = await create_user(client, "sweep", 0)
    # With replication role 'replica' no trigger fires, so no NOTIFY: only the sweep can find it.
    sql.execute("SET session_replication_role = replica")
    sql.execute("INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'replenishment', 9)", (int(user["id"]),))
    sql.execute("RESET session_replication_role")
    await eventually(lambda: _is(client, user["id"], 9), timeout=10)
    assert supervisor.sweeps_with_missed_work >= 1


async def test_tasks_pending_at_start_up_are_applied(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    sql.execute("INSERT INTO users (username, balance) VALUES ('early', 1) RETURNING id")
    user_id = sql.fetchone()[0]
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount) SELECT %s, 'replenishment', 1 FROM generate_series(1, 1200)",
        (user_id,),
    )
    # A long sweep interval: only the start-up scan can pick these up in time.
    client = await make_client(sweep_interval=600)
    await eventually(lambda: _is(client, str(user_id), 1201), timeout=10)


async def test_idle_user_loops_retire(client: TestClient) -> None:
    supervisor = client.server.app[keys.SUPERVISOR]
    user = await create_user(client, "retire", 0)
    await wait_processed(client, (await post_task(client, user["id"], "replenishment", 1))["id"])
    await eventually(lambda: supervisor.active_users == 0, timeout=5)


async def test_killed_listen_connection_is_survived(
    client: TestClient, sql, database_url: str, pg_admin_dsn: str
) -> None:  # type: ignore[no-untyped-def]
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)
    old_pid = listener.backend_pid
    user = await create_user(client, "survivor", 0)
    dbname = dsn_database(database_url)
    # Keep the listener from coming straight back so /ready can be seen to say 503.
    admin = pg.admin_connection(pg_admin_dsn)
    with contextlib.closing(admin), admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            sql.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
            await eventually(lambda: _status(client, "/ready", 503), timeout=5)
        finally:
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    await eventually(lambda: _status(client, "/ready", 200), timeout=5)
    assert listener.backend_pid != old_pid
    task = await post_task(client, user["id"], "replenishment", 4)
    assert (await wait_processed(client, task["id"], timeout=5))["balance_after"] == 4


async def _status(client: TestClient, path: str, status: int) -> bool:
    return (await client.get(path)).status == status


async def test_health_and_ready(client: TestClient) -> None:
    assert (await client.get("/health")).status == 200
    await eventually(lambda: _status(client, "/ready", 200), timeout=5)


async def test_two_supervisors_apply_each_task_once(make_client, sql, database_url: str) -> None:  # type: ignore[no-untyped-def]
    first = await make_client()
    second = await make_client()
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed"])
    try:
        users = [await create_user(first, f"shared{i}", 20) for i in range(3)]
        clients = [first, second]

        async def send(worker: int) -> list[str]:
            ids = []
            for n in range(30):
                user = users[(worker + n) % len(users)]
                kind = "replenishment" if n % 2 else "write-off"
                ids.append((await post_task(clients[n % 2], user["id"], kind, 1 + (worker + n) % 25))["id"])
            return ids

        ids = [i for batch in await asyncio.gather(*(send(w) for w in range(8))) for i in batch]
        seen: Counter[str] = Counter()
        while len(seen) < len(ids):
            notification = await listener.next_notification(timeout=20)
            assert notification is not None, f"only {len(seen)} of {len(ids)} tasks were reported processed"
            seen[json.loads(notification.payload)["id"]] += 1
        assert set(seen) == set(ids)
        assert max(seen.values()) == 1
        # A worker counts its batch after COMMIT returns, which can be just after the notification.
        supervisors = [c.server.app[keys.SUPERVISOR] for c in clients]
        await eventually(lambda: sum(s.tasks_applied for s in supervisors) >= len(ids), timeout=5)
        assert sum(s.tasks_applied for s in supervisors) == len(ids)
        check_database(sql, {int(u["id"]): 20 for u in users})
    finally:
        listener.close()
