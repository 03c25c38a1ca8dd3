"""Server-sent events of finished tasks through real HTTP and PostgreSQL: per user and for all,
resuming with Last-Event-ID (no gap, no duplicate, even for tasks that finish out of id order),
heartbeats, slow consumers, a LISTEN reconnect, and a restart of the server between two
connections of one client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from message_broker.config import Settings
from message_broker.db.driver import ListenConnection
from message_broker.db.options import ConnectionOptions, dsn_database
from message_broker.http import keys
from message_broker.http.app import create_app

from .. import pg
from ..helpers import create_user, eventually, post_task, wait_processed
from ..sse import open_stream
from .test_wait import user_locked


def _url(client: TestClient, path: str) -> str:
    return str(client.make_url(path))


def _finish_order(sql, after: tuple[int, int] = (0, 0)) -> list[str]:  # type: ignore[no-untyped-def]
    """Finished task ids in stream order (batch position, id), after a place."""
    sql.execute(
        "SELECT t.id FROM tasks AS t JOIN task_batches AS b ON b.batch_id = t.finish_batch "
        "WHERE (b.position, t.id) > (%s, %s) ORDER BY b.position, t.id",
        after,
    )
    return [str(row[0]) for row in sql.fetchall()]


def _place(sql, task_id: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    sql.execute(
        "SELECT b.position FROM tasks AS t JOIN task_batches AS b ON b.batch_id = t.finish_batch WHERE t.id = %s",
        (int(task_id),),
    )
    return int(sql.fetchone()[0]), int(task_id)


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
    # 0 means from the very start.
    async with open_stream(client.session, url, last_event_id="0") as stream:
        assert [e.id for e in await stream.until_live()] == [t["id"] for t in tasks] + [later["id"]]
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
        await eventually(lambda: len(_finish_order(sql)) > 40, timeout=10)
        # Resume while tasks keep finishing: the replay and the live part meet mid-flow.
        async with open_stream(client.session, _url(client, "/api/v1/events"), last_event_id=first["id"]) as stream:
            seen = [e.id for e in await stream.until_live()]
            await eventually(lambda: len(_finish_order(sql)) > len(seen) + 40, timeout=10)
            stop.set()
            await producer
            await eventually(lambda: _pending(sql) == 0, timeout=10)
            total = len(_finish_order(sql, _place(sql, first["id"])))
            while len(seen) < total:
                seen.append((await stream.next_event()).id)
    finally:
        stop.set()
        await producer
    assert seen == _finish_order(sql, _place(sql, first["id"]))
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


async def test_places_follow_commit_order_not_update_order(client: TestClient, database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    """A transaction that finishes a task first but commits last is placed last: a client that
    saw the other task and resumes after it still gets this one."""
    first = await create_user(client, "first", 10)
    second = await create_user(client, "second", 10)
    admin = pg.admin_connection(database_url)
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed", "task_batch"])
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
            manual_id = str(sql.fetchone()[0])
            cur.execute(
                "UPDATE tasks SET status = 'done', balance_after = 11, processed_at = now() WHERE id = %s",
                (int(manual_id),),
            )
            # Meanwhile a worker finishes a later task of another user and commits.
            other = await post_task(client, second["id"], "write-off", 1)
            await wait_processed(client, other["id"])
            cur.execute("UPDATE users SET balance = 11 WHERE id = %s", (int(first["id"]),))
            cur.execute("COMMIT")
        seen = []
        while len(seen) < 4:
            notification = await listener.next_notification(timeout=10)
            assert notification is not None
            seen.append((notification.channel, notification.payload))
    finally:
        listener.close()
    assert int(manual_id) < int(other["id"])
    assert _place(sql, other["id"]) < _place(sql, manual_id)
    channels = [channel for channel, _ in seen]
    assert channels == ["task_processed", "task_batch", "task_processed", "task_batch"]
    assert json.loads(seen[0][1])["id"] == other["id"] and json.loads(seen[2][1])["id"] == manual_id
    assert int(seen[1][1].split(":")[1]) == _place(sql, other["id"])[0]
    assert int(seen[3][1].split(":")[1]) == _place(sql, manual_id)[0]
    async with open_stream(client.session, _url(client, "/api/v1/events"), last_event_id=other["id"]) as stream:
        assert [e.id for e in await stream.until_live()] == [manual_id]


async def test_a_batch_is_announced_after_its_tasks(client: TestClient, database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "batch", 1000)
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed", "task_batch"])
    try:
        with user_locked(database_url, user["id"]):
            ids = [(await post_task(client, user["id"], "write-off", 1))["id"] for _ in range(50)]
        seen: list[tuple[str, str]] = []
        while sum(channel == "task_processed" for channel, _ in seen) < len(ids) or seen[-1][0] != "task_batch":
            notification = await listener.next_notification(timeout=10)
            assert notification is not None
            seen.append((notification.channel, notification.payload))
    finally:
        listener.close()
    # One transaction applied all 50: their notifications, then the batch's position.
    assert [channel for channel, _ in seen] == ["task_processed"] * 50 + ["task_batch"]
    batch = {json.loads(payload)["finish_batch"] for _, payload in seen[:-1]}
    assert batch == {int(seen[-1][1].split(":")[0])}
    assert _finish_order(sql) == ids  # one user's tasks: oldest first


@pytest.mark.parametrize(
    ("last_event_id", "why"), [("abc", "not a number"), ("-1", "negative"), ("99999999", "unknown"), ("pending", "")]
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


async def test_last_event_id_sent_twice_is_400(client: TestClient) -> None:
    # Resuming from either one would repeat or skip events: the client must say which.
    user = await create_user(client, "x", 1)
    task = await wait_processed(client, (await post_task(client, user["id"], "replenishment", 1))["id"])
    for values in ((task["id"], task["id"]), ("0", task["id"])):
        headers = [("Last-Event-ID", value) for value in values]
        for path in ("/api/v1/events", f"/api/v1/user/{user['id']}/events"):
            response = await client.get(path, headers=headers)
            assert response.status == 400, (path, values)
            assert (await response.json())["error"]["code"] == "invalid_last_event_id"


async def test_unknown_user_stream_is_404(client: TestClient) -> None:
    response = await client.get("/api/v1/user/424242/events")
    assert (response.status, (await response.json())["error"]["code"]) == (404, "user_not_found")
    response = await client.get("/api/v1/user/0/events")
    assert response.status == 400


async def test_a_stream_opened_while_the_database_is_unavailable_is_503(
    make_client, sql, database_url: str, pg_admin_dsn: str
) -> None:  # type: ignore[no-untyped-def]
    # Not a 200 that ends before its first byte: the client sees why, as on a resume.
    client = await make_client(pool_acquire_timeout=0.3, pool_min_size=0)
    with pg.refusing_connections(pg_admin_dsn, database_url, sql):
        response = await client.get("/api/v1/events")
        status, body = response.status, await response.text()
    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "database_unavailable"


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
        await eventually(lambda: hub.subscribers == 1, timeout=5)

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
    await eventually(lambda: _pending(sql) == 0, timeout=20)
    async with open_stream(client.session, _url(client, "/api/v1/events")) as stream:
        await stream.until_live()
        task = await post_task(client, user["id"], "replenishment", 1)
        assert (await stream.next_event()).id == task["id"]


async def test_a_stream_its_client_does_not_read_does_not_hold_up_the_stop(settings: Settings, sql) -> None:  # type: ignore[no-untyped-def]
    # A client replaying megabytes and reading nothing: on shutdown its stream ends at once, like
    # every other, rather than when aiohttp gives up on the write (twice SHUTDOWN_TIMEOUT).
    shutdown_timeout = 2.0
    app = create_app(dataclasses.replace(settings, shutdown_timeout=shutdown_timeout))
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    port = pg.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sock = socket.socket()
    try:
        sql.execute("INSERT INTO users (username, balance) VALUES ('reads-nothing', 0) RETURNING id")
        user_id = sql.fetchone()[0]
        for _ in range(4):  # 2,000 tasks of about 4 KB each: far more than the sockets' buffers hold
            sql.execute(
                "INSERT INTO tasks (user_id, type, amount, metadata) SELECT %s, 'replenishment', 1,"
                " (SELECT jsonb_object_agg('k' || k, repeat('x', 500)) FROM generate_series(1, 7) AS k)"
                " FROM generate_series(1, 500)",
                (user_id,),
            )
        await eventually(lambda: _pending(sql) == 0, timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /api/v1/events HTTP/1.1\r\nHost: test\r\nLast-Event-ID: 0\r\n\r\n")
        await asyncio.sleep(1)  # the replay fills the buffers and waits for the client
    finally:
        started = time.monotonic()
        await runner.cleanup()
        took = time.monotonic() - started
        sock.close()
    assert took < shutdown_timeout, took


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
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)
    user = await create_user(client, "gap", 10)
    dbname = dsn_database(database_url)
    admin = pg.admin_connection(pg_admin_dsn)
    async with open_stream(client.session, _url(client, f"/api/v1/user/{user['id']}/events")) as stream:
        await stream.until_live()
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            try:
                sql.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
                await eventually(lambda: not listener.connected, timeout=5)
                # Finished while nobody listens: its notification is lost.
                lost = await post_task(client, user["id"], "write-off", 2)
                await eventually(lambda: _status(sql, lost["id"]) == "done", timeout=10)
            finally:
                cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert (await stream.next_event(timeout=15)).id == lost["id"]
        after = await post_task(client, user["id"], "write-off", 1)
        assert (await stream.next_event()).id == after["id"]


def _status(sql, task_id: str) -> str:  # type: ignore[no-untyped-def]
    sql.execute("SELECT status FROM tasks WHERE id = %s", (int(task_id),))
    return str(sql.fetchone()[0])


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
        await eventually(lambda: _pending(sql) == 0, timeout=15)
        async with open_stream(session, f"{server.url}/api/v1/events", last_event_id=received[-1]) as stream:
            received += [e.id for e in await stream.until_live(timeout=15)]
    assert received == _finish_order(sql)  # every task once, in the order they finished
    assert len(received) == total == 24


def _pending(sql) -> int:  # type: ignore[no-untyped-def]
    sql.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
    return int(sql.fetchone()[0])
