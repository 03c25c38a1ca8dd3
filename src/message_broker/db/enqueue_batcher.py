"""Concurrent enqueue requests share one INSERT statement and one commit (see batching.py).

Under light load each task is inserted alone, as before; under heavy load one commit (and one
NOTIFY per touched user) carries dozens of tasks, which is what lifts throughput past
one-commit-per-task SQL. A task for an unknown user fails only its own request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

from ..batching import Coalescer
from ..models import Task
from . import repository
from .driver import Pool
from .errors import DatabaseUnavailable
from .repository import NewTask


class EnqueueBatcher:
    def __init__(
        self,
        pool: Pool,
        *,
        max_batch: int = 500,
        max_in_flight: int = 2,
        queue_timeout: float | None = None,
        on_stored: Callable[[list[Task | None]], None] | None = None,
        on_committed: repository.Committed | None = None,
        storing: Callable[[Iterable[int | None]], AbstractContextManager[None]] | None = None,
    ) -> None:
        self._pool = pool
        self._on_stored = on_stored  # e.g. the metrics
        self._on_committed = on_committed  # the supervisor: wakes the tasks' users at once
        self._storing = storing  # the supervisor: around each insert, with its users
        self._coalescer: Coalescer[NewTask, Task] = Coalescer(
            self._insert,
            name="enqueue",
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            queue_timeout=queue_timeout,
            on_queue_timeout=lambda: DatabaseUnavailable("the database is not keeping up with task inserts"),
        )

    async def enqueue(self, task: NewTask) -> Task:
        """Store a pending task; raises UserNotFound, HoldNotFound or ReferenceTaken (its own
        failure: the batch's other tasks are stored), or the batch's DatabaseError."""
        return await self._coalescer.submit(task)

    async def _insert(self, items: list[NewTask]) -> list[Task | Exception]:
        with self._storing([item.user_id for item in items]) if self._storing else nullcontext():
            stored = await repository.enqueue_tasks(self._pool, items, self._on_committed)
        if self._on_stored is not None:
            self._on_stored([task if isinstance(task, Task) else None for task in stored])
        return stored

    @property
    def batches(self) -> int:
        return self._coalescer.batches

    @property
    def largest_batch(self) -> int:
        return self._coalescer.largest_batch

    async def close(self, timeout: float = 5.0) -> None:
        await self._coalescer.close(timeout)
