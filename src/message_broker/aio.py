"""Small asyncio helpers shared by the database layer and the workers."""

from __future__ import annotations

import asyncio


async def wait_for_event(event: asyncio.Event, timeout: float) -> bool:
    """True if `event` is set within `timeout` seconds (at once if it is set already)."""
    if event.is_set():
        return True
    try:
        # asyncio.timeout rather than wait_for: no task is created for every wait.
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def being_cancelled() -> bool:
    """Whether someone asked the current task to stop (as opposed to a library raising
    CancelledError for an operation of its own)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Backoff:
    """The pauses of a retry loop: `first` after a failure, doubling with each failure in a row up
    to `cap`, back to `first` once an attempt succeeds (`reset`)."""

    def __init__(self, first: float, cap: float) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def pause(self) -> float:
        """The pause to take after this failure; the next one is twice as long, up to the cap."""
        pause = self._next
        self._next = min(pause * 2, self._cap)
        return pause

    def reset(self) -> None:
        self._next = self._first
