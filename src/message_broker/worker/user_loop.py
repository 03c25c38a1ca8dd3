"""One user's loop: apply that user's pending tasks until none is left, then wait to be woken.

It exists only while the user has work (plus a short idle grace), so idle users cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from ..aio import Backoff
from ..db.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


class BatchDone(NamedTuple):
    """What one apply transaction did for a user."""

    applied: int  # tasks finished
    deferred: bool  # stopped early (a transfer's recipient could not be locked), or more is pending: look again


ApplyBatch = Callable[[int], Awaitable[BatchDone]]


class UserLoop:
    def __init__(
        self,
        user_id: int,
        apply_batch: ApplyBatch,
        *,
        idle_timeout: float,
        stop: asyncio.Event,
        retire: Callable[[UserLoop], None],
        max_backoff: float = 5.0,
        batch_size: int | None = None,
    ) -> None:
        self.user_id = user_id
        self._apply_batch = apply_batch
        self._idle_timeout = idle_timeout
        self._stop = stop
        self._retire = retire
        self._max_backoff = max_backoff
        self._batch_size = batch_size
        # Latched wake-up: set by a notification at any time, cleared just before each look at the
        # database, so a task committed while we are mid-batch is never missed.
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None  # while idle: resolved by wake()
        self._backing_off: asyncio.Future[None] | None = None  # after a failure: resolved by retry_now

    def wake(self, *, retry_now: bool = False) -> None:
        """Look at the database again. A plain wake-up waits for a pause after a failure to end
        (a burst of notifications must not make a failing loop spin); `retry_now` (the database is
        back: the LISTEN connection reconnected) cuts the pause short."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if retry_now and self._backing_off is not None and not self._backing_off.done():
            self._backing_off.set_result(None)

    async def _pause(self, seconds: float) -> None:
        """After a failure: `seconds`, or until stopping or told to retry now."""
        loop = asyncio.get_running_loop()
        paused = self._backing_off = loop.create_future()
        timer = loop.call_later(seconds, _resolve, paused)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({paused, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            stopping.cancel()
            self._backing_off = None

    async def _wait_woken(self, timeout: float) -> bool:
        """True once woken (at once if a wake-up is latched); False after `timeout` seconds.

        A future and a plain timer rather than an Event and asyncio.timeout(): this runs once per
        wake-up of every user, and costs a third as much."""
        if self._woken:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._woken

    async def run(self) -> None:
        backoff = Backoff(0.2, self._max_backoff)
        try:
            while not self._stop.is_set():
                self._woken = False
                try:
                    done = await self._apply_batch(self.user_id)
                except Exception as exc:
                    pause = backoff.pause()
                    if isinstance(exc, DatabaseUnavailable):
                        log.warning("apply failed user=%s error=%r retry_in_s=%.1f", self.user_id, str(exc), pause)
                    else:
                        log.exception("apply failed user=%s retry_in_s=%.1f", self.user_id, pause)
                    await self._pause(pause)
                    self._woken = True  # whatever failed is still pending: look again
                    continue
                backoff.reset()
                if done.deferred or (done.applied and (self._batch_size is None or done.applied >= self._batch_size)):
                    continue  # a full batch, or one cut short: look again, there is more
                # Nothing left as of that batch's snapshot. A task committed after it notifies
                # after its commit, and so sets _woken (cleared before the batch): no look is
                # needed until then.
                if not await self._wait_woken(self._idle_timeout):
                    # Idle long enough. Retiring happens in the same step as this check (no await
                    # in between), so a wake-up either reached us or finds no loop and starts one.
                    return
        finally:
            self._retire(self)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
