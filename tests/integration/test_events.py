"""Server-sent events of finished tasks through real HTTP and PostgreSQL: per user and for all,
resuming with Last-Event-ID (no gap, no duplicate, even for tasks that finish out of id order),
heartbeats, slow consumers, a LISTEN reconnect, and a restart of the server between two
connections of one client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from message_broker.db.connector import ConnectionOptions, ListenConnection, dsn_database
from message_broker.http import keys

from .. import pg
from ..helpers import create_user, eventually, post_task, wait_processed
from ..sse import open_stream
from .test_wait import user_locked


def _url(client: TestClient, path: str) -> str:
    return str(client.make_url(path))


def _finish_order(sql, after_position: int = 0) -> list[str]:  # type: ignore[no-untyped-def]
    sql.execute("SELECT id FROM tasks WHERE finish_seq > %s ORDER BY finish_seq", (after_position,))
    return [str(row[0]) for row in sql.fetchall()]


def _position(sql, task_id: str) -> int:  # type: ignore[no-untyped-def]
    sql.execute("SELECT finish_seq FROM tasks WHERE id = %s", (int(task_id),))
    return int(sql.fetchone()[0])


async def _async(value: bool) -> bool:
    return value


async def test_user_stream_carries_that_users_finished_tasks(client: TestClient) -> None:
    alice = await create_user(client, "alice", 10)
    bob = await create_user(client, "bob", 10)
    async with open_stream(client.session, _url(client, f"/api/v1/user/{alice['id']}/events")) as stream:
        assert await stream.until_live() == []
        mine = [await post_task(client, alice["id"], "write-off", n) for n in (3, 30, 4)]
        await post_task(client, bob["id"], "replenishment", 1)
        events = await stream.events(3)
    assert [e.id for e in events] == [t["id"] for t in mine]
    for event in events:
        assert event.task == await (await client.get(f"/api/v1/task/{event.id}")).json()
    assert [e.task["status"] for e in events] == ["done", "cancelled", "done"]
    assert [e.task["balance_after"] for e in events] == [7, 7, 3]


async def test_global_stream_carries_every_users_tasks_in_finish_order(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    users = [await create_user(client, f"u{n}", 100) for n in range(3)]
    async with open_stream(client.session, _url(client, "/api/v1/events")) as stream:
        await stream.until_live()
        posted = await asyncio.gather(*(post_task(client, u["id"], "write-off", 1) for u in users * 4))
        events = await stream.events(len(posted))
    assert sorted(e.id for e in events) == sorted(t["id"] for t in posted)
    assert [e.id for e in events] == _finish_order(sql)


async def test_last_event_id_replays_then_goes_live_without_gap_or_duplicate(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "resumer", 100)
    tasks = [await post_task(client, user["id"], "write-off", 1) for _ in range(6)]
    for task in tasks:
        await wait_processed(client, task["id"])
    url = _url(client, f"/api/v1/user/{user['id']}/events")
    async with open_stream(client.session, url, last_event_id=tasks[2]["id"]) as stream:
        replayed = await stream.until_live()
        assert [e.id for e in replayed] == [t["id"] for t in tasks[3:]]
        later = await post_task(client, user["id"], "write-off", 1)
        assert (await stream.next_event()).id == later["id"]
    # The global stream resumes the same way.
    async with open_stream(client.session, _url(client, "/api/v1/events"), last_event_id=tasks[4]["id"]) as stream:
        assert [e.id for e in await stream.until_live()] == [tasks[5]["id"], later["id"]]


async def test_resume_under_load_has_no_gap_and_no_duplicate_at_the_seam(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    users = [await create_user(client, f"load{n}", 10_000) for n in range(4)]
    first = await post_task(client, users[0]["id"], "write-off", 1)
    await wait_processed(client, first["id"])
    stop = asyncio.Event()

    async def keep_posting() -> int:
        posted = 0
        while not stop.is_set():
            await asyncio.gather(*(post_task(client, u["id"], "write-off", 1) for u in users))
            posted += len(users)
        return posted

    producer = asyncio.create_task(keep_posting())
    try:
        await eventually(lambda: _async(len(_finish_order(sql)) > 40), timeout=10)
        # Resume while tasks keep finishing: the replay and the live part meet mid-flow.
        async with open_stream(client.session, _url(client, "/api/v1/events"), last_event_id=first["id"]) as stream:
            seen = [e.id for e in await stream.until_live()]
            await eventually(lambda: _async(len(_finish_order(sql)) > len(seen) + 40), timeout=10)
            stop.set()
            await producer
            await eventually(lambda: _async(_pending(sql) == 0), timeout=10)
            total = len(_finish_order(sql, _position(sql, first["id"])))
            while len(seen) < total:
                seen.append((await stream.next_event()).id)
    finally:
        stop.set()
        await producer
    assert seen == _finish_order(sql, _position(sql, first["id"]))
    assert len(set(seen)) == len(seen)


async def test_a_task_finishing_after_a_higher_id_is_not_skipped_on_resume(
    client: TestClient, database_url: str
) -> None:
    """Ids are not finish order: resuming "after id N" must still deliver a lower id that
    finished later."""
    slow = await create_user(client, "slow", 10)
    quick = await create_user(client, "quick", 10)
    with user_locked(database_url, slow["id"]) as lock:
        low = await post_task(client, slow["id"], "write-off", 1)  # stays pending for now
        async with open_stream(client.session, _url(client, "/api/v1/events")) as stream:
            await stream.until_live()
            high = await post_task(client, quick["id"], "write-off", 1)
            seen = await stream.next_event()
        assert int(high["id"]) > int(low["id"]) and seen.id == high["id"]
        lock.commit()
        await wait_processed(client, low["id"])
    async with open_stream(client.session, _url(client, "/api/v1/events"), last_event_id=high["id"]) as stream:
        assert [e.id for e in await stream.until_live()] == [low["id"]]


async def test_finishing_is_serialised_so_positions_follow_commit_order(
    client: TestClient, database_url: str, sql
) -> None:  # type: ignore[no-untyped-def]
    """A transaction that has drawn a position holds every other finisher until it commits, so no
    position can commit after a higher one (the gap a resume would otherwise fall into)."""
    first = await create_user(client, "first", 10)
    second = await create_user(client, "second", 10)
    admin = pg.admin_connection(database_url)
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed"])
    try:
        with contextlib.closing(admin), admin.cursor() as cur:
            # Finish a task by hand in an open transaction, holding its user's row first so that
            # no worker takes it.
            cur.execute("BEGIN")
            cur.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (int(first["id"]),))
            sql.execute(
                "INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'replenishment', 1) RETURNING id",
                (int(first["id"]),),
            )
            manual_id = sql.fetchone()[0]
            cur.execute(
                "UPDATE tasks SET status = 'done', balance_after = 11, processed_at = now() WHERE id = %s",
                (manual_id,),
            )
            other = await post_task(client, second["id"], "write-off", 1)

            async def worker_waits_for_the_finishing_lock() -> bool:
                sql.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                return bool(sql.fetchone()[0] >= 1)

            await eventually(worker_waits_for_the_finishing_lock, timeout=10)
            cur.execute("UPDATE users SET balance = 11 WHERE id = %s", (int(first["id"]),))
            cur.execute("COMMIT")
        await wait_processed(client, other["id"])
        order = []
        while len(order) < 2:
            notification = await listener.next_notification(timeout=10)
            assert notification is not None
            order.append(json.loads(notification.payload))
    finally:
        listener.close()
    assert [n["id"] for n in order] == [str(manual_id), other["id"]]
    assert order[0]["finish_seq"] < order[1]["finish_seq"]
    assert _position(sql, str(manual_id)) < _position(sql, other["id"])


async def test_notifications_of_a_batch_arrive_in_position_order(client: TestClient, database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "batch", 1000)
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed"])
    try:
        with user_locked(database_url, user["id"]):
            ids = [(await post_task(client, user["id"], "write-off", 1))["id"] for _ in range(50)]
        positions = []
        while len(positions) < len(ids):
            notification = await listener.next_notification(timeout=10)
            assert notification is not None
            positions.append(json.loads(notification.payload)["finish_seq"])
    finally:
        listener.close()
    assert positions == sorted(positions) and len(set(positions)) == len(ids)
    assert _finish_order(sql) == ids  # one user's tasks: oldest first, within a batch too


@pytest.mark.parametrize(
    ("last_event_id", "why"), [("abc", "not a number"), ("0", "zero"), ("99999999", "unknown"), ("pending", "")]
)
async def test_bad_last_event_id_is_400(client: TestClient, database_url: str, last_event_id: str, why: str) -> None:
    user = await create_user(client, "x", 1)
    with user_locked(database_url, user["id"]):
        pending = await post_task(client, user["id"], "write-off", 1)
        value = pending["id"] if last_event_id == "pending" else last_event_id
        for path in ("/api/v1/events", f"/api/v1/user/{user['id']}/events"):
            response = await client.get(path, headers={"Last-Event-ID": value})
            assert response.status == 400, why
            assert (await response.json())["error"]["code"] == "invalid_last_event_id"


async def test_unknown_user_stream_is_404(client: TestClient) -> None:
    response = await client.get("/api/v1/user/424242/events")
    assert (response.status, (await response.json())["error"]["code"]) == (404, "user_not_found")
    response = await client.get("/api/v1/user/0/events")
    assert response.status == 400


async def test_idle_stream_gets_heartbeats(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(sse_heartbeat_interval=0.2)
    async with open_stream(client.session, _url(client, "/api/v1/events")) as stream:
        await stream.until_live()
        assert await stream.next(timeout=5) == "ping"


async def test_slow_consumer_is_disconnected_not_buffered(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(sse_queue_size=5)
    hub = client.server.app[keys.EVENTS]
    user = await create_user(client, "firehose", 0)
    # A client that connects and then reads nothing, with a tiny receive buffer.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.host, client.port))
    try:
        await loop.sock_sendall(sock, b"GET /api/v1/events HTTP/1.1\r\nHost: test\r\n\r\n")
        await eventually(lambda: _async(hub.subscribers == 1), timeout=5)

        async def cut_off() -> bool:
            # Keep tasks finishing: once the stream is stuck writing, its buffer fills up.
            sql.execute(
                "INSERT INTO tasks (user_id, type, amount) SELECT %s, 'replenishment', 1 FROM generate_series(1, 500)",
                (int(user["id"]),),
            )
            return bool(hub.overflows == 1 and hub.subscribers == 0)

        await eventually(cut_off, timeout=30, interval=0.2)
    finally:
        sock.close()
    # The service carries on, and a new stream (once the burst is over) works.
    await eventually(lambda: _async(_pending(sql) == 0), timeout=20)
    async with open_stream(client.session, _url(client, "/api/v1/events")) as stream:
        await stream.until_live()
        task = await post_task(client, user["id"], "replenishment", 1)
        assert (await stream.next_event()).id == task["id"]


async def test_a_burst_larger_than_the_buffer_is_caught_up_from_the_database(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    """Thousands of notifications arrive in one go, faster than any stream can run: a stream that
    keeps reading is not cut off; it replays what its small buffer could not hold."""
    client = await make_client(sse_queue_size=5)
    hub = client.server.app[keys.EVENTS]
    user = await create_user(client, "burst", 0)
    async with open_stream(client.session, _url(client, f"/api/v1/user/{user['id']}/events")) as stream:
        await stream.until_live()
        sql.execute(
            "INSERT INTO tasks (user_id, type, amount) SELECT %s, 'replenishment', 1 FROM generate_series(1, 2000)",
            (int(user["id"]),),
        )
        events = await stream.events(2000, timeout=20)
    assert [e.id for e in events] == _finish_order(sql)
    assert [e.task["balance_after"] for e in events] == list(range(1, 2001))
    assert hub.overflows == 0


async def test_stream_catches_up_after_the_listen_connection_comes_back(
    client: TestClient, database_url: str, pg_admin_dsn: str, sql
) -> None:  # type: ignore[no-untyped-def]
    supervisor = client.server.app[keys.SUPERVISOR]
    await eventually(lambda: _async(supervisor.listener.connected), timeout=5)
    user = await create_user(client, "gap", 10)
    dbname = dsn_database(database_url)
    admin = pg.admin_connection(pg_admin_dsn)
    async with open_stream(client.session, _url(client, f"/api/v1/user/{user['id']}/events")) as stream:
        await stream.until_live()
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            try:
                sql.execute("SELECT pg_terminate_backend(%s)", (supervisor.listener.backend_pid,))
                await eventually(lambda: _async(not supervisor.listener.connected), timeout=5)
                # Finished while nobody listens: its notification is lost.
                lost = await post_task(client, user["id"], "write-off", 2)
                await eventually(lambda: _async(_position_or_none(sql, lost["id"]) is not None), timeout=10)
            finally:
                cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert (await stream.next_event(timeout=15)).id == lost["id"]
        after = await post_task(client, user["id"], "write-off", 1)
        assert (await stream.next_event()).id == after["id"]


def _position_or_none(sql, task_id: str) -> int | None:  # type: ignore[no-untyped-def]
    sql.execute("SELECT finish_seq FROM tasks WHERE id = %s", (int(task_id),))
    return sql.fetchone()[0]  # type: ignore[no-any-return]


async def test_resume_across_a_server_restart_loses_and_repeats_nothing(start_server, sql) -> None:  # type: ignore[no-untyped-def]
    server = await start_server(SSE_HEARTBEAT_INTERVAL="1")
    async with aiohttp.ClientSession() as session:

        async def post(base: str, user_id: str, amount: int) -> str:
            body = {"type": "write-off", "amount": amount}
            async with session.post(f"{base}/api/v1/user/{user_id}/amount/", json=body) as response:
                assert response.status == 202
                return str((await response.json())["id"])

        async with session.post(f"{server.url}/api/v1/user/", json={"username": "r", "balance": 1000}) as response:
            user_id = (await response.json())["id"]
        async with session.post(f"{server.url}/api/v1/user/", json={"username": "s", "balance": 1000}) as response:
            other_id = (await response.json())["id"]
        received = []
        async with open_stream(session, f"{server.url}/api/v1/events") as stream:
            await stream.until_live()
            for n in range(10):
                await post(server.url, (user_id, other_id)[n % 2], 1)
            received += [e.id for e in await stream.events(6)]  # the client reads part of them
        assert server.stop() == 0  # SIGTERM: streams end, the process exits cleanly
        # While no server runs, more tasks are stored; they are applied by the next process.
        sql.execute(
            "INSERT INTO tasks (user_id, type, amount) SELECT u, 'write-off', 1 "
            "FROM generate_series(1, 5), unnest(%s::bigint[]) AS u",
            ([int(user_id), int(other_id)],),
        )
        server = await start_server(SSE_HEARTBEAT_INTERVAL="1")
        for n in range(4):
            await post(server.url, (user_id, other_id)[n % 2], 1)
        sql.execute("SELECT count(*) FROM tasks")
        total = sql.fetchone()[0]
        sql.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
        await eventually(lambda: _async(_pending(sql) == 0), timeout=15)
        async with open_stream(session, f"{server.url}/api/v1/events", last_event_id=received[-1]) as stream:
            received += [e.id for e in await stream.until_live(timeout=15)]
    assert received == _finish_order(sql)  # every task once, in the order they finished
    assert len(received) == total == 24


def _pending(sql) -> int:  # type: ignore[no-untyped-def]
    sql.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
    return int(sql.fetchone()[0])
