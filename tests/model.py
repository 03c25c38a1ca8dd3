"""The apply rules restated independently of message_broker.ledger, as a sequential model the
property tests compare the service with: a write-off never overdraws, a replenishment never
passes 2^63-1, and a refused task leaves the balance as it was."""

from __future__ import annotations

from collections.abc import Iterable

from message_broker.ledger import TaskType

MAX = 2**63 - 1

Outcome = tuple[str, str | None, int]  # (status, reason, balance_after)


def model_step(balance: int, kind: TaskType, amount: int) -> Outcome:
    if kind is TaskType.WRITE_OFF:
        return ("done", None, balance - amount) if amount <= balance else ("cancelled", "insufficient_funds", balance)
    if balance + amount <= MAX:
        return "done", None, balance + amount
    return "cancelled", "balance_overflow", balance


def model_run(initial: int, steps: Iterable[tuple[TaskType, int]]) -> tuple[int, list[Outcome]]:
    """One user's tasks applied one after another: (final balance, each task's outcome)."""
    balance = initial
    outcomes = []
    for kind, amount in steps:
        outcome = model_step(balance, kind, amount)
        outcomes.append(outcome)
        balance = outcome[2]
    return balance, outcomes
