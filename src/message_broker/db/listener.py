"""The LISTEN connection: receive notifications, prove the link is alive, reconnect when it is not.

A notification is only a wake-up. Notifications sent while we are disconnected are lost, so
after every (re)connect the owner's `on_connected` runs: it must rescan for work, and it runs
only once LISTEN is in place, so nothing can slip between the scan and the LISTEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

from .connector import ConnectionOptions, ListenConnection, Notification
from .errors import DatabaseError

log = logging.getLogger(__name__)


class Listener:
    def __init__(
        self,
        options: ConnectionOptions,
        channels: Sequence[str],
        on_notification: Callable[[Notification], None],
        on_connected: Callable[[], Awaitable[None] | None],
        *,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        max_backoff: float = 5.0,
    ) -> None:
        # Its own application_name, so pg_stat_activity tells it from the pool's connections.
        self._options = dataclasses.replace(options, application_name=f"{options.application_name} listener")
        self._channels = list(channels)
        self._on_notification = on_notification
        self._on_connected = on_connected
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._max_backoff = max_backoff
        self._stop = asyncio.Event()
        self._connection: ListenConnection | None = None
        self.connected = False
        self.connects = 0  # successful connects; every one after the first is a reconnect
        self.backend_pid: int | None = None

    def stop(self) -> None:
        self._stop.set()
        if self._connection is not None:
            self._connection.close()

    async def run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._connection = await ListenConnection.open(self._options, self._channels)
            except DatabaseError as exc:
                log.warning("listen connect_failed error=%r retry_in_s=%.1f", str(exc), backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 0.1
            try:
                self.backend_pid = await self._connection.conn.backend_pid()
                self.connected = True
                self.connects += 1
                if self.connects > 1:
                    log.warning("listen reconnected backend_pid=%s", self.backend_pid)
                result = self._on_connected()
                if result is not None:
                    await result
                await self._receive(self._connection)
            except DatabaseError as exc:
                if not self._stop.is_set():
                    log.warning("listen lost error=%r", str(exc))
            finally:
                self.connected = False
                self._connection.close()
                self._connection = None

    async def _receive(self, conn: ListenConnection) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while not self._stop.is_set():
            quiet_for = loop.time() - last_heard
            if quiet_for >= self._probe_interval:
                # Silence could be a half-open TCP connection that will never deliver again.
                await conn.probe(self._probe_timeout)
                last_heard = loop.time()
                continue
            notification = await conn.next_notification(timeout=self._probe_interval - quiet_for)
            if notification is None:
                continue
            last_heard = loop.time()
            for item in [notification, *conn.pending_notifications()]:
                try:
                    self._on_notification(item)
                except Exception:
                    log.exception("notification failed channel=%s payload=%r", item.channel, item.payload)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
