"""The apply transaction: lock the accounts a batch touches, read their state and pending tasks,
run the ledger's rules, write every outcome and effect back, in one transaction.

Round trips: two. BEGIN with the lock and the read in one message; the writes, COMMIT, and the
read-back of the finished tasks that requests of this process wait for in the next (the writes check
themselves: see finish_batches). Batches with transfers or that name holds add one round trip each
to read the recipients and the holds.

One, when the caller remembers the users (worker/account_memory.py): the rules run on the accounts as
this process's last apply left them and on the tasks it stored since, and BEGIN, the writes (which
the database makes only if it holds exactly that: finish_as_remembered), COMMIT and the read-back go
in one message. If anything differs, nothing is written and the batch is applied as above: three
round trips in all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..ledger import Account, BatchResult, Hold, PendingTask, apply_batches
from ..models import AppliedBatch, Task
from .driver import Connection, Pool, Row
from .errors import WriteCheckFailed
from .queries import query
from .repository import HOLD_STATUSES, TASK_TYPES, task_from_row


class LostRace(Exception):
    """Tasks or holds changed under a worker that held their user's lock: someone bypassed it."""


class Remembered(NamedTuple):
    """What the caller remembers of some users: each one's account as its own last apply left it,
    and the user's pending tasks, in id order: plain balance changes it stored itself."""

    accounts: dict[int, Account]
    pending: dict[int, list[PendingTask]]


async def apply_pending_batches(
    pool: Pool,
    user_ids: Sequence[int],
    batch_size: int,
    wanted: Callable[[int], bool] = lambda task_id: False,
    remembered: Remembered | None = None,
) -> AppliedBatch:
    """Apply up to `batch_size` of each user's oldest pending tasks, all in one transaction.

    Locking the users' rows (and those of their transfers' recipients) first serialises every
    worker of every process on each user, so each task is applied exactly once and in id order.
    Returns each user's outcomes ([] when nothing was pending or the user does not exist), and the
    finished tasks as stored of those `wanted` says someone waits for.

    `remembered` (of exactly these users): try the one round trip first."""
    if remembered is not None:
        batch = await _apply_as_remembered(pool, remembered, wanted)
        if batch is not None:
            return batch
    found: dict[int, list[Any]] = {user_id: [] for user_id in user_ids}
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch_all(query("lock_and_read_pending"), {"user_ids": sorted(found), "limit": batch_size})
        accounts, pending = _read(rows)
        if not pending:
            return AppliedBatch(found, {}, 0, [], accounts=accounts)  # only these users' (no recipient read)
        await _lock_recipients(conn, pending, accounts)
        holds = await _holds_named(conn, pending)
        result = apply_batches(accounts, pending, holds)
        params = _outcomes(result)
        writes = query("finish_batches")
        if result.transfers_in or result.holds:
            params |= _effects(result, holds)
            writes += "\n" + query("record_batch_effects")
        params["read_ids"] = _read_ids(params["ids"], wanted)
        try:
            read_back = await conn.commit_with(writes, params, then=query("applied_tasks"))
        except WriteCheckFailed as exc:
            raise LostRace(f"users {sorted(pending)}: {exc}") from exc
    finished = [task_from_row(row) for row in read_back]
    states = {user_id: result.accounts.get(user_id, accounts[user_id]) for user_id in found if user_id in accounts}
    return _applied(found, pending, result, finished, wanted, states)


async def _apply_as_remembered(
    pool: Pool, remembered: Remembered, wanted: Callable[[int], bool]
) -> AppliedBatch | None:
    """The batch applied in one round trip from what is remembered; None (nothing written) if the
    database holds anything else."""
    result = apply_batches(remembered.accounts, remembered.pending, {})
    params = _outcomes(result) | _remembered(remembered)
    params["read_ids"] = _read_ids(params["ids"], wanted)
    async with pool.acquire() as conn, conn.transaction():
        try:
            read_back = await conn.commit_with(
                query("finish_as_remembered"), params, then=query("applied_tasks_as_remembered")
            )
        except WriteCheckFailed as exc:  # the function checked first: only a bug gets here
            raise LostRace(f"users {sorted(remembered.pending)}: {exc}") from exc
    if not read_back or not read_back[0]["applied"]:
        return None
    finished = [task_from_row(row) for row in read_back if row["id"] is not None]
    found: dict[int, list[Any]] = {user_id: [] for user_id in remembered.accounts}
    states = {user_id: result.accounts.get(user_id, account) for user_id, account in remembered.accounts.items()}
    # A task not remembered is left pending: its user's loop looks again, as after a batch cut short.
    result.deferred.update(read_back[0]["more_pending"])
    return _applied(found, remembered.pending, result, finished, wanted, states, remembered=True)


def _read_ids(ids: list[int], wanted: Callable[[int], bool]) -> list[int]:
    """The tasks to read back after the COMMIT: the first finished task gives the transaction's
    instant (processed_at), besides the waited ones. (No task at all: every batch was cut short
    before its first, a recipient being busy.)"""
    return [ids[0], *(task_id for task_id in ids[1:] if wanted(task_id))] if ids else []


def _applied(
    found: dict[int, list[Any]],
    pending: dict[int, list[PendingTask]],
    result: BatchResult,
    finished: list[Task],
    wanted: Callable[[int], bool],
    accounts: dict[int, Account],
    *,
    remembered: bool = False,
) -> AppliedBatch:
    found.update(result.outcomes)
    instant = finished[0].processed_at if finished else None
    types = {task.id: task.type for tasks in pending.values() for task in tasks}
    applied_types = {outcome.task_id: types[outcome.task_id] for o in result.outcomes.values() for outcome in o}
    # created_at -> processed_at of each applied task, as the bench reads it from the table.
    latencies = [
        (instant - task.created_at).total_seconds()
        for tasks in pending.values()
        for task in tasks
        if task.id in applied_types and task.created_at is not None and instant is not None
    ]
    return AppliedBatch(
        found,
        applied_types,
        len(result.transfers_in),
        latencies,
        frozenset(result.deferred),
        [task for task in finished if wanted(task.id)],
        accounts=accounts,
        recipients=frozenset(result.accounts) - frozenset(found),
        remembered=remembered,
    )


def _read(rows: list[Row]) -> tuple[dict[int, Account], dict[int, list[PendingTask]]]:
    """The users' accounts, and each user's pending tasks in id order."""
    accounts: dict[int, Account] = {}
    pending: dict[int, list[PendingTask]] = {}
    for row in rows:
        user_id = row["user_id"]
        if user_id not in accounts:
            accounts[user_id] = Account(row["balance"], row["held"])
        task_id = row["id"]
        if task_id is None:
            continue
        pending.setdefault(user_id, []).append(
            PendingTask(
                task_id,
                TASK_TYPES[row["type"]],
                row["amount"],
                row["counterparty_id"],
                row["hold_id"],
                row["created_at"],
                row["expires_at"],
            )
        )
    return accounts, pending


async def _lock_recipients(
    conn: Connection, pending: dict[int, list[PendingTask]], accounts: dict[int, Account]
) -> None:
    """Add the accounts of the batch's transfers' recipients that are not among its users."""
    recipients = {t.counterparty_id for tasks in pending.values() for t in tasks if t.counterparty_id is not None}
    if recipients - set(accounts):
        rows = await conn.fetch_all(query("lock_recipients"), {"user_ids": sorted(recipients - set(accounts))})
        accounts.update({row["id"]: Account(row["balance"], row["held"]) for row in rows})


async def _holds_named(conn: Connection, pending: dict[int, list[PendingTask]]) -> dict[int, Hold]:
    """The holds the batch's captures, voids and releases name."""
    named = {t.hold_id for tasks in pending.values() for t in tasks if t.hold_id is not None}
    if not named:
        return {}
    rows = await conn.fetch_all(query("holds_of"), {"hold_ids": sorted(named)})
    return {
        row["id"]: Hold(row["id"], row["user_id"], row["amount"], row["expires_at"], HOLD_STATUSES[row["status"]])
        for row in rows
    }


def _columns(*names: str) -> dict[str, list[Any]]:
    return {name: [] for name in names}


def _outcomes(result: BatchResult) -> dict[str, list[Any]]:
    """The parameters of finish_batches: one list per column, as array literals travel fastest."""
    p = _columns(
        "ids",
        "task_users",
        "statuses",
        "reasons",
        "balances_after",
        "availables_after",
        "account_ids",
        "balances",
        "helds",
    )
    ids, task_users, statuses, reasons = p["ids"], p["task_users"], p["statuses"], p["reasons"]
    balances_after, availables_after = p["balances_after"], p["availables_after"]
    for user_id, outcomes in result.outcomes.items():
        for o in outcomes:
            ids.append(o.task_id)
            task_users.append(user_id)
            statuses.append(o.status.value)
            reasons.append(o.reason.value if o.reason else None)
            balances_after.append(o.balance_after)
            availables_after.append(o.available_after)
    for account_id, account in result.accounts.items():
        p["account_ids"].append(account_id)
        p["balances"].append(account.balance)
        p["helds"].append(account.held)
    return p


def _remembered(remembered: Remembered) -> dict[str, list[Any]]:
    """The parameters of finish_as_remembered besides the outcomes: what the rules ran on."""
    r = _columns(
        "user_ids",
        "remembered_balances",
        "remembered_helds",
        "remembered_ids",
        "remembered_users",
        "remembered_types",
        "remembered_amounts",
    )
    for user_id, account in remembered.accounts.items():
        r["user_ids"].append(user_id)
        r["remembered_balances"].append(account.balance)
        r["remembered_helds"].append(account.held)
    for user_id, tasks in remembered.pending.items():
        for task in tasks:
            r["remembered_ids"].append(task.id)
            r["remembered_users"].append(user_id)
            r["remembered_types"].append(task.type.value)
            r["remembered_amounts"].append(task.amount)
    return r


def _effects(result: BatchResult, holds_before: dict[int, Hold]) -> dict[str, list[Any]]:
    """The parameters of record_batch_effects."""
    e = _columns(
        *("in_users", "in_amounts", "in_senders", "in_transfers", "in_balances", "in_availables"),
        *("new_hold_ids", "new_hold_users", "new_hold_amounts", "new_hold_expiries", "new_hold_statuses"),
        *("new_hold_captured", "new_hold_resolved_by"),
        *("resolved_hold_ids", "resolved_hold_statuses", "resolved_hold_captured", "resolved_hold_by"),
    )
    for entry in result.transfers_in:
        e["in_users"].append(entry.user_id)
        e["in_amounts"].append(entry.amount)
        e["in_senders"].append(entry.sender_id)
        e["in_transfers"].append(entry.transfer_id)
        e["in_balances"].append(entry.balance_after)
        e["in_availables"].append(entry.available_after)
    for hold in result.holds.values():
        if hold.id in holds_before:
            e["resolved_hold_ids"].append(hold.id)
            e["resolved_hold_statuses"].append(hold.status.value)
            e["resolved_hold_captured"].append(hold.captured_amount)
            e["resolved_hold_by"].append(hold.resolved_by)
        else:
            e["new_hold_ids"].append(hold.id)
            e["new_hold_users"].append(hold.user_id)
            e["new_hold_amounts"].append(hold.amount)
            e["new_hold_expiries"].append(hold.expires_at.isoformat())
            e["new_hold_statuses"].append(hold.status.value)
            e["new_hold_captured"].append(hold.captured_amount)
            e["new_hold_resolved_by"].append(hold.resolved_by)
    return e
