"""Requests waiting for a task to finish (`?wait=`): a registry task id -> futures, resolved by the
supervisor when this process applied the task (it reads the task back after its COMMIT), else by
the task_processed notifications the process already receives.

A waiting request costs a future and a dict entry, not a connection: it reads the task once (after
registering, so a notification cannot slip in between; requests that begin waiting together share
one query), then sleeps until its future is resolved or its time is up. After the LISTEN
connection (re)connects, one query re-checks every waited task, since notifications sent while it
was down are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from ..batching import Coalescer
from ..db import repository
from ..db.driver import Pool
from ..db.errors import DatabaseError, DatabaseUnavailable
from ..models import Task
from .tasks import BackgroundTasks

log = logging.getLogger(__name__)

_RECHECK_CHUNK = 1000


class TaskWaiters:
    def __init__(self, pool: Pool, tasks: BackgroundTasks, *, queue_timeout: float | None = None) -> None:
        self._pool = pool
        self._tasks = tasks
        # A future resolves to the finished task, or to None when the service shuts down.
        self._waiting: dict[int, set[asyncio.Future[Task | None]]] = {}
        self._closed = False
        # Sixty-four clients waiting at once cost one read, not sixty-four.
        # Queued behind stuck reads no longer than a request would wait for a pooled connection.
        self._reader: Coalescer[int, Task | None] = Coalescer(
            self._read,
            name="wait-read",
            max_batch=500,
            max_in_flight=2,
            queue_timeout=queue_timeout,
            on_queue_timeout=lambda: DatabaseUnavailable("the database is not keeping up with waiting requests"),
        )

    async def _read(self, task_ids: list[int]) -> list[Task | None]:
        found = await repository.get_tasks(self._pool, task_ids)
        return [found.get(task_id) for task_id in task_ids]

    @property
    def waiting(self) -> int:
        """How many requests are waiting right now."""
        return sum(len(futures) for futures in self._waiting.values())

    # -- the feed's side -------------------------------------------------------------------------

    def has_waiting(self) -> bool:
        return bool(self._waiting)

    def is_waited(self, task_id: int) -> bool:
        return task_id in self._waiting

    def finished(self, task: Task) -> None:
        for future in self._waiting.pop(task.id, ()):
            if not future.done():
                future.set_result(task)

    def connected(self) -> None:
        """The LISTEN connection is (back) up: re-check every waited task in the background."""
        if not self._waiting or self._closed:
            return
        self._tasks.spawn("waiters-recheck", self._recheck(list(self._waiting)))

    async def _recheck(self, task_ids: list[int]) -> None:
        try:
            for start in range(0, len(task_ids), _RECHECK_CHUNK):
                found = await repository.get_tasks(self._pool, task_ids[start : start + _RECHECK_CHUNK])
                for task in found.values():
                    if task.finished:
                        self.finished(task)
        except DatabaseError as exc:
            # The waiters still answer at their timeout, with the task as they last read it.
            log.warning("re-checking %d waited tasks after a reconnect failed: %s", len(task_ids), exc)

    def close(self) -> None:
        """Shutting down: answer every waiter now, with the task as it last read it."""
        self._closed = True
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    # -- the request's side ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _watch(self, task_id: int) -> Iterator[asyncio.Future[Task | None]]:
        future: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_result(None)
        self._waiting.setdefault(task_id, set()).add(future)
        try:
            yield future
        finally:
            # Timed out, answered, or the request was cancelled: leave nothing behind.
            futures = self._waiting.get(task_id)
            if futures is not None:
                futures.discard(future)
                if not futures:
                    del self._waiting[task_id]
            future.cancel()

    async def wait(self, task_id: int, timeout: float) -> Task | None:
        """The task once it is done or cancelled, or as it stands after `timeout` seconds;
        None if there is no such task."""
        with self._watch(task_id) as finished:
            # Read only after registering: a notification from now on resolves the future.
            task = await self._reader.submit(task_id)
            if task is None or task.finished:
                return task
            try:
                result = await asyncio.wait_for(finished, timeout)
            except TimeoutError:
                return task
            return task if result is None else result
