"""GET /metrics through real HTTP: Prometheus text whose figures follow what the service did."""

from __future__ import annotations

import contextlib

from aiohttp.test_utils import TestClient

from message_broker.db.options import dsn_database
from message_broker.http import keys
from message_broker.ledger import BIGINT_MAX

from .. import pg
from ..helpers import create_user, eventually, post_task, scrape, value, wait_processed


async def test_task_counters_latency_and_batches_follow_the_work(client: TestClient) -> None:
    user = await create_user(client, "metered", 10)
    rich = await create_user(client, "rich", BIGINT_MAX - 1)
    tasks = [
        await post_task(client, user["id"], "replenishment", 5),  # done -> 15
        await post_task(client, user["id"], "write-off", 20),  # cancelled: insufficient_funds
        await post_task(client, user["id"], "write-off", 15),  # done -> 0
        await post_task(client, rich["id"], "replenishment", 2),  # cancelled: balance_overflow
    ]
    assert (await client.post("/api/v1/user/99999/amount/", json={"type": "write-off", "amount": 1})).status == 404
    for task in tasks:
        await wait_processed(client, task["id"])

    samples = await scrape(client)
    assert value(samples, "message_broker_tasks_accepted_total", type="replenishment") == 2
    assert value(samples, "message_broker_tasks_accepted_total", type="write-off") == 2
    assert value(samples, "message_broker_tasks_applied_total", type="replenishment") == 1
    assert value(samples, "message_broker_tasks_applied_total", type="write-off") == 1
    cancelled = "message_broker_tasks_cancelled_total"
    assert value(samples, cancelled, type="write-off", reason="insufficient_funds") == 1
    assert value(samples, cancelled, type="replenishment", reason="balance_overflow") == 1
    assert value(samples, "message_broker_task_latency_seconds_count") == 4
    assert 0 < value(samples, "message_broker_task_latency_seconds_sum") < 4 * 10
    # The 404 request went through a batch too, but stored nothing.
    assert value(samples, "message_broker_enqueue_batch_tasks_count") == 5
    assert value(samples, "message_broker_enqueue_batch_tasks_sum") == 5
    assert value(samples, "message_broker_apply_batch_tasks_sum") == 4
    assert value(samples, "message_broker_apply_batch_users_count") >= 1
    assert value(samples, "message_broker_tasks_pending") == 0
    assert value(samples, "message_broker_pool_connections") >= value(samples, "message_broker_pool_connections_in_use")


async def test_pending_depth_and_active_loops(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    # No sweep during the test, and tasks inserted with triggers off: nobody picks them up.
    client = await make_client(sweep_interval=600)
    supervisor = client.server.app[keys.SUPERVISOR]
    await eventually(lambda: supervisor.scans >= 1, timeout=5)
    user = await create_user(client, "waiting", 0)
    sql.execute("SET session_replication_role = replica")
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount) SELECT %s, 'replenishment', 1 FROM generate_series(1, 7)",
        (int(user["id"]),),
    )
    sql.execute("RESET session_replication_role")
    samples = await scrape(client)
    assert value(samples, "message_broker_tasks_pending") == 7
    assert value(samples, "message_broker_active_user_loops") == 0

    task = await post_task(client, user["id"], "replenishment", 1)  # wakes the user: all 8 apply
    await wait_processed(client, task["id"])
    samples = await scrape(client)
    assert value(samples, "message_broker_tasks_pending") == 0
    assert value(samples, "message_broker_active_user_loops") == 1  # until it retires
    assert value(samples, "message_broker_tasks_applied_total", type="replenishment") == 8
    assert value(samples, "message_broker_sweeps_found_missed_work_total") == 0


async def test_listen_reconnects_are_counted(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)
    assert value(await scrape(client), "message_broker_listen_reconnects_total") == 0
    sql.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    await eventually(lambda: listener.connects == 2 and listener.connected, timeout=10)
    assert value(await scrape(client), "message_broker_listen_reconnects_total") == 1


async def test_two_apps_in_one_process_keep_their_own_figures(make_client) -> None:  # type: ignore[no-untyped-def]
    first, second = await make_client(), await make_client()
    user = await create_user(first, "only-first", 0)
    await wait_processed(first, (await post_task(first, user["id"], "replenishment", 1))["id"])
    accepted = "message_broker_tasks_accepted_total"
    assert value(await scrape(first), accepted, type="replenishment") == 1
    assert value(await scrape(second), accepted, type="replenishment") == 0


async def test_pending_is_nan_when_the_database_is_gone(
    client: TestClient, database_url: str, pg_admin_dsn: str
) -> None:
    await eventually(lambda: _status(client, "/ready", 200), timeout=5)
    dbname = dsn_database(database_url)
    admin = pg.admin_connection(pg_admin_dsn)
    with contextlib.closing(admin), admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
            samples = await scrape(client)  # still answers 200, with what it knows
            assert value(samples, "message_broker_tasks_pending") != value(samples, "message_broker_tasks_pending")
        finally:
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')


async def _status(client: TestClient, path: str, status: int) -> bool:
    return (await client.get(path)).status == status
