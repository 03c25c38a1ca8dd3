"""Requests waiting for a task to finish (`?wait=`): a registry task id -> futures, resolved by the
supervisor when this process applied the task (it reads the task back after its COMMIT), else by
the task_processed notifications the process already receives.

A waiting request costs a future and a dict entry, not a connection. A request that posts a task
and waits for it (`POST ...?wait=`) needs no read: it takes a claim (`expecting`) before its insert
is sent, and until it is registered every finished task this process hears of is kept, so that a
finish heard before it was registered is not missed (any finish of its task commits after its
insert, and notifications arrive in commit order). Other waits read the task once after
registering (requests that begin waiting together share one query): `GET /api/v1/task/<id>?wait=`,
a replayed idempotent post, and a claim made or ended while the LISTEN connection was down, across
a reconnect of it, or one that outlived what is kept. Either way the request then sleeps until its
future is resolved or its time is up, and then reads its task once more (a finish may have gone
unheard). After the LISTEN connection (re)connects, one query re-checks every waited task, since
notifications sent while it was down are lost; it tries again until it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from ..aio import Backoff, wait_for_event
from ..batching import Coalescer
from ..db import repository
from ..db.driver import Pool
from ..db.errors import DatabaseError, DatabaseUnavailable
from ..models import Task
from .tasks import BackgroundTasks

log = logging.getLogger(__name__)

_RECHECK_CHUNK = 1000
# Finishes kept for claims at most (a claim whose insert is stuck while thousands of other tasks
# finish must not grow memory without bound): past it the oldest are forgotten, and a claim that
# may have needed one reads its task instead.
_KEEP_AT_MOST = 10_000


class Claim:
    """A request's claim on the finishes heard from before its task's insert is sent until it is
    registered as a waiter (TaskWaiters.expecting)."""

    __slots__ = ("connections", "heard_from", "listening")

    def __init__(self, heard_from: int, connections: int, listening: bool) -> None:
        self.heard_from = heard_from  # the first of TaskWaiters' kept finishes that counts for it
        self.connections = connections  # the LISTEN connections seen when it began
        self.listening = listening  # whether the LISTEN connection was up then


class TaskWaiters:
    def __init__(
        self,
        pool: Pool,
        tasks: BackgroundTasks,
        *,
        listening: Callable[[], bool],
        queue_timeout: float | None = None,
    ) -> None:
        self._pool = pool
        self._tasks = tasks
        self._listening = listening  # whether the LISTEN connection is up (notifications arrive)
        # A future resolves to the finished task, or to None when the service shuts down.
        self._waiting: dict[int, set[asyncio.Future[Task | None]]] = {}
        self._closed = False
        # Finished tasks heard while some request stores a task it will wait for, numbered in the
        # order heard, kept until every claim that may need them has ended (see Claim). Claims in
        # the order they began, so the first is the oldest; both ends in O(1).
        self._claims: dict[Claim, None] = {}
        self._kept: OrderedDict[int, tuple[int, Task]] = OrderedDict()  # task id -> (number, task)
        self._heard = 0
        self._forgotten = 0  # the number of the last finish no longer kept
        self._keep_at_most = _KEEP_AT_MOST
        self._connections = 0
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
    def reads(self) -> int:
        """How many reads waiting requests have made (shared reads count once)."""
        return self._reader.batches

    @property
    def waiting(self) -> int:
        """How many requests are waiting right now."""
        return sum(len(futures) for futures in self._waiting.values())

    # -- the feed's side -------------------------------------------------------------------------

    def has_waiting(self) -> bool:
        return bool(self._waiting) or bool(self._claims)

    def is_waited(self, task_id: int) -> bool:
        return task_id in self._waiting

    def finished(self, task: Task) -> None:
        if self._claims:
            self._heard += 1
            self._kept[task.id] = (self._heard, task)
            self._kept.move_to_end(task.id)  # heard again (read back, then notified): keep the order
            if len(self._kept) > self._keep_at_most:
                self._forgotten = self._kept.popitem(last=False)[1][0]
        for future in self._waiting.pop(task.id, ()):
            if not future.done():
                future.set_result(task)

    def applied(self, task_ids: Iterable[int]) -> None:
        """Tasks this process has just applied (those read back are answered already): a request
        that began waiting for one after the apply chose what to read back (when its writes were
        sent), its own read before that COMMIT, is read for now, as no task_processed may come
        (the LISTEN connection down or its path silent: it slept to its timeout). Rare: a read
        only for such a waiter; nothing at all while nobody waits."""
        if not self._waiting:
            return
        late = [task_id for task_id in task_ids if task_id in self._waiting]
        if late and not self._closed:
            self._tasks.spawn("waiters-late-read", self._read_late(late))

    async def _read_late(self, task_ids: list[int]) -> None:
        try:
            found = await repository.get_tasks(self._pool, task_ids)
        except DatabaseError:
            return  # the wait's read at its end answers it still
        for task in found.values():
            if task.finished:
                self.finished(task)

    def connected(self) -> None:
        """The LISTEN connection is (back) up: re-check every waited task in the background."""
        self._connections += 1
        if not self._waiting or self._closed:
            return
        self._tasks.spawn("waiters-recheck", self._recheck(list(self._waiting)))

    async def _recheck(self, task_ids: list[int]) -> None:
        """Until it succeeds, or nobody waits for these any more: right after a reconnect the pool
        is often still on the old path (a restart, a failover), and a finish lost meanwhile is
        never notified again."""
        backoff = Backoff(0.2, 5.0)
        stopping = self._tasks.stopping
        while task_ids and not stopping.is_set():
            try:
                for start in range(0, len(task_ids), _RECHECK_CHUNK):
                    found = await repository.get_tasks(self._pool, task_ids[start : start + _RECHECK_CHUNK])
                    for task in found.values():
                        if task.finished:
                            self.finished(task)
                return
            except DatabaseError as exc:
                pause = backoff.pause()
                log.warning(
                    "re-checking %d waited tasks after a reconnect failed: %s retry_in_s=%.1f",
                    len(task_ids),
                    exc,
                    pause,
                )
                await wait_for_event(stopping, pause)
                task_ids = [task_id for task_id in task_ids if task_id in self._waiting]

    def close(self) -> None:
        """Shutting down: answer every waiter now, with the task as it last read it."""
        self._closed = True
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    # -- the request's side ----------------------------------------------------------------------

    @contextlib.contextmanager
    def expecting(self) -> Iterator[Claim]:
        """Around storing a task the request will then wait for: enter before its insert is sent,
        and pass the claim to `wait` with the task as stored."""
        claim = Claim(self._heard + 1, self._connections, self._listening())
        self._claims[claim] = None
        try:
            yield claim
        finally:
            self._end(claim)

    def _end(self, claim: Claim) -> None:
        if claim not in self._claims:  # ended already (at registration)
            return
        del self._claims[claim]
        # Forget what no remaining claim can need: finishes heard before the oldest one began.
        oldest = next(iter(self._claims)).heard_from if self._claims else self._heard + 1
        while self._kept and next(iter(self._kept.values()))[0] < oldest:
            self._kept.popitem(last=False)

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

    async def wait(
        self, task_id: int, timeout: float, *, claim: Claim | None = None, stored: Task | None = None
    ) -> Task | None:
        """The task once it is done or cancelled, or as it stands after `timeout` seconds;
        None if there is no such task. `stored`: the task as this request's `claim` stored it."""
        with self._watch(task_id) as finished:
            # From now on a notification resolves the future. What was heard before: kept for the
            # claim, or read (only after registering, so that nothing slips in between).
            task: Task | None = None
            if claim is not None:
                # No notification lost meanwhile (the LISTEN connection up then and now, never
                # reconnected in between), nor one it may need forgotten.
                if (
                    claim.listening
                    and self._listening()
                    and claim.connections == self._connections
                    and claim.heard_from > self._forgotten
                ):
                    kept = self._kept.get(task_id)
                    task = stored if kept is None else kept[1]
                self._end(claim)
            if task is None:
                task = await self._reader.submit(task_id)
            if task is None or task.finished:
                return task
            try:
                result = await asyncio.wait_for(finished, timeout)
            except TimeoutError:
                return await self._as_it_stands(task)
            return task if result is None else result

    async def _as_it_stands(self, task: Task) -> Task | None:
        """The task read once more at the wait's end: its finish may have gone unheard (sent while
        the LISTEN connection was down or its path silent), and a 202 `pending` for a task that
        is done would send the client to retry what is already applied. If the read fails, the
        task as last seen (still a true 202: it is stored)."""
        try:
            return await self._reader.submit(task.id) or task
        except DatabaseError:
            return task
