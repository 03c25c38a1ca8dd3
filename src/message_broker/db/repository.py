"""Typed operations on users and tasks. Each function owns its connection and transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..ledger import Outcome, PendingTask, Reason, Status, TaskType, apply_batch
from ..models import Task, User
from .connector import Connection, Pool, Row
from .errors import DatabaseError, ForeignKeyViolation, UniqueViolation
from .queries import query


class UsernameTaken(Exception):
    pass


class UserNotFound(Exception):
    pass


class LostRace(Exception):
    """Tasks changed under a worker that held the user's lock: someone bypassed the lock."""


def _user(row: Row) -> User:
    return User(id=row["id"], username=row["username"], balance=row["balance"])


# Enum members by value: a dict lookup is ~10x cheaper than calling the enum, once per row.
_TYPES = {t.value: t for t in TaskType}
_STATUSES = {s.value: s for s in Status}
_REASONS: dict[str | None, Reason | None] = {None: None, **{r.value: r for r in Reason}}


def _task(row: Row) -> Task:
    return Task(
        id=row["id"],
        user_id=row["user_id"],
        type=_TYPES[row["type"]],
        amount=row["amount"],
        status=_STATUSES[row["status"]],
        reason=_REASONS[row["reason"]],
        balance_after=row["balance_after"],
        created_at=row["created_at"],
        processed_at=row["processed_at"],
    )


async def insert_user(conn: Connection, username: str, balance: int) -> User:
    """A new user on the caller's connection (so inside its transaction, if any)."""
    try:
        row = await conn.fetch_one(query("create_user"), {"username": username, "balance": balance})
    except UniqueViolation:
        raise UsernameTaken(username) from None
    assert row is not None
    return _user(row)


async def create_user(pool: Pool, username: str, balance: int) -> User:
    async with pool.acquire() as conn:
        return await insert_user(conn, username, balance)


async def get_user(pool: Pool, user_id: int) -> User | None:
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("get_user"), {"user_id": user_id})
    return _user(row) if row else None


async def list_users(pool: Pool, *, after: int, limit: int) -> list[User]:
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("list_users"), {"after": after, "limit": limit})
    return [_user(row) for row in rows]


async def iter_users(pool: Pool, *, after: int = 0, page_size: int = 1000) -> AsyncIterator[list[User]]:
    """Every user after `after`, id ascending, a page at a time: memory stays flat however many
    there are, and no connection is held between pages."""
    while True:
        page = await list_users(pool, after=after, limit=page_size)
        if not page:
            return
        yield page
        if len(page) < page_size:
            return
        after = page[-1].id


async def insert_task(conn: Connection, user_id: int, task_type: TaskType, amount: int) -> Task:
    """One pending task on the caller's connection (so inside its transaction, if any); the insert
    trigger NOTIFYs task_created at commit."""
    try:
        row = await conn.fetch_one(
            query("enqueue_task"), {"user_id": user_id, "type": task_type.value, "amount": amount}
        )
    except ForeignKeyViolation:
        raise UserNotFound(user_id) from None
    assert row is not None
    return _task(row)


async def enqueue_task(pool: Pool, user_id: int, task_type: TaskType, amount: int) -> Task:
    """Store one pending task in a transaction of its own."""
    async with pool.acquire() as conn:
        return await insert_task(conn, user_id, task_type, amount)


@dataclass(frozen=True)
class NewTask:
    user_id: int
    type: TaskType
    amount: int


async def enqueue_tasks(pool: Pool, tasks: Sequence[NewTask]) -> list[Task | None]:
    """Store many pending tasks in one statement and one commit; None where the user does not
    exist (nothing is stored for it). The insert trigger NOTIFYs each user once at commit."""
    params = {
        "user_ids": [t.user_id for t in tasks],
        "types": [t.type.value for t in tasks],
        "amounts": [t.amount for t in tasks],
    }
    async with pool.acquire() as conn:
        try:
            rows = await conn.fetch_all(query("enqueue_tasks"), params)
        except ForeignKeyViolation:
            # Only if a user was deleted under us (the API never deletes one): store what can be.
            return [await _enqueue_one(pool, t) for t in tasks]
    stored: list[Task | None] = [None] * len(tasks)
    for row in rows:
        stored[row["ord"] - 1] = _task(row)
    return stored


async def _enqueue_one(pool: Pool, task: NewTask) -> Task | None:
    try:
        return await enqueue_task(pool, task.user_id, task.type, task.amount)
    except UserNotFound:
        return None


async def get_task(pool: Pool, task_id: int) -> Task | None:
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("get_task"), {"task_id": task_id})
    return _task(row) if row else None


async def list_user_tasks(pool: Pool, user_id: int, *, after: int, limit: int) -> list[Task]:
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("list_user_tasks"), {"user_id": user_id, "after": after, "limit": limit})
    return [_task(row) for row in rows]


async def users_with_pending_tasks(pool: Pool) -> list[int]:
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("users_with_pending_tasks"))
    return [row["user_id"] for row in rows]


@dataclass(frozen=True)
class AppliedBatch:
    """What one apply transaction did: each user's outcomes (in task order), the type of every
    task applied, and each task's seconds from created_at to processed_at."""

    outcomes: dict[int, list[Outcome]]
    task_types: dict[int, TaskType]
    latencies: list[float]


async def apply_pending_batches(pool: Pool, user_ids: Sequence[int], batch_size: int) -> AppliedBatch:
    """Apply up to `batch_size` of each user's oldest pending tasks, all in one transaction.

    Locking the users' rows first serialises every worker of every process on each user, so each
    task is applied exactly once and in id order. Returns each user's outcomes ([] when nothing
    was pending or the user does not exist). Round trips: BEGIN with the lock and the read, the
    outcomes, COMMIT.
    """
    found: dict[int, list[Outcome]] = {user_id: [] for user_id in user_ids}
    task_types: dict[int, TaskType] = {}
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch_all(query("lock_and_read_pending"), {"user_ids": sorted(found), "limit": batch_size})
        balances: dict[int, int] = {}
        pending: dict[int, list[PendingTask]] = {}
        for row in rows:
            if row["id"] is not None:
                balances[row["user_id"]] = row["balance"]
                task_type = task_types[row["id"]] = _TYPES[row["type"]]
                pending.setdefault(row["user_id"], []).append(PendingTask(row["id"], task_type, row["amount"]))
        if not pending:
            return AppliedBatch(found, {}, [])
        params: dict[str, list[Any]] = {
            key: [] for key in ("ids", "task_users", "statuses", "reasons", "balances_after", "user_ids", "balances")
        }
        for user_id, tasks in pending.items():
            balance, outcomes = apply_batch(balances[user_id], tasks)
            found[user_id] = outcomes
            params["user_ids"].append(user_id)
            params["balances"].append(balance)
            for o in outcomes:
                params["ids"].append(o.task_id)
                params["task_users"].append(user_id)
                params["statuses"].append(o.status.value)
                params["reasons"].append(o.reason.value if o.reason else None)
                params["balances_after"].append(o.balance_after)
        result = await conn.fetch_one(query("finish_batches"), params)
        if result is None or result["finished"] != len(params["ids"]) or result["users"] != len(pending):
            raise LostRace(f"users {sorted(pending)}: expected {len(params['ids'])} pending tasks, finished {result}")
    return AppliedBatch(found, task_types, list(result["latencies"] or []))


async def apply_pending_batch(pool: Pool, user_id: int, batch_size: int) -> list[Outcome]:
    """One user's batch (see apply_pending_batches)."""
    return (await apply_pending_batches(pool, [user_id], batch_size)).outcomes[user_id]


async def count_pending(pool: Pool, timeout: float) -> int:
    """Tasks pending in the whole database; raises DatabaseError (or QueryTimeout) past `timeout`."""
    async with asyncio.timeout(timeout), pool.acquire() as conn, conn.transaction():
        row = await conn.fetch_one(query("count_pending"))
    assert row is not None
    return int(row["pending"])


async def ping(pool: Pool, timeout: float) -> bool:
    """True if a pooled connection answers a query within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout), pool.acquire() as conn:
            await conn.execute(query("probe"))
    except (DatabaseError, TimeoutError):
        return False
    return True
