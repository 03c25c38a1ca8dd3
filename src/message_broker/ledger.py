"""The rules of the ledger, pure: accounts and their pending tasks in, outcomes out, with the
balances they leave and their effects on other accounts (a transfer's credit) and on holds.
No I/O, no asyncio: the repository feeds this with locked rows and writes back what it returns.

An account has a `balance` and `held` (the sum of its active holds); `available` = balance - held
is what write-offs, transfers and new holds may take. Every outcome records both after it.

One apply transaction serves many users. Each user's own tasks are applied first, in id order;
then the credits of the transfers among them, in the order the transfers were applied. So within
one transaction a user's entries are in id order (a credit's entry is a new task, with an id above
every pending one), and across transactions the row lock orders them: a user's history in order of
application is its finished tasks ordered by (batch position, id), the order of the event streams.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

# Amounts, balances and ids are PostgreSQL bigints.
BIGINT_MAX = 2**63 - 1


class TaskType(StrEnum):
    REPLENISHMENT = "replenishment"
    WRITE_OFF = "write-off"
    TRANSFER = "transfer"
    # The recipient's entry of a transfer, written with it; never posted, never pending.
    TRANSFER_IN = "transfer-in"
    HOLD = "hold"
    CAPTURE = "capture"
    VOID = "void"
    # A hold released at its deadline; created by the service, never posted.
    RELEASE = "release"


class Status(StrEnum):
    PENDING = "pending"
    DONE = "done"
    CANCELLED = "cancelled"


class Reason(StrEnum):
    INSUFFICIENT_FUNDS = "insufficient_funds"
    BALANCE_OVERFLOW = "balance_overflow"
    HOLD_NOT_ACTIVE = "hold_not_active"
    AMOUNT_EXCEEDS_HOLD = "amount_exceeds_hold"


class HoldStatus(StrEnum):
    PENDING = "pending"  # its hold task is not applied yet
    ACTIVE = "active"
    CANCELLED = "cancelled"  # its hold task was cancelled (insufficient funds): nothing was held
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


# What a done task of each kind does to its user's balance: credits add their amount, debits take
# it (a capture charges its own amount); the others move money between balance and held only.
CREDITS = frozenset({TaskType.REPLENISHMENT, TaskType.TRANSFER_IN})
DEBITS = frozenset({TaskType.WRITE_OFF, TaskType.TRANSFER, TaskType.CAPTURE})


def balance_change(kind: TaskType, status: Status, amount: int) -> int:
    """The signed change a finished task made to its user's balance (0 when cancelled)."""
    if status is not Status.DONE:
        return 0
    if kind in CREDITS:
        return amount
    if kind in DEBITS:
        return -amount
    return 0


# Named tuples rather than frozen dataclasses: several are built per task applied, and a tuple is
# several times cheaper to build.
class Account(NamedTuple):
    balance: int
    held: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.held


class PendingTask(NamedTuple):
    id: int
    type: TaskType
    amount: int
    counterparty_id: int | None = None  # a transfer's recipient
    hold_id: int | None = None  # the hold a capture, void or release resolves
    created_at: datetime | None = None  # when it arrived: a capture or void after the deadline is too late
    expires_at: datetime | None = None  # a hold's deadline


class Hold(NamedTuple):
    id: int  # the id of the hold task
    user_id: int
    amount: int
    expires_at: datetime
    status: HoldStatus = HoldStatus.ACTIVE
    captured_amount: int | None = None
    resolved_by: int | None = None  # the task that ended it


class Outcome(NamedTuple):
    task_id: int
    status: Status
    reason: Reason | None
    balance_after: int
    available_after: int


class TransferIn(NamedTuple):
    """A transfer's entry in the recipient's history."""

    user_id: int
    amount: int
    sender_id: int
    transfer_id: int
    balance_after: int
    available_after: int


@dataclass
class BatchResult:
    # The final state of every account the batch changed.
    accounts: dict[int, Account] = field(default_factory=dict)
    # Each user's outcomes, in the order applied (its pending tasks in id order, possibly fewer).
    outcomes: dict[int, list[Outcome]] = field(default_factory=dict)
    transfers_in: list[TransferIn] = field(default_factory=list)
    # Holds created or resolved by the batch, in their final state.
    holds: dict[int, Hold] = field(default_factory=dict)
    # Users whose batch stopped before a transfer whose recipient the caller could not lock: the
    # rest of their tasks is still pending and must be looked at again.
    deferred: set[int] = field(default_factory=set)


_DONE = Status.DONE
_CANCELLED = Status.CANCELLED


def apply_batches(
    accounts: Mapping[int, Account],
    pending: Mapping[int, Sequence[PendingTask]],
    holds: Mapping[int, Hold],
) -> BatchResult:
    """Apply each user's pending tasks (in the given order) to the accounts.

    `accounts` holds every account the caller has locked: the users of `pending` and the
    recipients of their transfers; a transfer to an account not in it ends its sender's batch
    there (`deferred`). `holds` holds the active holds the tasks refer to.

    A credit that would take its recipient past the bigint limit cancels its transfer
    (balance_overflow); since the credits come after every user's own tasks, the batch is then
    worked out again with that transfer cancelled from the start, until no credit overflows."""
    overflowing: set[int] = set()
    while True:
        result, overflowed = _apply(accounts, pending, holds, overflowing)
        if not overflowed:
            return result
        overflowing |= overflowed


def _apply(
    accounts: Mapping[int, Account],
    pending: Mapping[int, Sequence[PendingTask]],
    holds: Mapping[int, Hold],
    overflowing: set[int],
) -> tuple[BatchResult, set[int]]:
    result = BatchResult()
    state = dict(accounts)
    touched_holds: dict[int, Hold] = {}
    credits: list[tuple[PendingTask, int]] = []  # (transfer, sender)
    for user_id, tasks in pending.items():
        balance, held = state[user_id]
        outcomes: list[Outcome] = []
        for task in tasks:
            kind, amount = task.type, task.amount
            reason: Reason | None = None
            if kind is TaskType.REPLENISHMENT:
                if amount > BIGINT_MAX - balance:
                    reason = Reason.BALANCE_OVERFLOW
                else:
                    balance += amount
            elif kind is TaskType.WRITE_OFF:
                if amount > balance - held:
                    reason = Reason.INSUFFICIENT_FUNDS
                else:
                    balance -= amount
            elif kind is TaskType.TRANSFER:
                if task.counterparty_id not in state:
                    result.deferred.add(user_id)
                    break
                if task.id in overflowing:
                    reason = Reason.BALANCE_OVERFLOW
                elif amount > balance - held:
                    reason = Reason.INSUFFICIENT_FUNDS
                else:
                    balance -= amount
                    credits.append((task, user_id))
            elif kind is TaskType.HOLD:
                if amount > balance - held:
                    reason = Reason.INSUFFICIENT_FUNDS
                else:
                    held += amount
                    assert task.expires_at is not None, f"hold {task.id} has no deadline"
                    touched_holds[task.id] = Hold(task.id, user_id, amount, task.expires_at)
            else:
                # capture, void, release: they resolve an active hold of this user.
                hold = touched_holds.get(task.hold_id) or holds.get(task.hold_id)  # type: ignore[arg-type]
                reason = _why_not_resolvable(task, hold, user_id)
                if reason is None:
                    assert hold is not None
                    held -= hold.amount
                    if kind is TaskType.CAPTURE:
                        balance -= amount
                        hold = hold._replace(status=HoldStatus.CAPTURED, captured_amount=amount, resolved_by=task.id)
                    elif kind is TaskType.VOID:
                        hold = hold._replace(status=HoldStatus.VOIDED, resolved_by=task.id)
                    else:
                        hold = hold._replace(status=HoldStatus.EXPIRED, resolved_by=task.id)
                    touched_holds[hold.id] = hold
            outcomes.append(Outcome(task.id, _CANCELLED if reason else _DONE, reason, balance, balance - held))
        state[user_id] = Account(balance, held)
        result.outcomes[user_id] = outcomes
        if outcomes:
            result.accounts[user_id] = state[user_id]
    overflowed: set[int] = set()
    for transfer, sender in credits:
        recipient = transfer.counterparty_id
        assert recipient is not None
        balance, held = state[recipient]
        if transfer.amount > BIGINT_MAX - balance:
            overflowed.add(transfer.id)
            continue
        balance += transfer.amount
        state[recipient] = result.accounts[recipient] = Account(balance, held)
        result.transfers_in.append(TransferIn(recipient, transfer.amount, sender, transfer.id, balance, balance - held))
    result.holds = touched_holds
    return result, overflowed


def _why_not_resolvable(task: PendingTask, hold: Hold | None, user_id: int) -> Reason | None:
    """Why a capture, void or release cannot resolve `hold`; None if it can."""
    if hold is None or hold.status is not HoldStatus.ACTIVE or hold.user_id != user_id:
        return Reason.HOLD_NOT_ACTIVE
    # A capture or void that arrives at or after the deadline is too late, even if the release has
    # not been applied yet; the release itself comes only after the deadline.
    if task.type is not TaskType.RELEASE and task.created_at is not None and task.created_at >= hold.expires_at:
        return Reason.HOLD_NOT_ACTIVE
    if task.type is TaskType.CAPTURE and task.amount > hold.amount:
        return Reason.AMOUNT_EXCEEDS_HOLD
    return None
