"""Holds released at their deadline: one timer for the next deadline of all holds, not a poll.

    start, each (re)connect, after releasing --> next deadline from the database --> timer
    NOTIFY hold_deadline '<epoch>' (a hold applied) --> earlier than the timer? re-arm it
    timer fires --> release_expired_holds: one release task per hold past its deadline

A release is a task in the hold's user's queue, applied in order with the user's other tasks, so
the history explains every change of `held`. The database makes it once per hold (a unique
index), whichever process gets there first; holds that expired while no process ran are released
at start-up. The timer also re-reads the database every `max_wait` seconds, for a deadline whose
notification was lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from ..aio import Backoff, wait_for_event
from ..db import repository
from ..db.driver import Notification, Pool
from ..db.errors import DatabaseError
from ..db.listener import Listener
from .tasks import BackgroundTasks

log = logging.getLogger(__name__)

HOLD_DEADLINE = "hold_deadline"
# A deadline in the past or a moment away: look again this soon, not in a busy loop.
_SOON = 0.01
# A hold still due after a pass was left alone because another transaction holds its row (a
# worker resolving it) or its lock (a capture or void of it being stored): look again, less often while it lasts.
_LOCKED_MAX_WAIT = 0.5
# The most releases one statement makes (each holds its hold's advisory lock until the commit).
_RELEASES_PER_STATEMENT = 1000


class HoldDeadlines:
    def __init__(
        self,
        pool: Pool,
        listener: Listener,
        tasks: BackgroundTasks,
        *,
        max_wait: float,
        batch_size: int = 1000,
        max_backoff: float = 5.0,
        on_released: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._pool = pool
        self._tasks = tasks
        self._max_wait = max_wait
        # A bounded share of PostgreSQL's lock table (64 x max_connections entries by default).
        self._batch_size = min(batch_size, _RELEASES_PER_STATEMENT)
        self._max_backoff = max_backoff
        self._wake = asyncio.Event()
        self._target = 0.0  # loop time at which to look next
        self._reread = False
        self.released = 0
        self._on_released = on_released  # the metrics: release tasks are stored tasks too
        listener.route(HOLD_DEADLINE, self._deadline_notified)
        listener.on_connected(self._reconnected)

    def start(self) -> None:
        self._tasks.start("hold-deadlines", self._run, interrupt=self._wake.set)

    def _deadline_notified(self, notification: Notification) -> None:
        try:
            deadline = float(notification.payload)
        except ValueError:
            log.warning("notification ignored channel=hold_deadline payload=%r", notification.payload[:200])
            return
        at = asyncio.get_running_loop().time() + (deadline - time.time())
        if at < self._target:
            self._target = at
            self._wake.set()

    def _reconnected(self) -> None:
        # Notifications sent while the LISTEN connection was down are lost: read the database.
        self._reread = True
        self._wake.set()

    async def _run(self) -> None:
        stopping = self._tasks.stopping
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.1, self._max_backoff)
        still_due = Backoff(_SOON, _LOCKED_MAX_WAIT)
        while not stopping.is_set():
            self._reread = False
            # No timer while the database is read: a hold applied meanwhile may be missing from the
            # read's snapshot, and its notification must win against any deadline, not against
            # the one that just fell due.
            self._target = math.inf
            try:
                seconds = await self._release_due()
            except DatabaseError as exc:
                pause = backoff.pause()
                log.warning("hold deadlines failed error=%r retry_in_s=%.1f", str(exc), pause)
                # The LISTEN connection coming back (the database is back) ends the pause too; a
                # hold's notification does not (the read after the pause finds its deadline).
                self._target = -math.inf
                self._wake.clear()
                await wait_for_event(self._wake, pause)
                continue
            backoff.reset()
            if seconds is not None and seconds <= 0:
                wait = still_due.pause()
            else:
                still_due.reset()
                wait = self._max_wait if seconds is None else min(max(seconds, _SOON), self._max_wait)
            self._target = min(self._target, loop.time() + wait)
            while not (stopping.is_set() or self._reread) and (remaining := self._target - loop.time()) > 0:
                self._wake.clear()
                await wait_for_event(self._wake, remaining)

    async def _release_due(self) -> float | None:
        """Queue the releases of every hold past its deadline; seconds to the next deadline."""
        while True:
            released = await repository.release_expired_holds(self._pool, self._batch_size)
            if released:
                self.released += released
                self._on_released(released)
                log.info("holds released_at_deadline=%d", released)
            if released < self._batch_size:
                return await repository.next_hold_deadline(self._pool)
            await asyncio.sleep(0)  # let requests and workers have the pool between batches
