"""The supervisor: one coroutine per user with pending work, woken by LISTEN task_created.

    listener --task_created(user_id)--> wake(user_id) --> UserLoop (started if absent)
    start-up / reconnect / sweep ------> users_with_pending_tasks --> wake(each)

No polling: an idle service only runs the listener's probe and the low-frequency safety sweep,
which catches tasks whose notification was lost (e.g. inserted with triggers disabled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..batching import Coalescer
from ..config import Settings
from ..db import repository
from ..db.connector import ConnectionOptions, Notification, Pool
from ..db.errors import DatabaseError
from ..db.listener import Listener
from ..db.repository import AppliedBatch
from ..ledger import Outcome
from .user_loop import UserLoop, wait_for_event

log = logging.getLogger(__name__)

TASK_CREATED = "task_created"
TASK_PROCESSED = "task_processed"
# Follows a finishing transaction's task_processed notifications with its stream position
# (migration 0003; see worker/feed.py).
TASK_BATCH = "task_batch"


class Supervisor:
    def __init__(
        self,
        pool: Pool,
        options: ConnectionOptions,
        settings: Settings,
        *,
        on_applied: Callable[[AppliedBatch], None] | None = None,
    ) -> None:
        self._pool = pool
        self._on_applied = on_applied  # e.g. the metrics
        self._settings = settings
        self._stop = asyncio.Event()
        self._loops: dict[int, UserLoop] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        # At most worker_concurrency transactions in flight (leaving the rest of the pool to
        # requests), and more than one only for a backlog; users whose loops ask meanwhile share
        # the next transaction.
        self._applier: Coalescer[int, list[Outcome]] = Coalescer(
            self._apply_users,
            name="apply",
            max_batch=settings.apply_max_users,
            max_in_flight=settings.worker_concurrency,
            eager=False,
        )
        self._rescan = asyncio.Event()
        self.listener = Listener(
            options,
            [TASK_CREATED, TASK_PROCESSED, TASK_BATCH],
            self._on_notification,
            self._on_connected,
            probe_interval=settings.probe_interval,
            probe_timeout=settings.probe_timeout,
            max_backoff=settings.reconnect_max_backoff,
        )
        # task_processed and task_batch go to in-process subscribers (waiters, event streams).
        self._subscribers: dict[str, list[Callable[[Notification], None]]] = {TASK_PROCESSED: [], TASK_BATCH: []}
        self._connected_subscribers: list[Callable[[], None]] = []
        self.scans = 0  # completed scans for pending work (start-up, reconnects, sweeps)
        self.sweeps_with_missed_work = 0
        self.batches_applied = 0
        self.tasks_applied = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._background = [
            asyncio.create_task(self._guard(self.listener.run()), name="listener"),
            asyncio.create_task(self._guard(self._sweep_loop()), name="sweep"),
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop waking users, let transactions in flight commit, then end every loop."""
        self._stop.set()
        self._rescan.set()
        self.listener.stop()
        for loop in list(self._loops.values()):
            loop.wake()
        pending = [*self._background, *self._tasks]
        if pending:
            _done, still_running = await asyncio.wait(pending, timeout=timeout)
            for task in still_running:
                log.warning("shutdown task=%s stopped=no after_s=%.1f action=cancel", task.get_name(), timeout)
                task.cancel()
            if still_running:
                await asyncio.wait(still_running, timeout=1.0)
        # A transaction whose loops were cancelled above still runs to its commit or rollback.
        await self._applier.close(timeout=1.0)

    @property
    def ready(self) -> bool:
        return self.listener.connected and not self._stop.is_set()

    @property
    def active_users(self) -> int:
        return len(self._loops)

    def subscribe(self, channel: str, callback: Callable[[Notification], None]) -> None:
        """Hand every notification on `channel` (TASK_PROCESSED or TASK_BATCH) to `callback`."""
        self._subscribers[channel].append(callback)

    def subscribe_connected(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every (re)connect of the LISTEN connection, once LISTEN is in
        place: notifications sent while it was down are lost, so subscribers re-check."""
        self._connected_subscribers.append(callback)

    def _on_connected(self) -> None:
        self._rescan.set()
        for callback in self._connected_subscribers:
            try:
                callback()
            except Exception:
                log.exception("a LISTEN (re)connect subscriber failed")

    # -- waking users --------------------------------------------------------------------------

    def wake(self, user_id: int) -> bool:
        """Wake the user's loop, starting one if there is none; True if a loop was started."""
        if self._stop.is_set():
            return False
        loop = self._loops.get(user_id)
        if loop is not None:
            loop.wake()
            return False
        loop = UserLoop(
            user_id,
            self._applier.submit,
            idle_timeout=self._settings.user_idle_timeout,
            stop=self._stop,
            retire=self._retire,
            batch_size=self._settings.batch_size,
        )
        self._loops[user_id] = loop
        task = asyncio.create_task(self._guard(loop.run()), name=f"user-{user_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _retire(self, loop: UserLoop) -> None:
        if self._loops.get(loop.user_id) is loop:
            del self._loops[loop.user_id]

    def _on_notification(self, notification: Notification) -> None:
        if notification.channel == TASK_CREATED:
            try:
                user_id = int(notification.payload)
            except ValueError:
                log.warning("notification ignored channel=task_created payload=%r", notification.payload)
                return
            self.wake(user_id)
            return
        for callback in self._subscribers.get(notification.channel, ()):
            callback(notification)

    async def _apply_users(self, user_ids: list[int]) -> list[list[Outcome]]:
        started = time.perf_counter()
        batch = await repository.apply_pending_batches(self._pool, user_ids, self._settings.batch_size)
        applied = len(batch.task_types)
        if applied:
            self.batches_applied += 1
            self.tasks_applied += applied
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.debug("batch applied users=%d tasks=%d ms=%.2f", len(user_ids), applied, elapsed_ms)
            if self._on_applied is not None:
                self._on_applied(batch)
        return [batch.outcomes[user_id] for user_id in user_ids]

    # -- the safety net ------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        """Wake every user with pending tasks: after each (re)connect of the listener, and every
        sweep_interval in case a notification was lost anyway."""
        retry = 0.5
        while not self._stop.is_set():
            rescan = await wait_for_event(self._rescan, self._settings.sweep_interval)
            if self._stop.is_set():
                return
            self._rescan.clear()
            try:
                user_ids = await repository.users_with_pending_tasks(self._pool)
            except DatabaseError as exc:
                log.warning("scan failed error=%r retry_in_s=%.1f", str(exc), retry)
                await wait_for_event(self._stop, retry)
                retry = min(retry * 2, self._settings.reconnect_max_backoff)
                self._rescan.set()
                continue
            retry = 0.5
            self.scans += 1
            started = sum(self.wake(user_id) for user_id in user_ids)
            if started and not rescan:
                self.sweeps_with_missed_work += 1
                log.warning("sweep found_missed_work=yes users=%d", started)
            elif user_ids:
                log.info("scan users_with_pending=%d", len(user_ids))

    async def _guard(self, coro: object) -> None:
        """Run a background coroutine, logging (not losing) any failure."""
        try:
            await coro  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task=%s failed=yes", asyncio.current_task().get_name())  # type: ignore[union-attr]
