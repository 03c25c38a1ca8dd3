"""Periodic purges of bookkeeping past its retention: expired idempotency keys, stream
positions (task_batches) older than EVENT_RETENTION, and delivered or failed webhook deliveries
older than WEBHOOK_RETENTION. The ledger itself is never purged.

Each job is a background loop under BackgroundTasks. Every `interval` it asks the database for
its turn (maintenance_runs: at most one process per interval gets it, however many run), then
deletes in small batches (each statement short, SKIP LOCKED: never waiting on, or holding up, the
requests and workers), yielding between batches, until a batch comes back short.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..aio import wait_for_event
from ..db import repository
from ..db.driver import Pool
from ..db.errors import DatabaseError
from .tasks import BackgroundTasks

log = logging.getLogger(__name__)

# The jobs' names: their loops', their turns' (maintenance_runs) and their metrics' label.
PURGE_IDEMPOTENCY_KEYS = "purge-idempotency-keys"
PURGE_EVENT_POSITIONS = "purge-event-positions"
PURGE_WEBHOOK_DELIVERIES = "purge-webhook-deliveries"


@dataclass
class JobStats:
    runs: int = 0  # turns taken (other processes take the rest)
    removed: int = 0
    failures: int = 0
    last_seconds: float = 0.0


@dataclass(frozen=True)
class Purge:
    name: str  # also the loop's name and the metrics' label
    interval: float
    batch_size: int
    # Deletes up to `batch_size` rows in one statement; returns how many.
    delete_batch: Callable[[int], Awaitable[int]]


class Housekeeping:
    def __init__(self, pool: Pool, tasks: BackgroundTasks) -> None:
        self._pool = pool
        self._tasks = tasks
        self._wake = asyncio.Event()
        self.stats: dict[str, JobStats] = {}

    def start(self, purge: Purge) -> None:
        self.stats[purge.name] = JobStats()

        async def run() -> None:
            await self._run(purge)

        self._tasks.start(purge.name, run, interrupt=self._wake.set)

    async def _run(self, purge: Purge) -> None:
        stats = self.stats[purge.name]
        while not self._tasks.stopping.is_set():
            try:
                if await repository.claim_maintenance_run(self._pool, purge.name, purge.interval):
                    await self.purge_now(purge)
            except DatabaseError as exc:
                stats.failures += 1
                log.warning("purge job=%s failed=yes error=%r next_in_s=%.0f", purge.name, str(exc), purge.interval)
            await wait_for_event(self._wake, purge.interval)

    async def purge_now(self, purge: Purge) -> int:
        """Delete everything past retention now, a batch per statement; returns how many."""
        stats = self.stats.setdefault(purge.name, JobStats())
        started = time.perf_counter()
        total = 0
        while not self._tasks.stopping.is_set():
            deleted = await purge.delete_batch(purge.batch_size)
            total += deleted
            if deleted < purge.batch_size:
                break
            await asyncio.sleep(0)  # let requests and workers have the pool between batches
        stats.runs += 1
        stats.removed += total
        stats.last_seconds = time.perf_counter() - started
        if total:
            log.info("purge job=%s removed=%d ms=%.1f", purge.name, total, stats.last_seconds * 1000)
        return total
