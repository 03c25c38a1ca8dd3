"""Finished tasks as a stream: their positions (tasks.finish_seq), replays after a position, and
the task_processed notification payload.

A position is a task's finish_seq. Migration 0003 draws finish_seq only under a lock held until
COMMIT, so positions grow in commit order across all users: a database snapshot that sees
position N sees every position below N, and notifications arrive in position order. That makes
"everything after N" a gap-free resume point for one user's stream or for all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..ledger import Reason, Status, TaskType
from ..models import Task
from .connector import Pool, Row
from .queries import query
from .repository import _task


@dataclass(frozen=True)
class FinishedTask:
    task: Task
    position: int


class BadPayload(ValueError):
    """A task_processed notification that is not what our trigger sends."""


def _finished(row: Row) -> FinishedTask:
    return FinishedTask(_task(row), row["finish_seq"])


async def finished_after(
    pool: Pool, position: int, *, user_id: int | None = None, limit: int = 500
) -> list[FinishedTask]:
    """Up to `limit` finished tasks with a position after `position`, in position order."""
    async with pool.acquire() as conn:
        if user_id is None:
            rows = await conn.fetch_all(query("finished_tasks_after"), {"after": position, "limit": limit})
        else:
            rows = await conn.fetch_all(
                query("finished_user_tasks_after"), {"after": position, "user_id": user_id, "limit": limit}
            )
    return [_finished(row) for row in rows]


async def position_of(pool: Pool, task_id: int) -> int | None:
    """The position of a finished task; None if there is no such task or it is still pending."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("finish_position_of_task"), {"task_id": task_id})
    return None if row is None else row["finish_seq"]


async def latest_position(pool: Pool) -> int:
    """The position of the last finished task that is committed now (0 if none)."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("latest_finish_position"))
    assert row is not None
    return int(row["position"])


async def finished_among(pool: Pool, task_ids: Sequence[int]) -> list[FinishedTask]:
    """Those of `task_ids` that are finished by now."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("finished_tasks_among"), {"ids": list(task_ids)})
    return [_finished(row) for row in rows]


def parse_processed_payload(payload: str) -> FinishedTask:
    """The task_processed NOTIFY payload (see notify_task_processed in sql/migrations) as a record."""
    try:
        data: dict[str, Any] = json.loads(payload)
        task = Task(
            id=int(data["id"]),
            user_id=int(data["user_id"]),
            type=TaskType(data["type"]),
            amount=int(data["amount"]),
            status=Status(data["status"]),
            reason=Reason(data["reason"]) if data["reason"] is not None else None,
            balance_after=data["balance_after"],
            created_at=_timestamp(data["created_at"]),
            processed_at=_timestamp(data["processed_at"]),
        )
        return FinishedTask(task, int(data["finish_seq"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadPayload(f"{exc}: {payload[:200]!r}") from None


def _timestamp(value: str | None) -> datetime | None:
    # Whatever time zone the finishing session had, show UTC like rows read from the pool do.
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)
