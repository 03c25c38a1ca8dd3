"""The process's one LISTEN connection: receive notifications, route each kind to its one handler,
prove the link is alive, reconnect when it is not.

A notification is only a wake-up: the database holds the truth. Notifications sent while we are
disconnected are lost (and a standby refuses LISTEN, and a failover does not carry them over), so
after every (re)connect the `on_connected` callbacks run, once LISTEN is in place: they rescan
the database, and nothing can slip between the LISTEN and the scan.

A LISTEN can be accepted and then hear nothing, forever: through PgBouncer in transaction pooling
(the server connection that ran it goes back to the pool), or on an endpoint that does not reach
the database the pool writes to. So the listener proves that it hears: after every (re)connect,
and whenever the connection has been quiet for `probe_interval`, it sends a notification on a
channel of its own through the pool and expects it on the LISTEN connection within
`probe_timeout`. `connected` (and so /ready) is true only once the probe was heard on the current
connection.

A probe can go unheard because the pool is busy (every connection waits on a lock: the probe
cannot even be sent) or because the path to the database went silent (a half-open TCP path:
bytes swallowed, nothing closed). Only the second is proof that the pool's statements wait for
nothing: the LISTEN connection missed a probe the pool did send, or did not answer a round trip
of its own. Then the pool abandons its stalled statements (Pool.abandon_stalled) instead of
letting them wait out the query timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable

from ..aio import Backoff, wait_for_event
from .driver import ListenConnection, Notification, Pool
from .errors import DatabaseError, DatabaseUnavailable
from .options import ConnectionOptions
from .queries import query

log = logging.getLogger(__name__)

Handler = Callable[[Notification], None]


# What the ERROR says when the LISTEN connection never hears its own probe.
DEAF_HINT = (
    "LISTEN_DATABASE_URL must reach the same database as DATABASE_URL directly or through a "
    "session-pooled endpoint: a LISTEN through a transaction pooler (PgBouncer with pool_mode = "
    "transaction) is accepted and then hears nothing"
)


class ListenerDeaf(DatabaseUnavailable):
    """The LISTEN connection did not hear a notification that the pool did send."""


class Listener:
    def __init__(
        self,
        options: ConnectionOptions,
        pool: Pool,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        max_backoff: float = 5.0,
        shares_pool_path: bool = True,
    ) -> None:
        # Its own application_name, so pg_stat_activity tells it from the pool's connections.
        self._options = options.with_changes(application_name=f"{options.application_name} listener")
        self._pool = pool
        self._routes: dict[str, Handler] = {}
        self._on_connected: list[Callable[[], None]] = []
        self._on_path_silent: list[Callable[[float], None]] = []
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._max_backoff = max_backoff
        # Whether the LISTEN connection reaches the database the way the pool does: only then does
        # its silence say anything about the pool's connections.
        self._shares_pool_path = shares_pool_path
        self._stop = asyncio.Event()
        self._connection: ListenConnection | None = None
        # A channel of its own: no other process hears (or is woken by) this one's probes.
        self.probe_channel = f"message_broker_probe_{secrets.token_hex(8)}"
        self._probe_ids = itertools.count(1)
        # True once the current connection heard its probe: the LISTEN is up and really hears.
        self.connected = False
        self.connects = 0  # successful connects; every one after the first is a reconnect
        self.deaf_connects = 0  # connections whose first probe was sent and never heard
        self.silent_paths = 0  # times the path was shown silent, and the pool's statements abandoned
        self.backend_pid: int | None = None

    def route(self, channel: str, handler: Handler) -> None:
        """Hand every notification on `channel` to `handler`; one handler per channel."""
        if channel in self._routes or channel == self.probe_channel:
            raise ValueError(f"channel {channel!r} has a handler already")
        self._routes[channel] = handler

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every (re)connect, the first included, once LISTEN is in place."""
        self._on_connected.append(callback)

    def on_path_silent(self, callback: Callable[[float], None]) -> None:
        """Call `callback(older_than)` whenever the path the pool shares with the LISTEN connection is
        shown silent: another pool on that path (the webhook sender's, in its own process) abandons
        its statements out for longer than `older_than` seconds too (Pool.abandon_stalled)."""
        self._on_path_silent.append(callback)

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
                self._connection = await ListenConnection.open(self._options, [*self._routes, self.probe_channel])
            except DatabaseError as exc:
                pause = backoff.pause()
                log.warning("listen connect_failed error=%r retry_in_s=%.1f", str(exc), pause)
                await wait_for_event(self._stop, pause)
                continue
            connected_at = asyncio.get_running_loop().time()
            heard = False  # whether this connection heard its probe
            try:
                self.backend_pid = await self._connection.backend_pid()
                self.connects += 1
                if self.connects > 1:
                    log.warning("listen reconnected backend_pid=%s", self.backend_pid)
                for callback in self._on_connected:
                    try:
                        callback()
                    except Exception:
                        log.exception("a LISTEN (re)connect callback failed")
                await self._receive(self._connection)
            except ListenerDeaf as exc:
                self.deaf_connects += 1
                log.error("listen deaf: %s; %s. Retrying.", exc, DEAF_HINT)
            except DatabaseError as exc:
                if not self._stop.is_set():
                    log.warning("listen lost error=%r", str(exc))
            finally:
                heard = self.connected
                self.connected = False
                self._connection.close()
                self._connection = None
            # A connection that is lost as soon as it is made (accepted, then killed, over and over;
            # or deaf) must not make this spin: the pause grows unless the last one heard and lasted.
            if heard and asyncio.get_running_loop().time() - connected_at > self._probe_interval:
                backoff.reset()
            else:
                await wait_for_event(self._stop, backoff.pause())

    async def _receive(self, conn: ListenConnection) -> None:
        """Dispatch notifications and probe until interrupted or the connection fails
        (DatabaseUnavailable; ListenerDeaf if it never heard its first probe)."""
        loop = asyncio.get_running_loop()
        probe: _Probe | None = self._start_probe()  # at once: a new connection is not trusted yet
        last_heard = loop.time()
        try:
            while not self._stop.is_set():
                now = loop.time()
                if probe is None and now - last_heard >= self._probe_interval:
                    probe = self._start_probe()
                if probe is not None and now >= probe.deadline:
                    await self._probe_missed(conn, probe)
                    probe = None
                    # Proved alive by a round trip: probe again later, or at once while this
                    # connection has not been heard yet (the pool may be back by now).
                    last_heard = loop.time() - (0 if self.connected else self._probe_interval)
                    continue
                wait_until = probe.deadline if probe is not None else last_heard + self._probe_interval
                notification = await conn.next_notification(timeout=max(0.0, wait_until - now))
                if notification is None:
                    continue
                last_heard = loop.time()
                if self._take([notification, *conn.pending_notifications()], probe) and probe is not None:
                    _discard(probe.sender)
                    probe = None
                    self._heard()
        finally:
            if probe is not None:
                _discard(probe.sender)

    def _take(self, items: list[Notification], probe: _Probe | None) -> bool:
        """Dispatch notifications to their routes; True if `probe`'s own is among them (other
        probes, answered or given up already, are dropped)."""
        heard = False
        for item in items:
            if item.channel == self.probe_channel:
                heard = heard or (probe is not None and item.payload == probe.payload)
            else:
                self._dispatch(item)
        return heard

    def _dispatch(self, item: Notification) -> None:
        handler = self._routes.get(item.channel)
        if handler is None:
            return
        try:
            handler(item)
        except Exception:
            log.exception("notification failed channel=%s payload=%r", item.channel, item.payload[:200])

    def _heard(self) -> None:
        if not self.connected:
            self.connected = True
            log.info("listen hearing backend_pid=%s", self.backend_pid)

    def _start_probe(self) -> _Probe:
        payload = str(next(self._probe_ids))
        deadline = asyncio.get_running_loop().time() + self._probe_timeout
        sender = asyncio.create_task(self._send_probe(payload, deadline), name="listener-probe")
        sender.add_done_callback(_retrieve)
        return _Probe(payload, deadline, sender)

    async def _send_probe(self, payload: str, deadline: float) -> None:
        """NOTIFY the probe through the pool, as any transaction of the service would; retried on a
        failed attempt (a pooled connection that died) while there is time."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.05, 0.5)
        while True:
            try:
                async with asyncio.timeout_at(deadline), self._pool.acquire() as conn:
                    await conn.execute(query("notify_probe"), {"channel": self.probe_channel, "payload": payload})
                return
            except DatabaseError:
                pause = backoff.pause()
                if loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)

    async def _probe_missed(self, conn: ListenConnection, probe: _Probe) -> None:
        """The probe's time is up and it was not heard. Raise if the LISTEN connection is at fault
        (and, when that is silence, have the pool abandon its stalled statements: _path_silent);
        return if it was heard late after all, or if the pool could not send it (the database is
        busy or away, not the listener) once a round trip on the LISTEN connection has shown that
        it is alive."""
        sent = probe.sender.done() and not probe.sender.cancelled() and probe.sender.exception() is None
        if sent:
            # The probe may be read already but not handled: the event loop was held up past the
            # deadline, and its timeout fired before the queue was looked at.
            if self._take(conn.pending_notifications(), probe):
                self._heard()
                return
            if not self.connected:
                raise ListenerDeaf(
                    f"the LISTEN connection (backend_pid={self.backend_pid}) did not hear, within "
                    f"{self._probe_timeout:g}s, a notification the pool sent on {self.probe_channel}"
                )
            # It heard before, and the pool could send (so it is not busy): a connection that went
            # silent (a half-open TCP path, a pooler's).
            self._path_silent("it missed a probe the pool sent")
            raise DatabaseUnavailable("LISTEN connection stopped hearing its probe")
        _discard(probe.sender)
        log.warning("listen probe_not_sent: the pool could not send the probe in %gs", self._probe_timeout)
        try:
            async with asyncio.timeout(self._probe_timeout):
                await conn.execute(query("probe"))
        except TimeoutError:
            # This connection waits on no lock: silence, not a busy pool.
            self._path_silent("it did not answer a round trip of its own")
            raise DatabaseUnavailable("LISTEN connection did not answer the probe in time") from None

    def _path_silent(self, why: str) -> None:
        """The LISTEN connection's path has gone silent: so has the pool's, when they share it, and
        its statements out for longer than a probe may take wait for an answer that will not come."""
        self.silent_paths += 1
        if not self._shares_pool_path:
            log.warning("listen path_silent: %s; the pool's path is another, its statements are left", why)
            return
        abandoned = self._pool.abandon_stalled(self._probe_timeout)
        log.warning(
            "listen path_silent: %s; abandoned %d pooled statements out for over %gs, idle connections retired",
            why,
            abandoned,
            self._probe_timeout,
        )
        for callback in self._on_path_silent:
            try:
                callback(self._probe_timeout)
            except Exception:
                log.exception("a path-silent callback failed")


def _discard(task: asyncio.Task[None]) -> None:
    """Stop a probe's sender: its outcome is no longer of interest."""
    if not task.done():
        task.cancel()


def _retrieve(task: asyncio.Task[None]) -> None:
    """A sender's error is read where it matters (_probe_missed), or not at all: never reported as
    an exception nobody retrieved."""
    if not task.cancelled():
        task.exception()


class _Probe:
    """One probe in flight: its payload, when it must have been heard, and the task sending it."""

    __slots__ = ("deadline", "payload", "sender")

    def __init__(self, payload: str, deadline: float, sender: asyncio.Task[None]) -> None:
        self.payload = payload
        self.deadline = deadline
        self.sender = sender
