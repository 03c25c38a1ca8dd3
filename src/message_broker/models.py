"""The records the service hands around: what a user and a task look like outside the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .ledger import Reason, Status, TaskType


@dataclass(frozen=True)
class User:
    id: int
    username: str
    balance: int


@dataclass(frozen=True)
class Task:
    id: int
    user_id: int
    type: TaskType
    amount: int
    status: Status
    reason: Reason | None
    balance_after: int | None
    created_at: datetime
    processed_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status is not Status.PENDING
