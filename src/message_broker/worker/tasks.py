"""Every background coroutine of the process, started, named, watched, restarted and stopped here.

Two kinds:
- loops (`start`): long-lived, one of each name (the LISTEN connection, the safety sweep, the
  purges, the hold deadlines, ...). A loop runs until `stopping` is set. If it ends any other way
  (an unexpected exception, or returning early) it is logged with its traceback and started again
  after a pause that doubles up to `max_backoff`; while it is down, `down()` names it (and /ready
  answers 503) and `restarts` counts it (a metric).
- one-shot tasks (`spawn`): short-lived work in the background (a user's loop, a re-check after a
  reconnect). They are tracked so that shutdown waits for them, and their failures are logged.

Shutdown is one event, `stopping`: every loop and one-shot task is expected to return soon after
it is set (loops that sleep on something else register an `interrupt` to wake them); whatever has
not returned within the timeout is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..aio import Backoff, being_cancelled, wait_for_event

log = logging.getLogger(__name__)

Run = Callable[[], Awaitable[None]]


@dataclass
class _Loop:
    name: str
    run: Run
    interrupt: Callable[[], None] | None
    task: asyncio.Task[None] | None = None
    running: bool = False  # False while it waits to be started again


class BackgroundTasks:
    def __init__(self, *, max_backoff: float = 5.0, first_backoff: float = 0.1) -> None:
        self.stopping = asyncio.Event()
        self._max_backoff = max_backoff
        self._first_backoff = first_backoff
        self._loops: dict[str, _Loop] = {}
        self._spawned: set[asyncio.Task[Any]] = set()
        self.restarts: Counter[str] = Counter()

    # -- loops ---------------------------------------------------------------------------------

    def start(self, name: str, run: Run, *, interrupt: Callable[[], None] | None = None) -> None:
        """Run `run()` as the loop `name` until shutdown, starting it again whenever it ends
        before that. `interrupt` is called once shutdown begins, to wake it from a wait."""
        if name in self._loops:
            raise ValueError(f"a background loop named {name!r} is running already")
        loop = self._loops[name] = _Loop(name, run, interrupt)
        loop.task = asyncio.create_task(self._supervise(loop), name=name)

    async def _supervise(self, loop: _Loop) -> None:
        backoff = Backoff(self._first_backoff, self._max_backoff)
        clock = asyncio.get_running_loop().time
        while not self.stopping.is_set():
            loop.running = True
            started = clock()
            try:
                failure = await self._run_once(loop)
            finally:
                loop.running = False
            if self.stopping.is_set():
                if failure is not None:  # shutdown interrupted it (closed its connection, say)
                    log.warning("background loop=%s failed_while_stopping=yes error=%r", loop.name, str(failure))
                break
            # A loop that ran a good while before failing starts again quickly; one that keeps
            # failing at once backs off, so a broken loop cannot spin.
            if clock() - started > 10 * self._max_backoff:
                backoff.reset()
            pause = backoff.pause()
            if failure is None:
                log.error("background loop=%s ended_early=yes restart_in_s=%.1f", loop.name, pause)
            else:
                log.error("background loop=%s failed=yes restart_in_s=%.1f", loop.name, pause, exc_info=failure)
            self.restarts[loop.name] += 1
            if await wait_for_event(self.stopping, pause):
                break

    async def _run_once(self, loop: _Loop) -> BaseException | None:
        """Run the loop; how it ended before shutdown: its exception, or None if it returned."""
        try:
            await loop.run()
        except asyncio.CancelledError as exc:
            if self.stopping.is_set() or being_cancelled():
                raise
            # Nobody cancelled this task: something inside the loop raised CancelledError (a
            # library's way of saying an operation was cancelled). Re-raised, it would end the
            # loop for good; it is a failure like any other.
            return exc
        except Exception as exc:
            return exc
        return None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._loops))

    def down(self) -> list[str]:
        """Loops that are not running right now (failed, waiting to be started again)."""
        if self.stopping.is_set():
            return []
        return sorted(name for name, loop in self._loops.items() if not loop.running)

    # -- one-shot tasks ----------------------------------------------------------------------------

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._spawn_done)
        return task

    def _spawn_done(self, task: asyncio.Task[Any]) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task=%s failed=yes", task.get_name(), exc_info=task.exception())

    @property
    def spawned(self) -> int:
        return len(self._spawned)

    # -- shutdown ----------------------------------------------------------------------------------

    async def stop(self, timeout: float = 5.0) -> None:
        """Set `stopping`, wake the loops, give everything `timeout` seconds, cancel the rest."""
        self.stopping.set()
        for loop in self._loops.values():
            if loop.interrupt is not None:
                try:
                    loop.interrupt()
                except Exception:
                    log.exception("interrupting background loop=%s failed", loop.name)
        pending = {loop.task for loop in self._loops.values() if loop.task is not None} | self._spawned
        if not pending:
            return
        _done, still_running = await asyncio.wait(pending, timeout=timeout)
        for task in still_running:
            log.warning("shutdown task=%s stopped=no after_s=%.1f action=cancel", task.get_name(), timeout)
            task.cancel()
        if still_running:
            await asyncio.wait(still_running, timeout=1.0)
