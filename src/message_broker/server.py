"""`message-broker serve`: bind the port, wait for the database, serve, stop on a signal.

Start-up, in order:
1. HOST:PORT is bound. A port in use (or any other reason it cannot be) ends it here: exit 1 with
   one line naming the port and PORT, before anything else is started.
2. At once, a stand-in answers on it (http/starting.py: /health 200, /ready 503, the rest 503),
   while db/startup.py reaches the database: started (embedded) or reachable (DATABASE_URL), created
   if missing, migrated, the pool open; retried with the usual backoff until STARTUP_TIMEOUT, then
   exit 1 with one line saying what could not be reached.
3. The application takes over the same listening sockets: "serving on http://...".

Stopping: SIGTERM, SIGINT or SIGHUP (the terminal of `make run` closed). The first stops gracefully
(requests in flight get SHUTDOWN_TIMEOUT,
the background loops finish their transactions, the pool closes, "stopped", exit 0). A second one
while that runs does not break it: it is noted and the stop goes on to the same end. A third exits
at once (exit 1), with a line that says so. Signals less than SAME_REQUEST seconds apart count as
one: a process manager that signals the whole process group of `make run` reaches the server
twice at once (make forwards SIGTERM to its child).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from aiohttp import web

from .config import Settings
from .db.driver import report_cancelled_statements_once
from .db.embedded import EmbeddedUnavailable
from .db.errors import DatabaseError
from .db.startup import StartupFailed, one_line, reach_database
from .http.app import create_app
from .http.protocol import app_runner
from .http.starting import StandIn
from .logs import flush_summaries

log = logging.getLogger("message_broker")

# aiohttp's default listen backlog.
BACKLOG = 128


class CannotListen(Exception):
    """HOST:PORT cannot be bound (the message is one line, for the log)."""


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` stands for (as aiohttp's TCPSite would bind)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on HOST={host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"cannot listen on {host}:{port}: port {port} is already in use by another process; "
                "stop that one or set PORT to a free port"
            ) from None
        raise CannotListen(f"cannot listen on {host}:{port} (HOST, PORT): {exc.strerror or exc}") from None
    return sockets


class StopSignals:
    """Counts SIGTERM, SIGINT and SIGHUP; the first sets `requested`, the second is noted, the third exits.

    SIGHUP's default action would end the process at once, without the stop (requests in flight
    unanswered, the embedded server's list of users left with this process on it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    SAME_REQUEST = 1.0  # seconds

    def __init__(
        self,
        shutdown_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        exit_now: Callable[[], None] | None = None,
    ) -> None:
        self.requested = asyncio.Event()
        self.count = 0
        self._shutdown_timeout = shutdown_timeout
        self._clock = clock
        self._exit_now = exit_now or _exit_now
        self._last: float | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in self.SIGNALS:
            loop.add_signal_handler(signum, self.received, signum)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in self.SIGNALS:
            loop.remove_signal_handler(signum)

    def received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        now = self._clock()
        if self._last is not None and now - self._last < self.SAME_REQUEST:
            log.info("%s again %.2f s after the last one: the same request to stop", name, now - self._last)
            return
        self._last = now
        self.count += 1
        if self.count == 1:
            log.info(
                "%s: stopping (requests in flight get up to SHUTDOWN_TIMEOUT=%g s; a third signal exits at once)",
                name,
                self._shutdown_timeout,
            )
            self.requested.set()
        elif self.count == 2:
            log.warning("%s while stopping: the stop goes on to its end; a third signal exits at once", name)
        else:
            flush_summaries()
            log.error("%s for the third time: exiting at once, without finishing the stop (exit 1)", name)
            self._exit_now()


def _exit_now() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (and wanted), else asyncio's; a statement the server
    cancelled is reported once, by its caller (report_cancelled_statements_once)."""
    loop: asyncio.AbstractEventLoop | None = None
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using asyncio's event loop")
        else:
            loop = uvloop.new_event_loop()
    if loop is None:
        loop = asyncio.new_event_loop()
    report_cancelled_statements_once(loop)
    return loop


async def freeze_startup_objects(_app: object) -> None:
    """Hide what start-up allocated (modules, schemas, routes, the pool) from the cyclic garbage
    collector: it lives as long as the process, and walking it again in every full collection
    cost ~10 % of the CPU under load. Collecting every 10,000 allocations rather than 700 trims
    the per-request collections further (gc.freeze's documented use)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def serve(settings: Settings) -> int:
    """Run the service until a signal stops it; the process's exit code."""
    loop = new_event_loop(settings.event_loop)
    asyncio.set_event_loop(loop)
    signals = StopSignals(settings.shutdown_timeout)
    signals.install(loop)
    try:
        return loop.run_until_complete(_serve(settings, signals))
    finally:
        try:
            _finish_tasks(loop, settings.shutdown_timeout)
        finally:
            signals.uninstall(loop)
            asyncio.set_event_loop(None)
            loop.close()


async def _serve(settings: Settings, signals: StopSignals) -> int:
    try:
        sockets = bind(settings.host, settings.port)
    except CannotListen as exc:
        flush_summaries()
        log.error("%s", exc)
        return 1
    url = f"http://{settings.host}:{settings.port}"
    stand_in = StandIn()
    await stand_in.start(sockets)
    log.info("listening on %s: /health answers; the API once the database is reachable", url)
    reaching = asyncio.create_task(reach_database(settings, timeout=settings.startup_timeout), name="startup")
    stopping = asyncio.create_task(signals.requested.wait(), name="stop-signal")
    await asyncio.wait({reaching, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not reaching.done():  # stopped while waiting for the database
        reaching.cancel()
        await asyncio.wait({reaching}, timeout=settings.shutdown_timeout)
        await _close(stand_in, sockets)
        flush_summaries()
        log.info("stopped")
        return 0
    try:
        reached = reaching.result()
    except (StartupFailed, DatabaseError, EmbeddedUnavailable) as exc:
        await _close(stand_in, sockets)
        flush_summaries()
        log.error("%s", one_line(exc))
        return 1

    assert reached.pool is not None  # asked for
    app = create_app(reached.settings, pool=reached.pool)
    app.on_startup.append(freeze_startup_objects)  # after every resource is open
    runner = app_runner(app, shutdown_timeout=settings.shutdown_timeout)
    failed: DatabaseError | None = None
    try:
        await runner.setup()
        await stand_in.close()
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        log.info("serving on %s", url)
        await stopping
    except DatabaseError as exc:
        # The application's own start-up reads (the API tokens, before the first request) failed:
        # like a failed migration, one line and exit 1, never a traceback.
        failed = exc
    finally:
        # Requests in flight get SHUTDOWN_TIMEOUT, then the application's cleanup stops the
        # background loops and closes the pool. A further signal raises nothing in here.
        await stand_in.close()
        await runner.cleanup()
    flush_summaries()
    if failed is not None:
        await _close(stand_in, sockets)
        log.error("%s", one_line(failed))
        return 1
    log.info("stopped")
    return 0


async def _close(stand_in: StandIn, sockets: list[socket.socket]) -> None:
    await stand_in.close()
    for sock in sockets:
        sock.close()


def _finish_tasks(loop: asyncio.AbstractEventLoop, timeout: float) -> None:
    """What asyncio.run does at the end, with a limit: a cancel swallowed inside aiopg must not
    keep the process from exiting."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=timeout))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
