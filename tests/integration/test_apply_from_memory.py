"""The apply from what a process remembers (issue 22): one round trip when the database holds exactly
what is remembered; when it holds anything else, nothing of the guess is written and the batch is
applied from what the database holds, with the outcomes the usual apply gives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import psycopg2
import pytest
from aiohttp.test_utils import TestClient

from message_broker.db import apply
from message_broker.db.driver import Connection, Pool
from message_broker.db.options import ConnectionOptions
from message_broker.http import keys
from message_broker.ledger import Account, PendingTask, TaskType

from ..conftest import StartServer
from ..helpers import call, create_user, eventually, samples, value, waits_for_a_lock


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    pool = await Pool.open(ConnectionOptions(database_url), min_size=1, max_size=2, acquire_timeout=5)
    yield pool
    await pool.close()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every message the driver sends (a spy on the real connection: each call is one round trip)."""
    sent: list[str] = []
    for name in ("fetch_all", "execute"):
        real = getattr(Connection, name)

        def spy(self, sql, params=None, *, _real=real):  # type: ignore[no-untyped-def]
            sent.append(sql)
            return _real(self, sql, params)

        monkeypatch.setattr(Connection, name, spy)
    return sent


def _user(sql, balance: int, held: int = 0) -> int:  # type: ignore[no-untyped-def]
    sql.execute(
        "INSERT INTO users (username, balance, held) VALUES (md5(random()::text), %s, %s) RETURNING id", (balance, held)
    )
    return int(sql.fetchone()[0])


def _task(sql, user_id: int, kind: str, amount: int, counterparty: int | None = None) -> PendingTask:  # type: ignore[no-untyped-def]
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount, counterparty_id) VALUES (%s, %s, %s, %s) RETURNING id, created_at",
        (user_id, kind, amount, counterparty),
    )
    task_id, created_at = sql.fetchone()
    return PendingTask(task_id, TaskType(kind), amount, counterparty, None, created_at)


def _state(sql, user_id: int) -> tuple[int, int, list[tuple[str, str | None, int | None]]]:  # type: ignore[no-untyped-def]
    sql.execute("SELECT balance, held FROM users WHERE id = %s", (user_id,))
    balance, held = sql.fetchone()
    sql.execute("SELECT status, reason, balance_after FROM tasks WHERE user_id = %s ORDER BY id", (user_id,))
    return balance, held, sql.fetchall()


async def test_nothing_differs_one_round_trip(pool: Pool, sql, round_trips: list[str]) -> None:  # type: ignore[no-untyped-def]
    user_id = _user(sql, 100)
    tasks = [_task(sql, user_id, "write-off", 30), _task(sql, user_id, "replenishment", 5)]
    remembered = apply.Remembered({user_id: Account(100, 0)}, {user_id: tasks})
    batch = await apply.apply_pending_batches(pool, [user_id], 100, lambda task_id: True, remembered)
    assert batch.remembered
    assert len(round_trips) == 1
    assert batch.deferred == frozenset()  # nothing left: the loop waits to be woken
    assert _state(sql, user_id) == (75, 0, [("done", None, 70), ("done", None, 75)])
    assert batch.accounts == {user_id: Account(75, 0)}
    assert [task.balance_after for task in batch.waited] == [70, 75]
    assert all(isinstance(task.processed_at, datetime) for task in batch.waited)
    assert len(batch.latencies) == 2


# Each way the database can differ from what is remembered (an account of 100, nothing held, a
# write-off of 30 and a replenishment of 5 pending), made by hand, and the state the usual apply
# leaves from there.
Change = Callable[..., None]


def _balance(sql, user_id: int, tasks: list[PendingTask]) -> None:  # type: ignore[no-untyped-def]
    sql.execute("UPDATE users SET balance = 20 WHERE id = %s", (user_id,))


def _held(sql, user_id: int, tasks: list[PendingTask]) -> None:  # type: ignore[no-untyped-def]
    sql.execute("UPDATE users SET held = 80 WHERE id = %s", (user_id,))


def _finished(sql, user_id: int, tasks: list[PendingTask]) -> None:  # type: ignore[no-untyped-def]
    sql.execute(
        "UPDATE tasks SET status = 'cancelled', reason = 'insufficient_funds', balance_after = 100,"
        " available_after = 100, processed_at = now() WHERE id = %s",
        (tasks[0].id,),
    )


def _amount(sql, user_id: int, tasks: list[PendingTask]) -> None:  # type: ignore[no-untyped-def]
    sql.execute("UPDATE tasks SET amount = 50 WHERE id = %s", (tasks[0].id,))


def _kind(sql, user_id: int, tasks: list[PendingTask]) -> None:  # type: ignore[no-untyped-def]
    sql.execute("UPDATE tasks SET type = 'replenishment' WHERE id = %s", (tasks[0].id,))


def _earlier_task(sql, user_id: int, tasks: list[PendingTask]) -> None:  # type: ignore[no-untyped-def]
    # A pending task with a smaller id than a remembered one (another process's).
    sql.execute(
        "INSERT INTO tasks (id, user_id, type, amount) OVERRIDING SYSTEM VALUE VALUES (%s, %s, 'write-off', 90)",
        (tasks[0].id + 1, user_id),
    )


def _earlier_transfer(sql, user_id: int, tasks: list[PendingTask]) -> None:  # type: ignore[no-untyped-def]
    recipient = _user(sql, 0)
    sql.execute(
        "INSERT INTO tasks (id, user_id, type, amount, counterparty_id) OVERRIDING SYSTEM VALUE"
        " VALUES (%s, %s, 'transfer', 60, %s)",
        (tasks[0].id + 1, user_id, recipient),
    )


DIFFERENCES: dict[str, tuple[Change, tuple[int, int, list[tuple[str, str | None, int | None]]]]] = {
    "balance": (_balance, (25, 0, [("cancelled", "insufficient_funds", 20), ("done", None, 25)])),
    "held": (_held, (105, 80, [("cancelled", "insufficient_funds", 100), ("done", None, 105)])),
    "task-finished": (_finished, (105, 0, [("cancelled", "insufficient_funds", 100), ("done", None, 105)])),
    "task-amount": (_amount, (55, 0, [("done", None, 50), ("done", None, 55)])),
    "task-type": (_kind, (135, 0, [("done", None, 130), ("done", None, 135)])),
    "earlier-task": (
        _earlier_task,
        (75, 0, [("done", None, 70), ("cancelled", "insufficient_funds", 70), ("done", None, 75)]),
    ),
    "earlier-transfer": (_earlier_transfer, (15, 0, [("done", None, 70), ("done", None, 10), ("done", None, 15)])),
}


@pytest.mark.parametrize("difference", sorted(DIFFERENCES))
async def test_anything_else_in_the_database_is_applied_as_it_is(
    pool: Pool, sql, round_trips: list[str], difference: str
) -> None:  # type: ignore[no-untyped-def]
    user_id = _user(sql, 100)
    # Ids two apart: room for another process's task between them.
    first = _task(sql, user_id, "write-off", 30)
    sql.execute("SELECT nextval(pg_get_serial_sequence('tasks', 'id'))")
    tasks = [first, _task(sql, user_id, "replenishment", 5)]
    change, expected = DIFFERENCES[difference]
    change(sql, user_id, tasks)
    remembered = apply.Remembered({user_id: Account(100, 0)}, {user_id: tasks})
    batch = await apply.apply_pending_batches(pool, [user_id], 100, remembered=remembered)
    assert not batch.remembered
    # The guess (one round trip, nothing written), then the usual apply: the lock and read, the
    # writes; a transfer's batch also locks its recipient.
    assert len(round_trips) == (4 if difference == "earlier-transfer" else 3)
    assert _state(sql, user_id) == expected
    balance, held, _ = expected
    assert batch.accounts == {user_id: Account(balance, held)}


async def test_a_later_task_not_remembered_is_left_and_its_user_looked_at_again(pool: Pool, sql) -> None:  # type: ignore[no-untyped-def]
    user_id = _user(sql, 100)
    tasks = [_task(sql, user_id, "write-off", 30)]
    later = _task(sql, user_id, "write-off", 50)
    remembered = apply.Remembered({user_id: Account(100, 0)}, {user_id: tasks})
    batch = await apply.apply_pending_batches(pool, [user_id], 100, remembered=remembered)
    assert batch.remembered
    assert _state(sql, user_id) == (70, 0, [("done", None, 70), ("pending", None, None)])
    # Its wake-up may have come before the batch: the loop looks again at once, as after a batch
    # cut short, and the usual apply reads it.
    assert batch.deferred == {user_id}
    again = await apply.apply_pending_batches(pool, [user_id], 100)
    assert [outcome.task_id for outcome in again.outcomes[user_id]] == [later.id]
    assert _state(sql, user_id) == (20, 0, [("done", None, 70), ("done", None, 20)])


async def test_what_is_checked_is_read_once_the_lock_is_granted(database_url: str, pool: Pool, sql) -> None:  # type: ignore[no-untyped-def]
    """A transaction that holds the user's lock and changes the account commits while the apply
    waits for the lock: the check sees its change (a fresh snapshot after the lock), and the batch
    is applied from it."""
    user_id = _user(sql, 100)
    tasks = [_task(sql, user_id, "write-off", 30)]
    other = psycopg2.connect(database_url)
    try:
        with other.cursor() as cur:
            cur.execute("UPDATE users SET balance = 10 WHERE id = %s", (user_id,))
        remembered = apply.Remembered({user_id: Account(100, 0)}, {user_id: tasks})
        worker = asyncio.create_task(apply.apply_pending_batches(pool, [user_id], 100, remembered=remembered))
        waiting = waits_for_a_lock(sql, "finish_as_remembered")
        await eventually(waiting, timeout=10, what="the apply waits for the user's lock")
        other.commit()
        batch = await worker
    finally:
        other.close()
    assert not batch.remembered
    assert _state(sql, user_id) == (10, 0, [("cancelled", "insufficient_funds", 10)])


async def test_posts_through_the_service_are_applied_from_memory_and_a_change_by_hand_is_seen(
    client: TestClient, sql
) -> None:  # type: ignore[no-untyped-def]
    supervisor = client.server.app[keys.SUPERVISOR]
    # The start-up scan would wake the loop once more: a look before the task's answer came,
    # applied from the database.
    await eventually(lambda: supervisor.scans >= 1, timeout=5, what="the start-up scan is behind us")
    user = await create_user(client, "remembered", 100)

    async def write_off(amount: int) -> dict:  # type: ignore[type-arg]
        response = await client.post(
            f"/api/v1/user/{user['id']}/amount/?wait=5", json={"type": "write-off", "amount": amount}
        )
        assert response.status == 200
        return await response.json()  # type: ignore[no-any-return]

    # An insert's echo can be read before its answer, from a server process none of this process's
    # inserts has used yet (a pool connection's first): the answer tells it was ours.
    for expected in (90, 80, 70, 60, 50):
        assert (await write_off(10))["balance_after"] == expected
    # (The answer may come from the task_processed notification before its apply has ended.)
    await eventually(lambda: supervisor._applier.in_flight == 0, timeout=5, what="the last apply has ended")
    assert supervisor.applies_from_memory == 4  # the first apply read the account
    assert supervisor.memory_differed == 0
    # The account is remembered as the last apply left it.
    assert supervisor.memory._accounts.get(int(user["id"])) == Account(50, 0)
    sql.execute("UPDATE users SET balance = 1000 WHERE id = %s", (int(user["id"]),))
    task = await write_off(10)
    assert (task["status"], task["balance_after"]) == ("done", 990)
    await eventually(lambda: supervisor._applier.in_flight == 0, timeout=5, what="the apply has ended")
    assert supervisor.memory_differed == 1
    assert (await write_off(10))["balance_after"] == 980
    metrics = samples(await (await client.get("/metrics")).text())
    name = "message_broker_apply_transactions_from_memory_total"
    assert value(metrics, name, outcome="applied") == supervisor.applies_from_memory
    assert value(metrics, name, outcome="differed") == supervisor.memory_differed


async def test_two_processes_taking_turns_on_one_user(start_server: StartServer) -> None:
    """Each process remembers the account as its own last apply left it; the other's applies in
    between make the database differ, and every outcome is the one of the tasks in order."""
    a, b = await start_server(), await start_server()
    status, user = await call("POST", f"{a.url}/api/v1/user/", {"username": "turns", "balance": 50})
    assert status == 201
    balance = 50
    for n in range(24):
        server = (a, b)[n % 2]
        kind, amount = ("write-off", 40) if n % 3 else ("replenishment", 30)
        status, task = await call(
            "POST", f"{server.url}/api/v1/user/{user['id']}/amount/?wait=5", {"type": kind, "amount": amount}
        )
        assert status == 200
        if kind == "replenishment":
            balance += amount
            assert (task["status"], task["balance_after"]) == ("done", balance)
        elif amount <= balance:
            balance -= amount
            assert (task["status"], task["balance_after"]) == ("done", balance)
        else:
            assert (task["status"], task["reason"], task["balance_after"]) == (
                "cancelled",
                "insufficient_funds",
                balance,
            )
    status, found = await call("GET", f"{b.url}/api/v1/user/{user['id']}")
    assert (status, found["balance"]) == (200, balance)
