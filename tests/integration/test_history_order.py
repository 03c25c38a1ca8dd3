"""Migration 0008: opening balances of existing users, one instant per apply transaction, and a
history order ((processed_at, id) per user) that is the order the tasks were applied in."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp.test_utils import TestClient

from message_broker.db.migrate import available_migrations, migrate
from message_broker.db.options import ConnectionOptions

from .. import pg
from ..helpers import create_user, post_task, wait_processed


async def test_existing_users_get_the_opening_balance_their_finished_tasks_explain(pg_admin_dsn: str) -> None:
    with pg.fresh_database(pg_admin_dsn, "mb_opening_" + str(id(object()))) as dsn:
        conn = pg.admin_connection(dsn)
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for m in available_migrations():
                if m.version < 8:
                    cur.execute(m.sql)
                    cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
            # Alice opened with 100: +50, a hold of 30 captured for 20, a write-off of 500
            # cancelled, a transfer of 10 to Bob. Bob opened with 7, got 10, holds 4 still.
            cur.execute("INSERT INTO users (username, balance, held) VALUES ('alice', 120, 0), ('bob', 17, 4)")
            done = "INSERT INTO tasks (user_id, type, amount, status, reason, balance_after, available_after, "
            done += "counterparty_id, transfer_id, hold_id, expires_at, processed_at) VALUES "
            cur.execute(done + "(1, 'replenishment', 50, 'done', NULL, 150, 150, NULL, NULL, NULL, NULL, now())")
            cur.execute(
                done + "(1, 'hold', 30, 'done', NULL, 150, 120, NULL, NULL, NULL, now() + interval '1h', now())"
            )
            cur.execute(done + "(1, 'capture', 20, 'done', NULL, 130, 130, NULL, NULL, 2, NULL, now())")
            cur.execute(
                done + "(1, 'write-off', 500, 'cancelled', 'insufficient_funds', 130, 130, NULL, NULL, NULL,"
                " NULL, now())"
            )
            cur.execute(done + "(1, 'transfer', 10, 'done', NULL, 120, 120, 2, NULL, NULL, NULL, now())")
            cur.execute(done + "(2, 'transfer-in', 10, 'done', NULL, 17, 17, 1, 5, NULL, NULL, now())")
            cur.execute(done + "(2, 'hold', 4, 'done', NULL, 17, 13, NULL, NULL, NULL, now() + interval '1h', now())")
            # One transaction's tasks with out-of-order clocks, as clock_timestamp() per row left them.
            cur.execute("INSERT INTO users (username, balance) VALUES ('carol', 6)")
            cur.execute(
                "INSERT INTO tasks (user_id, type, amount) VALUES (3, 'replenishment', 1), (3, 'replenishment', 2)"
            )
            cur.execute(
                "UPDATE tasks SET status = 'done', balance_after = 3 + amount, available_after = 3 + amount,"
                " processed_at = now() - make_interval(secs => id) WHERE user_id = 3"
            )
            assert len(await migrate(ConnectionOptions(dsn))) == len(available_migrations()) - 7
            cur.execute("SELECT username, opening_balance, opening_held FROM users ORDER BY id")
            assert cur.fetchall() == [("alice", 100, 0), ("bob", 7, 0), ("carol", 3, 0)]
            cur.execute("SELECT count(DISTINCT processed_at) FROM tasks WHERE user_id = 3")
            assert cur.fetchone()[0] == 1
            # New users open with what they are created with, by the API or by hand.
            cur.execute("INSERT INTO users (username, balance) VALUES ('dave', 42) RETURNING opening_balance")
            assert cur.fetchone()[0] == 42


async def test_one_instant_per_apply_transaction_and_history_order_is_applied_order(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    users = [await create_user(client, f"u{n}", 1000) for n in range(4)]
    ids = [u["id"] for u in users]

    async def traffic(n: int) -> list[str]:
        me, peer = ids[n % 4], ids[(n + 1) % 4]
        posted = []
        for k in range(15):
            if k % 3 == 0:
                response = await client.post(f"/api/v1/user/{me}/transfer/", json={"to": peer, "amount": 3})
                assert response.status == 202
                posted.append((await response.json())["id"])
            else:
                posted.append((await post_task(client, me, "write-off" if k % 2 else "replenishment", 2))["id"])
        return posted

    posted = [task_id for batch in await asyncio.gather(*(traffic(n) for n in range(8))) for task_id in batch]
    for task_id in posted:
        await wait_processed(client, task_id)
    # Every transaction's tasks (transfer-ins included) share one instant.
    sql.execute(
        "SELECT count(*) FROM (SELECT finish_batch FROM tasks GROUP BY 1 HAVING count(DISTINCT processed_at) > 1) b"
    )
    assert sql.fetchone()[0] == 0
    for user_id in ids:
        sql.execute(
            "SELECT t.id FROM tasks AS t WHERE t.user_id = %s AND t.status <> 'pending' ORDER BY t.processed_at, t.id",
            (int(user_id),),
        )
        by_clock = [row[0] for row in sql.fetchall()]
        sql.execute(
            "SELECT t.id FROM tasks AS t JOIN task_batches AS b ON b.batch_id = t.finish_batch"
            " WHERE t.user_id = %s ORDER BY b.position, t.id",
            (int(user_id),),
        )
        assert by_clock == [row[0] for row in sql.fetchall()]
        assert len(by_clock) > 30
