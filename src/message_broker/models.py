"""The records the service hands around: users, tasks and holds as they look outside the database,
and what one apply transaction did."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from .ledger import Account, HoldStatus, Outcome, Reason, Status, TaskType


@dataclass(frozen=True)
class User:
    id: int
    username: str
    balance: int
    held: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.held


class Task(NamedTuple):
    """One task. A named tuple: one is built for every task stored, applied or streamed."""

    id: int
    user_id: int
    type: TaskType
    amount: int
    status: Status
    reason: Reason | None
    balance_after: int | None
    available_after: int | None
    counterparty_id: int | None
    transfer_id: int | None
    hold_id: int | None
    expires_at: datetime | None
    created_at: datetime
    processed_at: datetime | None
    created_by: str | None = None  # the token's name (migration 0009)
    reference: str | None = None  # the client's own id for it, unique per user
    metadata: dict[str, str] | None = None  # the client's strings; None: none given

    @property
    def finished(self) -> bool:
        return self.status is not Status.PENDING


@dataclass(frozen=True)
class HoldView:
    """A hold as clients see it: its hold task's amount and deadline, and where it stands."""

    id: int
    user_id: int
    amount: int
    status: HoldStatus
    captured_amount: int | None
    expires_at: datetime
    resolved_by: int | None


@dataclass(frozen=True)
class AppliedBatch:
    """What one apply transaction did: each user's outcomes (in the order applied), the type of
    every task applied, the transfers' entries it wrote, and each applied task's seconds from
    created_at to processed_at."""

    outcomes: dict[int, list[Outcome]]
    task_types: dict[int, TaskType]
    transfers_in: int
    latencies: list[float]
    # Users whose batch stopped early (a recipient could not be locked), or left a task it did not
    # know of pending (applied from memory): look again at once.
    deferred: frozenset[int] = frozenset()
    # The finished tasks, as stored, that requests of this process wait for (read after the commit).
    waited: list[Task] = field(default_factory=list)
    # Each user's account as the transaction left it (a user not found: none), and the other
    # accounts it changed (transfers' recipients).
    accounts: dict[int, Account] = field(default_factory=dict)
    recipients: frozenset[int] = frozenset()
    # Applied in one round trip from what the process remembered (db/apply.py).
    remembered: bool = False
