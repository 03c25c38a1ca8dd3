"""The process's one LISTEN connection: receive notifications, route each kind to its one handler,
prove the link is alive, reconnect when it is not.

A notification is only a wake-up: the database holds the truth. Notifications sent while we are
disconnected are lost (and a standby refuses LISTEN, and a failover does not carry them over), so
after every (re)connect the `on_connected` callbacks run, once LISTEN is in place: they rescan
the database, and nothing can slip between the LISTEN and the scan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..aio import Backoff, wait_for_event
from .driver import ListenConnection, Notification
from .errors import DatabaseError, DatabaseUnavailable
from .options import ConnectionOptions
from .queries import query

log = logging.getLogger(__name__)

Handler = Callable[[Notification], None]


class Listener:
    def __init__(
        self,
        options: ConnectionOptions,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        max_backoff: float = 5.0,
    ) -> None:
        # Its own application_name, so pg_stat_activity tells it from the pool's connections.
        self._options = options.with_changes(application_name=f"{options.application_name} listener")
        self._routes: dict[str, Handler] = {}
        self._on_connected: list[Callable[[], None]] = []
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._max_backoff = max_backoff
        self._stop = asyncio.Event()
        self._connection: ListenConnection | None = None
        self.connected = False
        self.connects = 0  # successful connects; every one after the first is a reconnect
        self.backend_pid: int | None = None

    def route(self, channel: str, handler: Handler) -> None:
        """Hand every notification on `channel` to `handler`; one handler per channel."""
        if channel in self._routes:
            raise ValueError(f"channel {channel!r} has a handler already")
        self._routes[channel] = handler

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every (re)connect, the first included, once LISTEN is in place."""
        self._on_connected.append(callback)

    def interrupt(self) -> None:
        """Shutting down: stop waiting for notifications now."""
        self._stop.set()
        if self._connection is not None:
            self._connection.close()

    async def run(self) -> None:
        """Stay connected and LISTENing until interrupted."""
        backoff = Backoff(0.1, self._max_backoff)
        while not self._stop.is_set():
            try:
                self._connection = await ListenConnection.open(self._options, list(self._routes))
            except DatabaseError as exc:
                pause = backoff.pause()
                log.warning("listen connect_failed error=%r retry_in_s=%.1f", str(exc), pause)
                await wait_for_event(self._stop, pause)
                continue
            connected_at = asyncio.get_running_loop().time()
            try:
                self.backend_pid = await self._connection.backend_pid()
                self.connected = True
                self.connects += 1
                if self.connects > 1:
                    log.warning("listen reconnected backend_pid=%s", self.backend_pid)
                for callback in self._on_connected:
                    try:
                        callback()
                    except Exception:
                        log.exception("a LISTEN (re)connect callback failed")
                await self._receive(self._connection)
            except DatabaseError as exc:
                if not self._stop.is_set():
                    log.warning("listen lost error=%r", str(exc))
            finally:
                self.connected = False
                self._connection.close()
                self._connection = None
            # A connection that is lost as soon as it is made (accepted, then killed, over and over)
            # must not make this spin: the pause grows unless the last one lasted a while.
            if asyncio.get_running_loop().time() - connected_at > self._probe_interval:
                backoff.reset()
            else:
                await wait_for_event(self._stop, backoff.pause())

    async def _receive(self, conn: ListenConnection) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while not self._stop.is_set():
            quiet_for = loop.time() - last_heard
            if quiet_for >= self._probe_interval:
                # Silence could be a half-open TCP connection that will never deliver again.
                await self._probe(conn)
                last_heard = loop.time()
                continue
            notification = await conn.next_notification(timeout=self._probe_interval - quiet_for)
            if notification is None:
                continue
            last_heard = loop.time()
            for item in [notification, *conn.pending_notifications()]:
                handler = self._routes.get(item.channel)
                if handler is None:
                    continue
                try:
                    handler(item)
                except Exception:
                    log.exception("notification failed channel=%s payload=%r", item.channel, item.payload[:200])

    async def _probe(self, conn: ListenConnection) -> None:
        """Prove the connection is alive with a round trip, or raise DatabaseUnavailable."""
        try:
            async with asyncio.timeout(self._probe_timeout):
                await conn.execute(query("probe"))
        except TimeoutError:
            raise DatabaseUnavailable("LISTEN connection did not answer the probe in time") from None
