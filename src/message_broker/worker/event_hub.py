"""Live finished-task events fanned out to event streams, each with a bounded buffer.

A stream subscribes for one user's tasks or for all. Every finished task from the feed goes into
the buffer of each matching subscription. A buffer never grows past `maxsize`:

- if it fills while its stream is stuck writing to the client, the client is not keeping up:
  the subscription ends and `on_overflow` runs at once (it drops the connection, even mid-write);
  the client reconnects with Last-Event-ID;
- if it fills while the stream is not writing (a burst of notifications arrives in one go, faster
  than any stream can run), the buffer is dropped and replaced by a CATCH_UP marker: the stream
  replays from the database what it missed, at its own pace.

When the LISTEN connection (re)connects, every subscription gets CATCH_UP too: notifications sent
while it was down are lost, so the stream replays from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

from ..db.task_events import FinishedTask

log = logging.getLogger(__name__)


class _CatchUp:
    def __repr__(self) -> str:
        return "CATCH_UP"


# "Replay from the database from your place": live events may have been missed.
CATCH_UP: Final = _CatchUp()

Item = FinishedTask | _CatchUp


class StreamEnded(Exception):
    """The subscription is over: its consumer fell too far behind, or the service is stopping."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    def __init__(self, user_id: int | None, maxsize: int, on_overflow: Callable[[], None]) -> None:
        self.user_id = user_id
        self._maxsize = maxsize
        self._on_overflow = on_overflow
        self._items: deque[Item] = deque()
        self._ready = asyncio.Event()
        self.ended: str | None = None
        # Set by the stream while it waits for a write to the client to go through.
        self.writing = False
        self.catch_ups = 0

    def push(self, item: Item) -> None:
        if self.ended is not None:
            return
        if len(self._items) >= self._maxsize:
            if self.writing:
                self.end("overflow")
                try:
                    self._on_overflow()
                except Exception:
                    log.exception("ending an overflowing event stream failed")
                return
            self._items.clear()
            self.catch_ups += 1
            item = CATCH_UP
        self._items.append(item)
        self._ready.set()

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self._items.clear()
            self._ready.set()

    async def next(self) -> Item:
        """The next item, in arrival order; raises StreamEnded once the subscription is over."""
        while True:
            if self.ended is not None:
                raise StreamEnded(self.ended)
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            await self._ready.wait()

    @property
    def buffered(self) -> int:
        return len(self._items)


class EventHub:
    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        # user id -> its subscriptions; None -> subscriptions to every user's tasks.
        self._subscriptions: dict[int | None, set[Subscription]] = {}
        self._closed = False
        # Every open stream's "stop now" (see streaming()), subscribed or still replaying.
        self._streams: set[Callable[[], None]] = set()
        self.overflows = 0

    @property
    def subscribers(self) -> int:
        return sum(len(subs) for subs in self._subscriptions.values())

    @property
    def closed(self) -> bool:
        """The service is stopping: every stream ends, one still replaying too."""
        return self._closed

    def has_subscribers(self) -> bool:
        return bool(self._subscriptions)

    def finished(self, finished: FinishedTask) -> None:
        for key in (finished.task.user_id, None):
            for subscription in list(self._subscriptions.get(key, ())):
                subscription.push(finished)

    def connected(self) -> None:
        for subscriptions in self._subscriptions.values():
            for subscription in list(subscriptions):
                subscription.push(CATCH_UP)

    def close(self) -> None:
        """Shutting down: end every stream now (they never end on their own)."""
        self._closed = True
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.end("shutdown")
        for stop in list(self._streams):
            try:
                stop()
            except Exception:
                log.exception("ending an event stream failed")

    @contextlib.contextmanager
    def streaming(self, stop: Callable[[], None]) -> Iterator[None]:
        """An open stream, for its whole life: `stop` runs on close(), so that a stream stuck
        writing to a client that reads nothing ends then too, not when the stop times out."""
        self._streams.add(stop)
        try:
            if self._closed:
                stop()
            yield
        finally:
            self._streams.discard(stop)

    @contextlib.contextmanager
    def subscribe(self, user_id: int | None, on_overflow: Callable[[], None]) -> Iterator[Subscription]:
        def overflowed() -> None:
            self.overflows += 1
            on_overflow()

        subscription = Subscription(user_id, self._maxsize, overflowed)
        if self._closed:
            subscription.end("shutdown")
        self._subscriptions.setdefault(user_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            subscriptions = self._subscriptions.get(user_id)
            if subscriptions is not None:
                subscriptions.discard(subscription)
                if not subscriptions:
                    del self._subscriptions[user_id]
