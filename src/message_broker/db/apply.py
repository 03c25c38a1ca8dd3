"""The apply transaction: lock the accounts a batch touches, read their state and pending tasks,
run the ledger's rules, write every outcome and effect back, in one transaction.

Round trips: two. BEGIN with the lock and the read in one message; the writes, COMMIT, and the
read-back of the finished tasks that requests of this process wait for in the next (the writes check
themselves: see finish_batches). Batches with transfers or that name holds add one round trip each
to read the recipients and the holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..ledger import Account, BatchResult, Hold, PendingTask, TaskType, apply_batches
from ..models import AppliedBatch
from .driver import Connection, Pool, Row
from .errors import WriteCheckFailed
from .queries import query
from .repository import HOLD_STATUSES, TASK_TYPES, task_from_row


class LostRace(Exception):
    """Tasks or holds changed under a worker that held their user's lock: someone bypassed it."""


async def apply_pending_batches(
    pool: Pool, user_ids: Sequence[int], batch_size: int, wanted: Callable[[int], bool] = lambda task_id: False
) -> AppliedBatch:
    """Apply up to `batch_size` of each user's oldest pending tasks, all in one transaction.

    Locking the users' rows (and those of their transfers' recipients) first serialises every
    worker of every process on each user, so each task is applied exactly once and in id order.
    Returns each user's outcomes ([] when nothing was pending or the user does not exist), and the
    finished tasks as stored of those `wanted` says someone waits for."""
    found: dict[int, list[Any]] = {user_id: [] for user_id in user_ids}
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch_all(query("lock_and_read_pending"), {"user_ids": sorted(found), "limit": batch_size})
        accounts, pending, task_types = _read(rows)
        if not pending:
            return AppliedBatch(found, {}, 0, [])
        await _lock_recipients(conn, pending, accounts)
        holds = await _holds_named(conn, pending)
        result = apply_batches(accounts, pending, holds)
        params = _outcomes(result)
        writes = query("finish_batches")
        if result.transfers_in or result.holds:
            params |= _effects(result, holds)
            writes += "\n" + query("record_batch_effects")
        # The first finished task gives the transaction's instant (processed_at), besides the waited
        # ones. (No task at all: every batch was cut short before its first, a recipient being busy.)
        ids = params["ids"]
        params["read_ids"] = [ids[0], *(task_id for task_id in ids[1:] if wanted(task_id))] if ids else []
        try:
            read_back = await conn.commit_with(writes, params, then=query("applied_tasks"))
        except WriteCheckFailed as exc:
            raise LostRace(f"users {sorted(pending)}: {exc}") from exc
    found.update(result.outcomes)
    finished = [task_from_row(row) for row in read_back]
    instant = finished[0].processed_at if finished else None
    applied_types = {outcome.task_id: task_types[outcome.task_id] for o in result.outcomes.values() for outcome in o}
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
    )


def _read(rows: list[Row]) -> tuple[dict[int, Account], dict[int, list[PendingTask]], dict[int, TaskType]]:
    """The users' accounts, each user's pending tasks in id order, and their types."""
    accounts: dict[int, Account] = {}
    pending: dict[int, list[PendingTask]] = {}
    task_types: dict[int, TaskType] = {}
    for row in rows:
        user_id = row["user_id"]
        if user_id not in accounts:
            accounts[user_id] = Account(row["balance"], row["held"])
        task_id = row["id"]
        if task_id is None:
            continue
        task_type = task_types[task_id] = TASK_TYPES[row["type"]]
        pending.setdefault(user_id, []).append(
            PendingTask(
                task_id,
                task_type,
                row["amount"],
                row["counterparty_id"],
                row["hold_id"],
                row["created_at"],
                row["expires_at"],
            )
        )
    return accounts, pending, task_types


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
