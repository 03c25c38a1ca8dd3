"""Coalescing: many concurrent callers' items run together in one batch call (one statement, one
transaction, one commit), without making any caller wait for company.

When a batch slot is free, a caller's batch starts at once, taking whatever else arrived in the
same event-loop turn. Callers that arrive while every slot is busy queue up and go together in the
next batch (a coalescer that is not `eager` uses a second slot only for a full batch). Under
light load each item runs alone, as it would without this; under heavy load one commit carries
dozens of items, and the throughput of the database work grows with the load instead of queueing
behind it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Runs a batch; returns one entry per item, in order: the item's result, or an exception that
# only that item's caller gets. An exception raised by the call itself goes to every caller.
BatchCall = Callable[[list[T]], Awaitable[Sequence["R | Exception"]]]


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        run: BatchCall[T, R],
        *,
        name: str,
        max_batch: int,
        max_in_flight: int,
        queue_timeout: float | None = None,
        on_queue_timeout: Callable[[], Exception] | None = None,
        eager: bool = True,
        stalled_after: float = 0.05,
        linger: float = 0.0,
    ) -> None:
        self._run = run
        # Linger: a batch that is not full waits until its oldest item has waited this long, so
        # that work nobody waits on (results to record) goes in a few large batches.
        self._linger = linger
        self._first_at = 0.0  # when the oldest queued item arrived (about, after a partial take)
        self._linger_check: asyncio.TimerHandle | None = None
        # Eager: a batch starts whenever fewer than max_in_flight run (callers wait least; right
        # for requests). Not eager: one batch at a time gathers what arrives meanwhile, and more
        # run at once only while a full batch is waiting (a backlog). Fewer, fuller transactions:
        # for the workers, ~20 % less server CPU per task under a steady load than eager, while
        # a backlog still gets max_in_flight transactions at once. Nor does a stuck batch (a row
        # lock held elsewhere) hold up the others: once every running batch has run for
        # `stalled_after` seconds, the next starts anyway.
        self._eager = eager
        self._stalled_after = stalled_after
        self._last_start = 0.0
        self._stall_check: asyncio.TimerHandle | None = None
        # A caller still queued (its batch not started) after queue_timeout seconds gives up with
        # on_queue_timeout(): when the batches in flight are stuck (a lock, a dead connection),
        # callers get a quick answer instead of queueing behind them, and nothing of theirs is stored.
        self._queue_timeout = queue_timeout
        self._on_queue_timeout = on_queue_timeout or (lambda: TimeoutError(f"{name}: no batch slot came free"))
        self._name = name
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        # Waiting callers in arrival order: (item, future, deadline to be taken by a batch).
        self._queue: list[tuple[T, asyncio.Future[R], float]] = []
        self._expiry: asyncio.TimerHandle | None = None  # armed for the oldest waiting caller
        self._in_flight: set[asyncio.Task[None]] = set()
        self.batches = 0  # batch calls completed
        self.largest_batch = 0

    async def submit(self, item: T) -> R:
        """Run `item` in some batch and return its result (or raise its exception)."""
        return await self.enqueue(item)

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Queue `item` for some batch; the future gets its result. For work nobody waits on
        (no task per item: results to record, many a second)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        deadline = math.inf if self._queue_timeout is None else loop.time() + self._queue_timeout
        if not self._queue:
            self._first_at = loop.time()
        self._queue.append((item, future, deadline))
        if self._may_start():
            self._start()
        if self._expiry is None and deadline != math.inf:
            self._expiry = loop.call_at(deadline, self._expire)
        return future

    def _expire(self) -> None:
        """Withdraw the callers no batch has taken within queue_timeout (nothing of theirs was
        stored), then wait for the next oldest. One timer for the whole queue, not one per caller:
        deadlines grow along the queue, and batches take from its head."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = 0
        while expired < len(self._queue) and self._queue[expired][2] <= now:
            expired += 1
        withdrawn, self._queue = self._queue[:expired], self._queue[expired:]
        for _, future, _ in withdrawn:
            if not future.done():
                future.set_exception(self._on_queue_timeout())
        if self._queue:
            self._expiry = loop.call_at(self._queue[0][2], self._expire)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Items waiting for a batch to take them."""
        return len(self._queue)

    def _may_start(self) -> bool:
        """Whether a new batch may start now: whenever a slot is free if eager; otherwise the
        first at once, and another beside it when a full batch is waiting or the running ones
        have stalled (see __init__; a timer checks again then)."""
        in_flight = len(self._in_flight)
        if not self._queue or in_flight >= self._max_in_flight:
            return False
        loop = asyncio.get_running_loop()
        if self._linger and len(self._queue) < self._max_batch:
            ready_at = self._first_at + self._linger
            if loop.time() < ready_at:
                if self._linger_check is None:
                    self._linger_check = loop.call_at(ready_at, self._check_linger)
                return False
        if self._eager or in_flight == 0 or len(self._queue) >= self._max_batch:
            return True
        stalled_at = self._last_start + self._stalled_after
        if loop.time() >= stalled_at:
            return True
        if self._stall_check is None:
            self._stall_check = loop.call_at(stalled_at, self._check_stalled)
        return False

    def _check_stalled(self) -> None:
        self._stall_check = None
        if self._may_start():
            self._start()

    def _check_linger(self) -> None:
        self._linger_check = None
        if self._may_start():
            self._start()

    def _start(self) -> None:
        self._last_start = asyncio.get_running_loop().time()
        task = asyncio.create_task(self._run_batch(), name=self._name)
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._may_start():
            self._start()

    async def _run_batch(self) -> None:
        # Take the batch when the task actually runs, so that callers which arrived in the same
        # event-loop turn ride along at no cost in latency.
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        if not batch:
            return
        if self._queue:
            self._first_at = asyncio.get_running_loop().time()
        started = time.perf_counter()
        try:
            results = await self._run([item for item, _, _ in batch])
        except BaseException as exc:  # including cancellation: no caller may wait forever
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        elapsed = time.perf_counter() - started
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for (_, future, _), result in zip(batch, results, strict=True):
            if future.done():  # the caller went away; the work is done all the same
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        log.debug("batch done kind=%s items=%d ms=%.2f", self._name, len(batch), elapsed * 1000)

    async def close(self, timeout: float = 5.0) -> None:
        """Let the batches in flight finish (their callers are waiting for them), and start what
        lingers."""
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None
        if self._linger_check is not None:
            self._linger_check.cancel()
            self._linger_check = None
        self._linger = 0.0
        while self._may_start():
            self._start()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
