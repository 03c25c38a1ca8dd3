"""Coalesces concurrent enqueue requests into one INSERT statement and one commit.

A request never waits for company: when fewer than `max_in_flight` inserts are running, its own
insert starts at once (taking whatever else arrived in the same event-loop turn). Requests that
arrive while every slot is busy queue up and go together in the next statement. Under light load
each task is inserted alone, as before; under heavy load one commit (and one NOTIFY per user)
carries dozens of tasks, which is what lifts throughput past one-commit-per-task SQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..ledger import TaskType
from ..models import Task
from . import repository
from .connector import Pool
from .repository import NewTask, UserNotFound

log = logging.getLogger(__name__)


class EnqueueBatcher:
    def __init__(
        self,
        pool: Pool,
        *,
        max_batch: int = 500,
        max_in_flight: int = 2,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._on_batch = on_batch
        self._queue: list[tuple[NewTask, asyncio.Future[Task]]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self.batches = 0  # statements run
        self.largest_batch = 0

    async def enqueue(self, user_id: int, task_type: TaskType, amount: int) -> Task:
        """Store a pending task (in some batch); raises UserNotFound, or the batch's DatabaseError."""
        future: asyncio.Future[Task] = asyncio.get_running_loop().create_future()
        self._queue.append((NewTask(user_id, task_type, amount), future))
        if len(self._in_flight) < self._max_in_flight:
            self._start_insert()
        return await future

    def _start_insert(self) -> None:
        task = asyncio.create_task(self._insert(), name="enqueue-batch")
        self._in_flight.add(task)
        task.add_done_callback(self._insert_done)

    def _insert_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._queue and len(self._in_flight) < self._max_in_flight:
            self._start_insert()

    async def _insert(self) -> None:
        # Take the batch when the insert actually starts, so that requests which arrived in the
        # same event-loop turn ride along at no cost in latency.
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        if not batch:
            return
        started = time.perf_counter()
        try:
            stored = await repository.enqueue_tasks(self._pool, [item for item, _ in batch])
        except BaseException as exc:  # including cancellation: no request may wait forever
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        elapsed = time.perf_counter() - started
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for (item, future), task in zip(batch, stored, strict=True):
            if future.done():  # the request went away; its task is stored all the same
                continue
            if task is None:
                future.set_exception(UserNotFound(item.user_id))
            else:
                future.set_result(task)
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        if log.isEnabledFor(logging.DEBUG):
            stored_count = sum(t is not None for t in stored)
            log.debug("enqueue batch tasks=%d stored=%d ms=%.2f", len(batch), stored_count, elapsed * 1000)

    async def close(self, timeout: float = 5.0) -> None:
        """Let the inserts in flight finish (their requests are waiting for them)."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
