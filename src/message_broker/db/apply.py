"""The apply transaction: lock the accounts a batch touches, read their state and pending tasks,
run the ledger's rules, write every outcome and effect back, in one transaction.

Round trips: BEGIN with the lock and the read, the writes, COMMIT; and for batches with transfers or
that name holds, one each to read the recipients and the holds and one to write their effects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..ledger import Account, BatchResult, Hold, PendingTask, TaskType, apply_batches
from ..models import AppliedBatch
from .driver import Connection, Pool, Row
from .queries import query
from .repository import HOLD_STATUSES, TASK_TYPES


class LostRace(Exception):
    """Tasks or holds changed under a worker that held their user's lock: someone bypassed it."""


async def apply_pending_batches(pool: Pool, user_ids: Sequence[int], batch_size: int) -> AppliedBatch:
    """Apply up to `batch_size` of each user's oldest pending tasks, all in one transaction.

    Locking the users' rows (and those of their transfers' recipients) first serialises every
    worker of every process on each user, so each task is applied exactly once and in id order.
    Returns each user's outcomes ([] when nothing was pending or the user does not exist)."""
    found: dict[int, list[Any]] = {user_id: [] for user_id in user_ids}
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch_all(query("lock_and_read_pending"), {"user_ids": sorted(found), "limit": batch_size})
        accounts, pending, task_types = _read(rows)
        if not pending:
            return AppliedBatch(found, {}, 0, [])
        await _lock_recipients(conn, pending, accounts)
        holds = await _holds_named(conn, pending)
        result = apply_batches(accounts, pending, holds)
        outcomes = _outcomes(result)
        written = await conn.fetch_one(query("finish_batches"), outcomes)
        expected = {"finished": len(outcomes["ids"]), "accounts": len(outcomes["account_ids"])}
        if result.transfers_in or result.holds:
            effects = _effects(result, holds)
            # The transfer-ins share the batch's instant (one order, one clock: migration 0008).
            params = {**effects, "instant": written["instant"] if written else None}
            written = {**(written or {}), **(await conn.fetch_one(query("record_batch_effects"), params) or {})}
            expected |= {
                "transfers_in": len(effects["in_users"]),
                "new_holds": len(effects["new_hold_ids"]),
                "resolved_holds": len(effects["resolved_hold_ids"]),
            }
        if not written or any(written.get(name) != count for name, count in expected.items()):
            raise LostRace(f"users {sorted(pending)}: expected to write {expected}, wrote {written}")
    found.update(result.outcomes)
    applied_types = {outcome.task_id: task_types[outcome.task_id] for o in result.outcomes.values() for outcome in o}
    return AppliedBatch(
        found, applied_types, len(result.transfers_in), list(written["latencies"] or []), frozenset(result.deferred)
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
