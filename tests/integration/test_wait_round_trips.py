"""The short path of a task (issue 22): the process that stores a task wakes its user's loop
itself, the apply transaction writes and commits in one round trip and checks its own writes, and
the process that applied a task answers its waiting requests itself; a task another process applied
still answers them, through the notification."""

from __future__ import annotations

import asyncio
import contextlib
import time

import psycopg2
import pytest
from aiohttp.test_utils import TestClient

from message_broker.db import apply
from message_broker.db.driver import Pool
from message_broker.db.options import ConnectionOptions, dsn_database
from message_broker.http import keys

from .. import pg
from ..conftest import StartServer
from ..helpers import call, create_user, eventually, samples, value, waits_for_a_lock
from .test_wait import user_locked


async def _post_wait(client: TestClient, user_id: str, amount: int) -> tuple[int, dict]:  # type: ignore[type-arg]
    response = await client.post(
        f"/api/v1/user/{user_id}/amount/?wait=5", json={"type": "replenishment", "amount": amount}
    )
    return response.status, await response.json()


async def test_a_task_is_applied_and_answered_without_any_notification(
    client: TestClient, database_url: str, pg_admin_dsn: str, sql
) -> None:  # type: ignore[no-untyped-def]
    """With the LISTEN connection down (no notification reaches the process), a POST ?wait is still
    answered 200 at once: the insert woke the user's loop in process, and the apply answered the
    waiter itself."""
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)
    user = await create_user(client, "no-notify", 0)
    dbname = dsn_database(database_url)
    admin = pg.admin_connection(pg_admin_dsn)
    with contextlib.closing(admin), admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            sql.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
            await eventually(lambda: not listener.connected, timeout=5)
            for amount in (3, 4):
                started = time.monotonic()
                status, task = await _post_wait(client, user["id"], amount)
                assert (status, task["status"]) == (200, "done")
                assert time.monotonic() - started < 2.5  # not the 5 s timeout
            assert not listener.connected
            # With no notification coming, a claim does not vouch for what it heard: each read.
            assert client.server.app[keys.WAITERS].reads == 2
        finally:
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    sql.execute("SELECT balance FROM users WHERE id = %s", (int(user["id"]),))
    assert sql.fetchone()[0] == 7


async def test_a_posted_task_is_waited_for_without_reading_it(client: TestClient) -> None:
    """POST ?wait needs no read of its own task: it claimed the finishes heard from before its
    insert was sent, and its waiter was registered before any apply could read it back. A GET
    ?wait of a task reads it once (it may have finished long ago)."""
    waiters = client.server.app[keys.WAITERS]
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)  # down, a claim reads (tested below)
    user = await create_user(client, "no-read", 0)
    for amount in (1, 2, 3):
        status, task = await _post_wait(client, user["id"], amount)
        assert (status, task["status"]) == (200, "done")
    assert waiters.reads == 0
    response = await client.get(f"/api/v1/task/{task['id']}?wait=5")
    assert (response.status, (await response.json())["status"]) == (200, "done")
    assert waiters.reads == 1
    assert not waiters.has_waiting()  # nothing kept once no request stores a task to wait for


@pytest.mark.parametrize("case", ["heard", "listener-reconnected", "forgotten"])
async def test_a_task_finished_before_its_waiter_is_registered_is_not_missed(
    client: TestClient, database_url: str, sql, monkeypatch, case: str
) -> None:  # type: ignore[no-untyped-def]
    """Another process may finish a task between its insert's commit and its waiter's registration.
    Heard then (its task_processed notification), the claim keeps it. Lost then (the LISTEN
    connection reconnected meanwhile: here the finish is made with triggers off, so nothing is
    sent), or heard and then forgotten (more finishes heard than are kept: one here), the waiter
    reads the task. Either way the answer is 200 at once, not 202 at the timeout."""
    waiters = client.server.app[keys.WAITERS]
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)
    user = await create_user(client, "early", 0)
    other = await create_user(client, "other", 0)
    locks = contextlib.ExitStack()
    locks.enter_context(user_locked(database_url, other["id"]))  # its task stays pending
    response = await client.post(f"/api/v1/user/{other['id']}/amount/", json={"type": "replenishment", "amount": 1})
    other_task = (await response.json())["id"]
    register = type(waiters).wait
    reconnected = case == "listener-reconnected"
    if case == "forgotten":
        monkeypatch.setattr(waiters, "_keep_at_most", 1)

    async def finished_elsewhere_first(self, task_id, timeout, **kwargs):  # type: ignore[no-untyped-def]
        # The user's row is locked: this process's own loop cannot apply the task meanwhile.
        finish = (
            "UPDATE tasks SET status = 'done', balance_after = amount, available_after = amount, "
            "processed_at = clock_timestamp() WHERE id = %s"
        )
        if reconnected:
            sql.execute("SET session_replication_role = replica")  # no trigger: no notification
            sql.execute(finish, (task_id,))
            sql.execute("SET session_replication_role = DEFAULT")
            waiters.connected()  # as the listener does when it is back
        else:
            sql.execute(finish, (task_id,))
            await eventually(lambda: task_id in waiters._kept, timeout=5, what="the finish is heard")
            if case == "forgotten":
                sql.execute(finish, (int(other_task),))
                await eventually(lambda: task_id not in waiters._kept, timeout=5, what="it is forgotten")
        return await register(self, task_id, timeout, **kwargs)

    with locks, user_locked(database_url, user["id"]):
        monkeypatch.setattr(type(waiters), "wait", finished_elsewhere_first)
        started = time.monotonic()
        status, task = await _post_wait(client, user["id"], 5)
        monkeypatch.undo()
    assert (status, task["status"], task["balance_after"]) == (200, "done", 5)
    assert time.monotonic() - started < 4  # not the 5 s timeout
    assert waiters.reads == int(case != "heard")


async def test_one_apply_transaction_per_task_stored_and_applied_here(client: TestClient) -> None:
    """The NOTIFY of a task this process stored comes back through its own LISTEN connection; it is
    recognised (the inserting backend's pid) and skipped: each task costs one look, not a second,
    empty one."""
    supervisor = client.server.app[keys.SUPERVISOR]
    user = await create_user(client, "one-look", 0)
    await eventually(lambda: supervisor.scans >= 1, timeout=5)  # the start-up scan is behind us
    looks, empty = supervisor.apply_transactions, supervisor.empty_applies
    rounds = 20
    for n in range(rounds):
        status, task = await _post_wait(client, user["id"], n + 1)
        assert (status, task["status"]) == (200, "done")
    # Every echo has come back by now (skipped, or heard before its insert's answer: then it woke
    # the loop, and the insert did not).
    await eventually(lambda: supervisor.echoes_expected == 0, timeout=5, what="every echo heard")
    assert supervisor.apply_transactions - looks == rounds
    assert supervisor.empty_applies == empty
    metrics = samples(await (await client.get("/metrics")).text())
    assert value(metrics, "message_broker_apply_transactions_total") == supervisor.apply_transactions
    assert value(metrics, "message_broker_apply_transactions_empty_total") == supervisor.empty_applies


async def test_a_lost_race_rolls_the_apply_transaction_back(database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    """Something finishes a task under a worker that holds its user's lock (bypassing the lock):
    the writes' own check fails inside the transaction, before its COMMIT, and nothing of the
    batch is written."""
    sql.execute("INSERT INTO users (username, balance) VALUES ('raced', 100) RETURNING id")
    user_id = sql.fetchone()[0]
    sql.execute("INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'write-off', 30) RETURNING id", (user_id,))
    task_id = sql.fetchone()[0]
    bypass = psycopg2.connect(database_url)  # a transaction of its own, left open
    pool = await Pool.open(ConnectionOptions(database_url), min_size=1, max_size=2, acquire_timeout=5)
    try:
        with bypass.cursor() as cur:
            cur.execute(
                "UPDATE tasks SET status = 'cancelled', reason = 'insufficient_funds', balance_after = 100,"
                " available_after = 100, processed_at = now() WHERE id = %s",
                (task_id,),
            )
        worker = asyncio.create_task(apply.apply_pending_batches(pool, [user_id], 100))
        waiting = waits_for_a_lock(sql, "finish_batches(")
        await eventually(waiting, timeout=10, what="the worker's writes wait on the row")
        bypass.commit()
        with pytest.raises(apply.LostRace, match="finished 0 of 1 tasks"):
            await worker
        # Nothing of the batch was written: the balance is untouched, the task as the bypass left it.
        sql.execute("SELECT balance FROM users WHERE id = %s", (user_id,))
        assert sql.fetchone()[0] == 100
        sql.execute("SELECT status, balance_after FROM tasks WHERE id = %s", (task_id,))
        assert sql.fetchone() == ("cancelled", 100)
        # The connection went back to the pool clean: the next look finds nothing pending.
        again = await apply.apply_pending_batches(pool, [user_id], 100)
        assert again.outcomes == {user_id: []}
    finally:
        bypass.close()
        await pool.close()


async def test_two_processes_a_waiter_answered_for_a_task_the_other_applied(
    start_server: StartServer, database_url: str
) -> None:
    """Two server processes on one database. A request waits on process A for a task stored
    through process B: B wakes its own loop first and applies it, and A's waiter is answered by
    the task_processed notification. POST ?wait on either is answered 200 by whichever applied."""
    a, b = await start_server(), await start_server()
    status, user = await call("POST", f"{a.url}/api/v1/user/", {"username": "two", "balance": 0})
    assert status == 201
    applied_by_b = 0
    # Which process's lock request reaches the row first is a race that B should win, not one it
    # always wins: right after start-up (the processes and their webhook sender children still
    # warming up, another core's worth of work on two) B lost five tries in a row 2 times in 9
    # through PgBouncer. Twenty tries outlast the start-up; B must still win one.
    for _ in range(20):
        before = await _applied(b.url)
        with user_locked(database_url, user["id"]) as lock:
            status, task = await call(
                "POST", f"{b.url}/api/v1/user/{user['id']}/amount/", {"type": "replenishment", "amount": 1}
            )
            assert status == 202
            answer = asyncio.create_task(call("GET", f"{a.url}/api/v1/task/{task['id']}?wait=10", timeout=15))
            await eventually(lambda: _waiting(a.url), timeout=5, what="A's request waits")
            started = time.monotonic()
            lock.rollback()
            status, finished = await answer
        assert (status, finished["status"]) == (200, "done")
        assert time.monotonic() - started < 5
        applied_by_b += int(await _applied(b.url) - before)
        if applied_by_b:
            break
    assert applied_by_b, "process B never applied the task it stored (it wakes its own loop first)"
    # POST ?wait to each: answered 200, whoever applies.
    for server in (a, b, a, b):
        status, task = await call(
            "POST", f"{server.url}/api/v1/user/{user['id']}/amount/?wait=5", {"type": "replenishment", "amount": 1}
        )
        assert (status, task["status"]) == (200, "done")


async def _applied(url: str) -> float:
    status, text = await call("GET", f"{url}/metrics")
    assert status == 200
    return value(samples(text), "message_broker_tasks_applied_total", type="replenishment")


async def _waiting(url: str) -> bool:
    status, text = await call("GET", f"{url}/metrics")
    return status == 200 and value(samples(text), "message_broker_waiting_requests") == 1
