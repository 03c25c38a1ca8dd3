"""The rules that turn a balance and a user's pending tasks into outcomes. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import NamedTuple

# Balances and amounts are PostgreSQL bigints.
MAX_AMOUNT = 2**63 - 1


class TaskType(StrEnum):
    REPLENISHMENT = "replenishment"
    WRITE_OFF = "write-off"


class Status(StrEnum):
    PENDING = "pending"
    DONE = "done"
    CANCELLED = "cancelled"


class Reason(StrEnum):
    INSUFFICIENT_FUNDS = "insufficient_funds"
    BALANCE_OVERFLOW = "balance_overflow"


# Named tuples rather than frozen dataclasses: one of each is built per task applied, and a
# tuple is several times cheaper to build.
class PendingTask(NamedTuple):
    id: int
    type: TaskType
    amount: int


class Outcome(NamedTuple):
    task_id: int
    status: Status
    reason: Reason | None
    balance_after: int


def apply_one(balance: int, task_type: TaskType, amount: int) -> tuple[Status, Reason | None, int]:
    """Apply one task to a balance: (status, reason, balance after)."""
    if task_type is TaskType.REPLENISHMENT:
        if amount > MAX_AMOUNT - balance:
            return Status.CANCELLED, Reason.BALANCE_OVERFLOW, balance
        return Status.DONE, None, balance + amount
    if amount > balance:
        return Status.CANCELLED, Reason.INSUFFICIENT_FUNDS, balance
    return Status.DONE, None, balance - amount


def apply_batch(balance: int, tasks: Iterable[PendingTask]) -> tuple[int, list[Outcome]]:
    """Apply tasks in the given order; a cancelled task leaves the balance as it was."""
    outcomes = []
    for task in tasks:
        status, reason, balance = apply_one(balance, task.type, task.amount)
        outcomes.append(Outcome(task.id, status, reason, balance))
    return balance, outcomes
