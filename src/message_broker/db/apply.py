"""The apply transaction: lock the accounts a batch touches, read their state and pending tasks,
run the ledger's rules, write every outcome and effect back, in one transaction.

Round trips: BEGIN with the lock and the read, the writes, COMMIT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..ledger import Account, BatchResult, Hold, PendingTask, apply_batches
from ..models import AppliedBatch
from .driver import Pool, Row
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
        accounts, pending, holds, task_types = _read(rows)
        if not pending:
            return AppliedBatch(found, {}, 0, [])
        result = apply_batches(accounts, pending, holds)
        params = _writes(result, holds)
        written = await conn.fetch_one(query("finish_batches"), params)
        expected = {
            "finished": len(params["ids"]),
            "accounts": len(params["account_ids"]),
            "transfers_in": len(params["in_users"]),
            "new_holds": len(params["new_hold_ids"]),
            "resolved_holds": len(params["resolved_hold_ids"]),
        }
        if written is None or any(written[name] != count for name, count in expected.items()):
            raise LostRace(f"users {sorted(pending)}: expected to write {expected}, wrote {written}")
    found.update(result.outcomes)
    applied_types = {outcome.task_id: task_types[outcome.task_id] for o in result.outcomes.values() for outcome in o}
    return AppliedBatch(
        found, applied_types, len(result.transfers_in), list(written["latencies"] or []), frozenset(result.deferred)
    )


def _read(
    rows: list[Row],
) -> tuple[dict[int, Account], dict[int, list[PendingTask]], dict[int, Hold], dict[int, Any]]:
    """The accounts locked, each user's pending tasks in id order, the active holds they name."""
    accounts: dict[int, Account] = {}
    pending: dict[int, list[PendingTask]] = {}
    holds: dict[int, Hold] = {}
    task_types: dict[int, Any] = {}
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
        if row["hold_status"] is not None:
            holds[row["hold_id"]] = Hold(
                row["hold_id"],
                row["hold_user_id"],
                row["hold_amount"],
                row["hold_expires_at"],
                HOLD_STATUSES[row["hold_status"]],
            )
    return accounts, pending, holds, task_types


def _writes(result: BatchResult, holds_before: dict[int, Hold]) -> dict[str, list[Any]]:
    """The parameters of finish_batches: one list per column, as array literals travel fastest."""
    p: dict[str, list[Any]] = {
        name: []
        for name in (
            "ids",
            "task_users",
            "statuses",
            "reasons",
            "balances_after",
            "availables_after",
            "account_ids",
            "balances",
            "helds",
            "in_users",
            "in_amounts",
            "in_senders",
            "in_transfers",
            "in_balances",
            "in_availables",
            "new_hold_ids",
            "new_hold_users",
            "new_hold_amounts",
            "new_hold_expiries",
            "new_hold_statuses",
            "new_hold_captured",
            "new_hold_resolved_by",
            "resolved_hold_ids",
            "resolved_hold_statuses",
            "resolved_hold_captured",
            "resolved_hold_by",
        )
    }
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
    for entry in result.transfers_in:
        p["in_users"].append(entry.user_id)
        p["in_amounts"].append(entry.amount)
        p["in_senders"].append(entry.sender_id)
        p["in_transfers"].append(entry.transfer_id)
        p["in_balances"].append(entry.balance_after)
        p["in_availables"].append(entry.available_after)
    for hold in result.holds.values():
        if hold.id in holds_before:
            p["resolved_hold_ids"].append(hold.id)
            p["resolved_hold_statuses"].append(hold.status.value)
            p["resolved_hold_captured"].append(hold.captured_amount)
            p["resolved_hold_by"].append(hold.resolved_by)
        else:
            p["new_hold_ids"].append(hold.id)
            p["new_hold_users"].append(hold.user_id)
            p["new_hold_amounts"].append(hold.amount)
            p["new_hold_expiries"].append(hold.expires_at.isoformat())
            p["new_hold_statuses"].append(hold.status.value)
            p["new_hold_captured"].append(hold.captured_amount)
            p["new_hold_resolved_by"].append(hold.resolved_by)
    return p
