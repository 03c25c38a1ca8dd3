"""Storage that stays small: stream positions (task_batches) are purged past EVENT_RETENTION, a
resume from further back is a clear 410, and a resume inside it costs work in proportion to the
events it replays."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp.test_utils import TestClient

from message_broker.db.queries import query
from message_broker.http import keys
from message_broker.worker.housekeeping import PURGE_EVENT_POSITIONS

from .. import pg
from ..helpers import create_user, eventually, post_task, samples, value, wait_processed
from ..sse import open_stream


def _count(sql, table: str) -> int:  # type: ignore[no-untyped-def]
    sql.execute(f"SELECT count(*) FROM {table}")
    return int(sql.fetchone()[0])


async def _finished_tasks(client: TestClient, user_id: str, count: int) -> list[dict[str, Any]]:
    tasks = [await post_task(client, user_id, "replenishment", n + 1) for n in range(count)]
    return [await wait_processed(client, task["id"]) for task in tasks]


async def test_stream_positions_shrink_back_once_past_the_retention(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(event_retention=2, event_purge_interval=0.5, event_purge_batch=7)
    user = await create_user(client, "busy", 0)
    await _finished_tasks(client, user["id"], 30)
    assert _count(sql, "task_batches") >= 1

    async def purged() -> bool:
        return _count(sql, "task_batches") == 0

    await eventually(purged, timeout=10)
    assert _count(sql, "tasks") == 30  # the ledger itself is kept
    await _finished_tasks(client, user["id"], 1)
    assert _count(sql, "task_batches") >= 1  # and new positions are recorded as before


async def test_a_resume_from_before_the_retention_is_410(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    # No purge in this test's lifetime: a position that still exists but is too old is 410 too.
    client = await make_client(event_retention=1, event_purge_interval=3600)
    user = await create_user(client, "old", 0)
    (old,) = await _finished_tasks(client, user["id"], 1)

    async def too_old() -> bool:
        sql.execute("SELECT now() - finished_at > interval '1 second' FROM task_batches")
        return all(row[0] for row in sql.fetchall())

    await eventually(too_old, timeout=5)
    for path in (f"/api/v1/user/{user['id']}/events", "/api/v1/events"):
        response = await client.get(path, headers={"Last-Event-ID": old["id"]})
        assert response.status == 410, await response.text()
        body = await response.json()
        assert body["error"]["code"] == "last_event_id_expired"
        assert body["error"]["details"] == {"last_event_id": old["id"], "retention_seconds": 1.0}
    # ...and once purged, the same.
    sql.execute("DELETE FROM task_batches")
    response = await client.get("/api/v1/events", headers={"Last-Event-ID": old["id"]})
    assert response.status == 410
    # A task that is not there is still a 400.
    response = await client.get("/api/v1/events", headers={"Last-Event-ID": "123456"})
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_last_event_id"


async def test_a_resume_inside_the_retention_replays_without_gap_or_duplicate(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(event_retention=3600)
    user = await create_user(client, "fresh", 0)
    first, *rest = await _finished_tasks(client, user["id"], 6)
    url = str(client.make_url(f"/api/v1/user/{user['id']}/events"))
    async with open_stream(client.session, url, last_event_id=first["id"]) as stream:
        replayed = await stream.until_live()
    assert [event.task["id"] for event in replayed] == [task["id"] for task in rest]


async def test_a_users_replay_reads_in_proportion_to_its_own_events(client: TestClient, database_url: str) -> None:
    """EXPLAIN ANALYZE of the per-user replay: thousands of batches of another user finished after
    the resume point, a few of ours; the plan reads rows in proportion to ours."""
    mine = await create_user(client, "mine", 0)
    other = await create_user(client, "other", 0)
    (start,) = await _finished_tasks(client, mine["id"], 1)
    # The other user's history, written finished by hand, one transaction (one batch) each.
    conn = pg.admin_connection(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off")  # only to make the set-up quick
            for n in range(3000):
                cur.execute(
                    "INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, processed_at)"
                    " VALUES (%s, 'replenishment', 1, 'done', %s, %s, clock_timestamp())",
                    (int(other["id"]), n + 1, n + 1),
                )
            cur.execute("UPDATE users SET balance = 3000 WHERE id = %s", (int(other["id"]),))
    finally:
        conn.close()
    await _finished_tasks(client, mine["id"], 3)
    conn = pg.admin_connection(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("ANALYZE tasks")
            cur.execute("ANALYZE task_batches")
            cur.execute("SELECT count(*) FROM task_batches")
            batches = cur.fetchone()[0]
            cur.execute(
                "SELECT b.position FROM tasks t JOIN task_batches b ON b.batch_id = t.finish_batch WHERE t.id = %s",
                (int(start["id"]),),
            )
            (position,) = cur.fetchone()
            params = {"position": position, "task_id": int(start["id"]), "user_id": int(mine["id"]), "limit": 500}
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query("finished_user_tasks_after"), params)
            plan = cur.fetchone()[0][0]["Plan"]
            cur.execute(query("finished_user_tasks_after"), params)
            assert len(cur.fetchall()) == 3
    finally:
        conn.close()
    assert batches > 3000
    read = _rows_read(plan)
    assert read < 100, f"{read} rows read for 3 events among {batches} batches:\n{json.dumps(plan, indent=1)}"


def _rows_read(node: dict[str, Any]) -> int:
    """Rows every node of a plan produced, over all its loops (and those its filters removed)."""
    own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * node.get("Actual Loops", 1)
    return int(own) + sum(_rows_read(child) for child in node.get("Plans", []))


async def test_the_purge_runs_once_per_interval_whatever_the_number_of_processes(make_client) -> None:  # type: ignore[no-untyped-def]
    interval = 1.0
    clients = [await make_client(event_purge_interval=interval) for _ in range(3)]
    started = time.monotonic()
    # The duration the test is about: three processes left to run their purge loops for 4 intervals.
    await asyncio.sleep(4 * interval)
    runs = sum(c.server.app[keys.HOUSEKEEPING].stats[PURGE_EVENT_POSITIONS].runs for c in clients)
    elapsed = time.monotonic() - started
    assert 2 <= runs <= elapsed / interval + 2, (runs, elapsed)


async def test_metrics_show_the_tables_rows_and_sizes(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "measured", 0)
    await _finished_tasks(client, user["id"], 3)
    sql.execute("ANALYZE")
    text = await (await client.get("/metrics")).text()
    found = samples(text)
    for table in ("users", "tasks", "holds", "task_batches", "idempotency_keys", "maintenance_runs"):
        assert value(found, "message_broker_table_bytes", table=table) > 0
    assert value(found, "message_broker_table_rows", table="tasks") == 3
    assert value(found, "message_broker_table_rows", table="users") == 1
    assert 'message_broker_purge_runs_total{job="purge-event-positions"}' in text
