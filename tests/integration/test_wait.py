"""?wait=<seconds> on POST /api/v1/user/<id>/amount/ and GET /api/v1/task/<id>: answered when the
task finishes (woken by task_processed, not by polling), or at the timeout with the task as it
stands; many waiters share the one LISTEN connection; a LISTEN reconnect loses no waiter."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Iterator

import aiohttp
import psycopg2.extensions
import pytest
from aiohttp.test_utils import TestClient

from message_broker.db import apply
from message_broker.db.driver import ListenConnection, Pool
from message_broker.db.errors import DatabaseUnavailable
from message_broker.db.options import ConnectionOptions, dsn_database
from message_broker.http import keys
from message_broker.worker import waiters as waiters_module

from .. import pg
from ..helpers import create_user, eventually, post_task


@contextlib.contextmanager
def user_locked(database_url: str, user_id: str) -> Iterator[psycopg2.extensions.connection]:
    """Hold the user's row lock (as a worker would) so their tasks stay pending until we let go."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (int(user_id),))
        yield conn
    finally:
        conn.rollback()
        conn.close()


async def _waiting(client: TestClient, count: int) -> bool:
    return bool(client.server.app[keys.WAITERS].waiting == count)


async def test_post_with_wait_answers_200_with_the_finished_task(client: TestClient) -> None:
    user = await create_user(client, "w", 100)
    response = await client.post(f"/api/v1/user/{user['id']}/amount/?wait=10", json={"type": "write-off", "amount": 40})
    assert response.status == 200
    task = await response.json()
    assert (task["status"], task["balance_after"], task["processed_at"] is not None) == ("done", 60, True)
    assert response.headers["Location"] == f"/api/v1/task/{task['id']}"
    cancelled = await client.post(
        f"/api/v1/user/{user['id']}/amount/?wait=10", json={"type": "write-off", "amount": 400}
    )
    assert cancelled.status == 200
    assert (await cancelled.json())["reason"] == "insufficient_funds"


async def test_wait_with_an_idempotency_key_waits_for_the_first_requests_task(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "keyed", 100)
    path = f"/api/v1/user/{user['id']}/amount/?wait=10"
    headers = {"Idempotency-Key": "wait-and-retry"}
    first = await client.post(path, json={"type": "write-off", "amount": 10}, headers=headers)
    again = await client.post(path, json={"type": "write-off", "amount": 10}, headers=headers)
    assert (first.status, again.status) == (200, 200)
    assert await first.json() == await again.json()
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 1


async def test_wait_timeout_answers_with_the_task_as_it_stands(client: TestClient, database_url: str) -> None:
    user = await create_user(client, "slow", 100)
    with user_locked(database_url, user["id"]):
        response = await client.post(
            f"/api/v1/user/{user['id']}/amount/?wait=0.3", json={"type": "write-off", "amount": 1}
        )
        assert response.status == 202  # the POST keeps its 202 when the task is not finished yet
        task = await response.json()
        assert task["status"] == "pending" and response.headers["Location"] == f"/api/v1/task/{task['id']}"
        response = await client.get(f"/api/v1/task/{task['id']}?wait=0.3")
        assert response.status == 200  # GET is 200 either way
        assert (await response.json())["status"] == "pending"
        assert client.server.app[keys.WAITERS].waiting == 0  # timed-out waiters leave nothing behind
    response = await client.get(f"/api/v1/task/{task['id']}?wait=10")
    assert (response.status, (await response.json())["status"]) == (200, "done")


def _finish_unheard(sql, task_id: int, balance_after: int) -> None:  # type: ignore[no-untyped-def]
    """Finish the task with no trigger, so no notification: as another process's finish is, for a
    process whose LISTEN connection is down or whose path is silent."""
    sql.execute("SET session_replication_role = replica")
    try:
        sql.execute(
            "UPDATE tasks SET status = 'done', balance_after = %s, available_after = %s, "
            "processed_at = clock_timestamp() WHERE id = %s",
            (balance_after, balance_after, task_id),
        )
    finally:
        sql.execute("SET session_replication_role = DEFAULT")


async def _get_waiting(client: TestClient, task_id: str, wait: float) -> asyncio.Task[aiohttp.ClientResponse]:
    """GET ?wait on the task, once it is registered and has read the task (still pending)."""
    waiters = client.server.app[keys.WAITERS]
    reads = waiters.reads
    answer = asyncio.create_task(client.get(f"/api/v1/task/{task_id}?wait={wait}"))
    await eventually(lambda: waiters.waiting == 1 and waiters.reads > reads, timeout=5, what="the wait registered")
    return answer


async def test_a_wait_whose_finish_went_unheard_ends_with_the_task_as_it_stands(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, sql
) -> None:
    """At its timeout a wait reads its task once more: a finish that was never heard is not
    answered as `pending` (the client would take a done task for one still to come)."""
    user = await create_user(client, "unheard", 10)
    with user_locked(database_url, user["id"]):
        task = await post_task(client, user["id"], "write-off", 4)
        answer = await _get_waiting(client, task["id"], 0.5)
        _finish_unheard(sql, int(task["id"]), 6)
        response = await asyncio.wait_for(answer, 10)
    body = await response.json()
    assert (response.status, body["status"], body["balance_after"]) == (200, "done", 6)


async def test_a_waiter_the_apply_did_not_read_back_for_is_answered_without_a_notification(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that began waiting after the apply had chosen what to read back (its writes sent),
    and whose own read came before that COMMIT was visible, was answered only by the task_processed
    notification: with the LISTEN connection down it slept to its timeout, although its task was
    applied at once (found from outside: a POST ?wait=5 answered `done` after 5.0 s, the task
    processed 8 ms after it was created, during a LISTEN outage). Here the apply is made to choose
    without this waiter, and no task_processed is heard."""
    user = await create_user(client, "late-waiter", 10)
    listener = client.server.app[keys.LISTENER]
    monkeypatch.setitem(listener._routes, "task_processed", lambda notification: None)
    real = apply.apply_pending_batches
    late: list[int] = []

    async def chosen_before_the_waiter(pool, user_ids, batch_size, wanted, remembered=None):  # type: ignore[no-untyped-def]
        def chosen(task_id: int) -> bool:
            return task_id not in late and wanted(task_id)

        return await real(pool, user_ids, batch_size, chosen, remembered)

    monkeypatch.setattr(apply, "apply_pending_batches", chosen_before_the_waiter)
    with user_locked(database_url, user["id"]):
        task = await post_task(client, user["id"], "write-off", 4)
        late.append(int(task["id"]))
        answer = await _get_waiting(client, task["id"], 10)
        started = time.monotonic()
    response = await asyncio.wait_for(answer, 15)
    body = await response.json()
    assert (response.status, body["status"], body["balance_after"]) == (200, "done", 6)
    assert time.monotonic() - started < 3  # the apply's own news, not the 10 s timeout


async def test_the_recheck_after_a_reconnect_tries_again_until_it_reads(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after a reconnect the pool is often still on the dead path: a re-check that fails
    tries again (it used to give up, and the waiter slept to its timeout)."""
    user = await create_user(client, "recheck", 10)
    waiters = client.server.app[keys.WAITERS]
    real = waiters_module.repository.get_tasks
    failures = []

    async def fails_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(1)
            raise DatabaseUnavailable("the pool is still on the old path")
        return await real(*args, **kwargs)

    with user_locked(database_url, user["id"]):
        task = await post_task(client, user["id"], "write-off", 4)
        started = time.monotonic()
        answer = await _get_waiting(client, task["id"], 20)
        _finish_unheard(sql, int(task["id"]), 6)
        monkeypatch.setattr(waiters_module.repository, "get_tasks", fails_once)
        waiters.connected()  # as the listener does when it is back
        response = await asyncio.wait_for(answer, 15)
    assert failures == [1]
    body = await response.json()
    assert (response.status, body["status"]) == (200, "done")
    assert time.monotonic() - started < 10  # the re-check's second try, not the 20 s timeout


async def test_a_waited_task_deleted_meanwhile_is_answered_with_its_first_202(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, sql
) -> None:
    """The one ?wait answer that is the 202 as first stored: the task is gone when the wait reads
    it. A replay of an Idempotency-Key has no task of its own in hand, so its wait reads."""
    user = await create_user(client, "deleted", 100)
    path = f"/api/v1/user/{user['id']}/amount/?wait=0.3"
    headers = {"Idempotency-Key": "deleted-meanwhile"}
    with user_locked(database_url, user["id"]):
        first = await client.post(path, json={"type": "write-off", "amount": 7}, headers=headers)
        assert first.status == 202
        stored = await first.json()
        sql.execute("DELETE FROM tasks WHERE id = %s", (int(stored["id"]),))
        again = await client.post(path, json={"type": "write-off", "amount": 7}, headers=headers)
    assert again.status == 202
    assert await again.json() == stored  # the stored answer: the task as it was created, pending
    assert again.headers["Location"] == f"/api/v1/task/{stored['id']}"
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_get_with_wait_on_a_finished_or_unknown_task(client: TestClient) -> None:
    user = await create_user(client, "done", 5)
    task = await post_task(client, user["id"], "replenishment", 5)
    finished = await client.get(f"/api/v1/task/{task['id']}?wait=30")
    assert (await finished.json())["status"] == "done"
    missing = await client.get("/api/v1/task/99999999?wait=5")
    assert (missing.status, (await missing.json())["error"]["code"]) == (404, "task_not_found")


@pytest.mark.parametrize(
    "query",
    [
        "wait=0",
        "wait=-1",
        "wait=30.01",
        "wait=31",
        "wait=",
        "wait=abc",
        "wait=nan",
        "wait=inf",
        "wait=1e400",
        "wait=0x10",
        "wait=%EF%BC%91",  # a full-width digit one
        "wait=1&wait=2",
        "wait=1&other=2",
    ],
)
async def test_bad_wait_is_400_and_creates_nothing(client: TestClient, sql, query: str) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "w", 100)
    response = await client.post(f"/api/v1/user/{user['id']}/amount/?{query}", json={"type": "write-off", "amount": 1})
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["code"] == "validation_failed"
    response = await client.get(f"/api/v1/task/1?{query}")
    assert response.status == 400
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 0


@pytest.mark.parametrize("value", ["30", "0.5", ".5", "1e1", "0.001"])
async def test_good_wait_values(client: TestClient, value: str) -> None:
    user = await create_user(client, "w", 100)
    response = await client.post(
        f"/api/v1/user/{user['id']}/amount/?wait={value}", json={"type": "write-off", "amount": 1}
    )
    assert response.status in (200, 202)


async def test_waiter_is_answered_within_50ms_of_its_task_finishing(client: TestClient, database_url: str) -> None:
    """The moment a task finishes is its commit, which is when PostgreSQL sends task_processed.
    This test LISTENs too and compares when the notification reached it with when the waiting
    request's answer did: both travel the same path from the same commit, so the difference is
    the service's own delay in waking the waiter, without timing noise from the database."""
    user = await create_user(client, "fast", 100)
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed"])
    loop = asyncio.get_running_loop()
    try:
        with user_locked(database_url, user["id"]) as lock:
            task = await post_task(client, user["id"], "write-off", 1)

            async def wait_for_answer() -> tuple[float, float, dict[str, object]]:
                response = await client.get(f"/api/v1/task/{task['id']}?wait=20")
                received, wall = loop.time(), time.time()
                return received, wall, await response.json()

            answer = asyncio.create_task(wait_for_answer())
            await eventually(lambda: _waiting(client, 1), timeout=5)
            lock.commit()  # let the worker finish it
            notification = await listener.next_notification(timeout=10)
            notified = loop.time()
            assert notification is not None and task["id"] in notification.payload
            received, wall, body = await asyncio.wait_for(answer, 10)
        assert body["status"] == "done"
        assert received - notified < 0.050, f"answered {1000 * (received - notified):.1f} ms after the commit"
        # And against the database's own clock: processed_at is set just before the commit.
        processed_at = dt.datetime.fromisoformat(str(body["processed_at"])).timestamp()
        assert -0.5 < wall - processed_at < 1.0
    finally:
        listener.close()


async def test_many_waiters_cost_no_connections(make_client, database_url: str) -> None:  # type: ignore[no-untyped-def]
    # Three pooled connections for 300 waiting requests: they hold none while they wait.
    client = await make_client(pool_max_size=3, worker_concurrency=2)
    user = await create_user(client, "crowd", 100)
    with user_locked(database_url, user["id"]) as lock:
        tasks = [await post_task(client, user["id"], "write-off", 1) for _ in range(3)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def wait(task_id: str) -> tuple[int, str]:
                async with session.get(client.make_url(f"/api/v1/task/{task_id}?wait=20")) as response:
                    return response.status, (await response.json())["status"]

            waiting = [asyncio.create_task(wait(tasks[n % 3]["id"])) for n in range(300)]
            await eventually(lambda: _waiting(client, 300), timeout=15)
            # Once they have read their task, only the worker stuck on the lock holds a connection.
            pool = client.server.app[keys.POOL]
            await eventually(lambda: pool.in_use <= 1, timeout=10)
            lock.commit()
            results = await asyncio.wait_for(asyncio.gather(*waiting), 15)
    assert results == [(200, "done")] * 300
    assert client.server.app[keys.WAITERS].waiting == 0


async def test_waiter_is_answered_after_the_listen_connection_comes_back(
    client: TestClient, database_url: str, pg_admin_dsn: str, sql
) -> None:  # type: ignore[no-untyped-def]
    """The task is applied by another process (here: the test's own apply) while this one's LISTEN
    connection is down, so its notification is lost; the re-check after the reconnect answers the
    waiter long before its timeout. (A task this process applies answers its waiters itself.)"""
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)
    user = await create_user(client, "reconnect", 10)
    dbname = dsn_database(database_url)
    admin = pg.admin_connection(pg_admin_dsn)
    other = await Pool.open(ConnectionOptions(database_url), min_size=1, max_size=1, acquire_timeout=5)
    try:
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            try:
                sql.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
                await eventually(lambda: not listener.connected, timeout=5)
                # Stored by hand: the task_created notification is lost too, nothing here wakes.
                sql.execute(
                    "INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'write-off', 4) RETURNING id",
                    (int(user["id"]),),
                )
                task_id = sql.fetchone()[0]
                started = time.monotonic()
                answer = asyncio.create_task(client.get(f"/api/v1/task/{task_id}?wait=25"))
                await eventually(lambda: _waiting(client, 1), timeout=5)
                applied = await apply.apply_pending_batches(other, [int(user["id"])], 100)
                assert [o.task_id for o in applied.outcomes[int(user["id"])]] == [task_id]
                assert not answer.done()
            finally:
                cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            response = await asyncio.wait_for(answer, 15)
    finally:
        await other.close()
    assert (response.status, (await response.json())["status"]) == (200, "done")
    assert time.monotonic() - started < 15  # well before its 25 s
