"""The background purge of expired idempotency keys: small batched deletes, so it never holds a
lock or a connection for long, and it skips keys that a request is claiming right now."""

from __future__ import annotations

import asyncio
import logging

from ..db.connector import Pool
from ..db.errors import DatabaseError
from ..db.idempotency import purge_expired
from .user_loop import wait_for_event

log = logging.getLogger(__name__)


class IdempotencyPurger:
    def __init__(self, pool: Pool, *, interval: float, batch_size: int) -> None:
        self._pool = pool
        self._interval = interval
        self._batch_size = batch_size
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.purged = 0
        self.runs = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="idempotency-purge")

    async def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._task is None:
            return
        _done, pending = await asyncio.wait({self._task}, timeout=timeout)
        for task in pending:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.purge_once()
            except DatabaseError as exc:
                log.warning("purging expired idempotency keys failed (%s); next try in %.0fs", exc, self._interval)
            except Exception:
                log.exception("purging expired idempotency keys failed")
            await wait_for_event(self._stop, self._interval)

    async def purge_once(self) -> int:
        """Delete every expired key, a batch per statement; returns how many."""
        total = 0
        while not self._stop.is_set():
            deleted = await purge_expired(self._pool, self._batch_size)
            total += deleted
            if deleted < self._batch_size:
                break
            await asyncio.sleep(0)  # let requests have the pool between batches
        self.runs += 1
        self.purged += total
        if total:
            log.info("purged %d expired idempotency keys", total)
        return total
