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
