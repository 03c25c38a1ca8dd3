"""Typed reads and writes of users, tasks and holds. Each function that takes the pool owns its
connection (and transaction); those that take a connection run inside the caller's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from ..ledger import HoldStatus, Reason, Status, TaskType
from ..models import HoldView, Task, User
from .driver import Connection, Pool, Row
from .errors import DatabaseError, ForeignKeyViolation, UniqueViolation
from .queries import query

T = TypeVar("T")


class UsernameTaken(Exception):
    pass


class HoldNotFound(Exception):
    """The hold a capture or void names is not a hold."""

    def __init__(self, hold_id: int | None) -> None:
        super().__init__(hold_id)
        self.hold_id = hold_id


class UserNotFound(Exception):
    """A user the request names does not exist (`user_id`: which one, when known)."""

    def __init__(self, user_id: int | None = None) -> None:
        super().__init__(user_id)
        self.user_id = user_id


# Enum members by value: a dict lookup is ~10x cheaper than calling the enum, once per row.
TASK_TYPES: Mapping[str, TaskType] = MappingProxyType({t.value: t for t in TaskType})
_STATUSES: Mapping[str, Status] = MappingProxyType({s.value: s for s in Status})
_REASONS: Mapping[str | None, Reason | None] = MappingProxyType({None: None, **{r.value: r for r in Reason}})
HOLD_STATUSES: Mapping[str, HoldStatus] = MappingProxyType({s.value: s for s in HoldStatus})


def user_from_row(row: Row) -> User:
    return User(id=row["id"], username=row["username"], balance=row["balance"], held=row["held"])


def task_from_row(row: Mapping[str, Any]) -> Task:
    """A task from its row (or from anything keyed like one: see task_from_payload)."""
    return Task(
        row["id"],
        row["user_id"],
        TASK_TYPES[row["type"]],
        row["amount"],
        _STATUSES[row["status"]],
        _REASONS[row["reason"]],
        row["balance_after"],
        row["available_after"],
        row["counterparty_id"],
        row["transfer_id"],
        row["hold_id"],
        row["expires_at"],
        row["created_at"],
        row["processed_at"],
        row["created_by"],
        row["reference"],
        row["metadata"],
    )


def task_from_payload(data: dict[str, Any]) -> Task:
    """A task from a task_processed payload (notify_task_processed in sql/migrations): the row
    as JSON, ids as text and timestamps as ISO text. Raises KeyError/ValueError/TypeError if it
    is not one."""
    for name in ("id", "user_id"):
        data[name] = int(data[name])
    for name in ("counterparty_id", "transfer_id", "hold_id"):
        if data.setdefault(name, None) is not None:
            data[name] = int(data[name])
    data.setdefault("available_after", data["balance_after"])  # a payload from before holds
    data.setdefault("created_by", None)  # a payload from before tokens
    data.setdefault("reference", None)  # payloads from before migration 0008
    data.setdefault("metadata", None)
    for name in ("expires_at", "created_at", "processed_at"):
        if data.setdefault(name, None) is not None:
            # Whatever time zone the finishing session had, show UTC like rows read from the pool.
            data[name] = datetime.fromisoformat(data[name]).astimezone(UTC)
    return task_from_row(data)


def hold_from_row(row: Row) -> HoldView:
    if row["status"] is not None:
        status = HOLD_STATUSES[row["status"]]
    else:  # no holds row: its hold task was not applied yet, or was cancelled
        status = HoldStatus.PENDING if row["task_status"] == Status.PENDING.value else HoldStatus.CANCELLED
    return HoldView(
        id=row["id"],
        user_id=row["user_id"],
        amount=row["amount"],
        status=status,
        captured_amount=row["captured_amount"],
        expires_at=row["expires_at"],
        resolved_by=row["resolved_by"],
    )


# -- users -----------------------------------------------------------------------------------------


async def insert_user(conn: Connection, username: str, balance: int) -> User:
    try:
        row = await conn.fetch_one(query("create_user"), {"username": username, "balance": balance})
    except UniqueViolation:
        raise UsernameTaken(username) from None
    assert row is not None
    return user_from_row(row)


async def create_user(pool: Pool, username: str, balance: int) -> User:
    async with pool.acquire() as conn:
        return await insert_user(conn, username, balance)


async def get_user(pool: Pool, user_id: int) -> User | None:
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("get_user"), {"user_id": user_id})
    return user_from_row(row) if row else None


async def list_users(pool: Pool, *, after: int, limit: int) -> list[User]:
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("list_users"), {"after": after, "limit": limit})
    return [user_from_row(row) for row in rows]


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


async def find_users_by_username_prefix(pool: Pool, prefix: str, *, after: str, limit: int) -> list[User]:
    """Users whose username starts with `prefix`, in byte order, after the username `after`."""
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(
            query("find_users_by_username_prefix"), {"pattern": pattern, "after": after, "limit": limit}
        )
    return [user_from_row(row) for row in rows]


# -- tasks -----------------------------------------------------------------------------------------


class ReferenceTaken(Exception):
    """A task of the same user already has this reference (`task_id`: that task)."""

    def __init__(self, reference: str, task_id: int) -> None:
        super().__init__(reference, task_id)
        self.reference = reference
        self.task_id = task_id


class NewTask(NamedTuple):
    """A task to store. Which of the optional fields a type needs is the schema's business
    (tasks_shape_of_type in migration 0004); the API fills them in. A capture or void names its
    hold and no user: the hold gives the user and, without an amount, the amount."""

    user_id: int | None
    type: TaskType
    amount: int | None
    counterparty_id: int | None = None
    hold_id: int | None = None
    expires_in: int | None = None  # seconds, for a hold
    created_by: str | None = None  # the name of the token that posted it
    reference: str | None = None
    metadata: str | None = None  # a JSON object as text, or None


class Stored(NamedTuple):
    """What insert_tasks stored (or why not, task by task), and the server process that stored it
    (None if nothing was): its commit's task_created notifications carry that pid."""

    results: list[Task | Exception]
    backend_pid: int | None


async def insert_tasks(conn: Connection, tasks: Sequence[NewTask]) -> Stored:
    """Store pending tasks in one statement on the caller's connection (so inside its
    transaction, if any). Where a task could not be stored, why: UserNotFound (its user or
    recipient), HoldNotFound or ReferenceTaken; nothing is stored for it, and the others are.
    The insert trigger NOTIFYs each user once at commit."""
    if any(t.user_id is None for t in tasks):
        completed = await _with_their_holds(conn, tasks)
    else:
        completed = list(tasks)
    params = {
        "user_ids": [t.user_id for t in completed],
        "types": [t.type.value for t in completed],
        "amounts": [t.amount for t in completed],
        "counterparty_ids": _unless_all_none([t.counterparty_id for t in completed]),
        "hold_ids": _unless_all_none([t.hold_id for t in completed]),
        "expires_in": _unless_all_none([t.expires_in for t in completed]),
        "references": _unless_all_none([t.reference for t in completed]),
        "metadata": _unless_all_none([t.metadata for t in completed]),
        "created_by": _unless_all_none([t.created_by for t in completed]),
    }
    rows = await conn.fetch_all(query("insert_tasks"), params)
    stored: list[Task | Exception] = [not_stored(task) for task in tasks]
    for row in rows:
        stored[row["ord"] - 1] = task_from_row(row)
    left_out = [(i, t) for i, t in enumerate(completed) if t.reference is not None and isinstance(stored[i], Exception)]
    if left_out:
        await _name_taken_references(conn, left_out, stored)
    return Stored(stored, rows[0]["backend_pid"] if rows else None)


async def _name_taken_references(
    conn: Connection, left_out: list[tuple[int, NewTask]], stored: list[Task | Exception]
) -> None:
    """Mark the tasks left out because their user already has a task with their reference."""
    pairs = [(t.user_id, t.reference) for _, t in left_out if t.user_id is not None]
    if not pairs:
        return
    rows = await conn.fetch_all(
        query("tasks_by_reference"),
        {"user_ids": [user_id for user_id, _ in pairs], "references": [reference for _, reference in pairs]},
    )
    holders = {(row["user_id"], row["reference"]): row["id"] for row in rows}
    for i, task in left_out:
        holder = holders.get((task.user_id, task.reference))
        if holder is not None and task.reference is not None:
            stored[i] = ReferenceTaken(task.reference, holder)


def _unless_all_none(values: list[T | None]) -> list[T | None] | None:
    """None (SQL NULL: no list) rather than a list of nothing but NULLs: the usual case, cheaper to send."""
    return None if all(v is None for v in values) else values


async def _with_their_holds(conn: Connection, tasks: Sequence[NewTask]) -> list[NewTask]:
    """Captures and voids with the user and (when they name none) the amount of their hold; a
    task whose hold is not a hold keeps no user, and so is not stored, and names no hold either:
    insert_tasks locks each named hold (hold_release_lock, migration 0017: a constant plus the id,
    which overflows bigint for an id near 2^63 that no hold has) and has nothing to lock for it.
    One query for the batch."""
    named = [t.hold_id for t in tasks if t.user_id is None]
    rows = await conn.fetch_all(query("holds_named"), {"hold_ids": named})
    holds = {row["id"]: row for row in rows}
    completed = []
    for task in tasks:
        if task.user_id is None:
            hold = holds.get(task.hold_id)
            if hold is None:
                task = task._replace(hold_id=None)
            else:
                task = task._replace(user_id=hold["user_id"], amount=task.amount or hold["amount"])
        completed.append(task)
    return completed


async def insert_task(conn: Connection, task: NewTask) -> tuple[Task, int]:
    """One pending task on the caller's connection, and the server process that stored it; raises
    UserNotFound, HoldNotFound (for a task that names a hold) or ReferenceTaken."""
    (stored,), backend_pid = await insert_tasks(conn, [task])
    if isinstance(stored, Exception):
        raise stored
    assert backend_pid is not None  # a row came back
    return stored, backend_pid


def not_stored(task: NewTask) -> Exception:
    """Why insert_tasks stored nothing for `task`, its reference aside."""
    return HoldNotFound(task.hold_id) if task.user_id is None else UserNotFound(task.user_id)


# (backend pid, the tasks one commit stored, when its statement was sent: time.monotonic())
Committed = Callable[[int, list[Task], float], None]


async def enqueue_tasks(
    pool: Pool, tasks: Sequence[NewTask], on_committed: Committed | None = None
) -> list[Task | Exception]:
    """Store many pending tasks in one statement and one commit (see insert_tasks).
    `on_committed` runs after each commit, with the tasks it stored."""
    async with pool.acquire() as conn:
        sent_at = time.monotonic()
        try:
            stored = await insert_tasks(conn, tasks)
        except ForeignKeyViolation:
            pass
        else:
            _committed(stored, sent_at, on_committed)
            return stored.results
    # Only if a row a task refers to was deleted under us (the service never deletes any): store
    # what can be, each on its own.
    return [await _enqueue_one(pool, task, on_committed) for task in tasks]


async def _enqueue_one(pool: Pool, task: NewTask, on_committed: Committed | None) -> Task | Exception:
    async with pool.acquire() as conn:
        sent_at = time.monotonic()
        try:
            stored = await insert_tasks(conn, [task])
        except ForeignKeyViolation:
            return not_stored(task)
        _committed(stored, sent_at, on_committed)
        return stored.results[0]


def _committed(stored: Stored, sent_at: float, on_committed: Committed | None) -> None:
    tasks = [task for task in stored.results if isinstance(task, Task)]
    if on_committed is not None and tasks and stored.backend_pid is not None:
        on_committed(stored.backend_pid, tasks, sent_at)


async def get_task(pool: Pool, task_id: int) -> Task | None:
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("get_task"), {"task_id": task_id})
    return task_from_row(row) if row else None


async def get_tasks(pool: Pool, task_ids: Sequence[int]) -> dict[int, Task]:
    """The tasks that exist among `task_ids`, by id."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("get_tasks"), {"task_ids": list(task_ids)})
    return {row["id"]: task_from_row(row) for row in rows}


async def find_user_task_by_reference(pool: Pool, user_id: int, reference: str) -> Task | None:
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("find_user_task_by_reference"), {"user_id": user_id, "reference": reference})
    return task_from_row(row) if row else None


async def list_user_tasks(
    pool: Pool,
    user_id: int,
    *,
    limit: int,
    after: int = 0,
    before: int | None = None,
    filters: Mapping[str, list[str] | None],
) -> list[Task]:
    """A user's tasks: id ascending after `after`, or, given `before`, newest first below it; only
    those that pass every filter (each filter the query names -> the values it may have; None: any)."""
    params: dict[str, Any] = {"user_id": user_id, "limit": limit, **filters}
    async with pool.acquire() as conn:
        if before is None:
            rows = await conn.fetch_all(query("list_user_tasks"), {**params, "after": after})
        else:
            rows = await conn.fetch_all(query("list_user_tasks_newest_first"), {**params, "before": before})
    return [task_from_row(row) for row in rows]


async def find_user_by_username(pool: Pool, username: str) -> User | None:
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("find_user_by_username"), {"username": username})
    return user_from_row(row) if row else None


async def users_with_pending_tasks(pool: Pool) -> list[int]:
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("users_with_pending_tasks"))
    return [row["user_id"] for row in rows]


async def count_pending(pool: Pool, timeout: float) -> int:
    """Tasks pending in the whole database; raises DatabaseError (or QueryTimeout) past `timeout`.
    One round trip: the query's SET LOCAL holds in the implicit transaction of its one message."""
    async with asyncio.timeout(timeout), pool.acquire() as conn:
        row = await conn.fetch_one(query("count_pending"))
    assert row is not None
    return int(row["pending"])


async def ping(pool: Pool, timeout: float) -> bool:
    """True if a pooled connection answers within `timeout` seconds that the database takes writes."""
    try:
        async with asyncio.timeout(timeout), pool.acquire() as conn:
            row = await conn.fetch_one(query("writable"))
    except (DatabaseError, TimeoutError):
        return False
    return row is not None and bool(row["writable"])


# -- holds -----------------------------------------------------------------------------------------


async def get_hold(pool: Pool, hold_id: int) -> HoldView | None:
    """The hold whose hold task has this id; None if that is not a hold task."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("get_hold"), {"hold_id": hold_id})
    return hold_from_row(row) if row else None


async def list_user_holds(
    pool: Pool, user_id: int, *, after: int, limit: int, statuses: Sequence[HoldStatus] | None = None
) -> list[HoldView]:
    params = {
        "user_id": user_id,
        "after": after,
        "limit": limit,
        "hold_statuses": None if statuses is None else [s.value for s in statuses],
    }
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("list_user_holds"), params)
    return [hold_from_row(row) for row in rows]


async def next_hold_deadline(pool: Pool) -> float | None:
    """Seconds until the earliest deadline of an active hold (<= 0: passed); None without one."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("next_hold_deadline"))
    return None if row is None or row["seconds"] is None else float(row["seconds"])


async def release_expired_holds(pool: Pool, limit: int) -> int:
    """Queue a release task for up to `limit` active holds past their deadline; how many."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("release_expired_holds"), {"limit": limit})
    return len(rows)


# -- maintenance -----------------------------------------------------------------------------------


async def claim_maintenance_run(pool: Pool, job: str, interval: float) -> bool:
    """True if this process should run `job` now: it has not started anywhere for `interval` s."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("claim_maintenance_run"), {"job": job, "interval": interval})
    return row is not None


async def table_sizes(pool: Pool, tables: Sequence[str], timeout: float) -> dict[str, tuple[int, int]]:
    """{table: (live rows as the statistics estimate them, bytes on disk with indexes)}."""
    async with asyncio.timeout(timeout), pool.acquire() as conn:
        rows = await conn.fetch_all(query("table_sizes"), {"tables": list(tables)})
    return {row["name"]: (int(row["rows"]), int(row["bytes"])) for row in rows}
