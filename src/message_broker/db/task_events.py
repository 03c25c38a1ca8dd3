"""Finished tasks as a stream: their places, replays after a place, and the notification payloads.

A task's place is (its batch's position, its id). Migration 0003 numbers every transaction that
finishes tasks (a batch) in commit order, so places grow in the order tasks became visible: a
database snapshot that sees position N sees every smaller one, and notifications arrive in that
order. "Everything after place X" is therefore a gap-free resume point for one user's stream or
for all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..ledger import BIGINT_MAX
from ..models import Task
from .driver import Pool, Row
from .queries import query
from .repository import task_from_payload, task_from_row

# (batch position, task id)
Place = tuple[int, int]
# The task-id half of a place after every task of its batch.
_AFTER_EVERY_TASK = BIGINT_MAX


@dataclass(frozen=True)
class FinishedTask:
    task: Task
    place: Place


@dataclass(frozen=True)
class ProcessedNotice:
    """A task_processed notification: the finished task and the batch (transaction) it is in."""

    task: Task
    batch: int | None


class BadPayload(ValueError):
    """A notification that is not what our triggers send."""


def _finished(row: Row) -> FinishedTask:
    return FinishedTask(task_from_row(row), (row["position"], row["id"]))


async def finished_after(
    pool: Pool, place: Place, *, user_id: int | None = None, limit: int = 500
) -> list[FinishedTask]:
    """Up to `limit` finished tasks placed after `place`, in place order."""
    params = {"position": place[0], "task_id": place[1], "limit": limit}
    async with pool.acquire() as conn:
        if user_id is None:
            rows = await conn.fetch_all(query("finished_tasks_after"), params)
        else:
            rows = await conn.fetch_all(query("finished_user_tasks_after"), {**params, "user_id": user_id})
    return [_finished(row) for row in rows]


class ResumeTooOld(Exception):
    """The task is finished, but further back than the streams keep positions for."""


async def place_of(pool: Pool, task_id: int, retention: float) -> Place | None:
    """The place of a finished task; None if there is no such task or it is still pending.
    Raises ResumeTooOld if it finished longer than `retention` seconds ago."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("place_of_task"), {"task_id": task_id, "retention": retention})
    if row is None:
        return None
    if row["expired"]:
        raise ResumeTooOld(task_id)
    return (row["position"], task_id)


async def purge_positions(pool: Pool, retention: float, limit: int) -> int:
    """Delete up to `limit` batch positions older than `retention` seconds; returns how many."""
    async with pool.acquire() as conn:
        rows = await conn.fetch_all(query("purge_old_task_batches"), {"retention": retention, "limit": limit})
    return len(rows)


async def latest_place(pool: Pool) -> Place:
    """A place after every task finished and committed by now."""
    async with pool.acquire() as conn:
        row = await conn.fetch_one(query("latest_batch_position"))
    assert row is not None
    return (int(row["position"]), _AFTER_EVERY_TASK)


def parse_processed_payload(payload: str) -> ProcessedNotice:
    """A task_processed payload (notify_task_processed in sql/migrations) as a record."""
    try:
        data: dict[str, Any] = json.loads(payload)
        batch = data.get("finish_batch")
        return ProcessedNotice(task_from_payload(data), None if batch is None else int(batch))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadPayload(f"{exc}: {payload[:200]!r}") from None


def parse_batch_payload(payload: str) -> tuple[int, int]:
    """A task_batch payload, '<batch id>:<position>'."""
    batch, _, position = payload.partition(":")
    try:
        return int(batch), int(position)
    except ValueError:
        raise BadPayload(f"not '<batch>:<position>': {payload[:200]!r}") from None
