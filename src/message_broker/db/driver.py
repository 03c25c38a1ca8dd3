"""The one module that touches aiopg/psycopg2: connections, the pool, LISTEN, and error translation.

Everything above this speaks in plain rows (dicts) and the errors of `db.errors`: whatever the
driver or the event loop throws while talking to PostgreSQL leaves here as one of those, and
whatever a failed attempt opened is closed. The driver could be swapped by rewriting this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from importlib.metadata import version
from types import TracebackType
from typing import Any, NamedTuple

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from ..aio import being_cancelled
from .errors import DatabaseError, DatabaseUnavailable, ForeignKeyViolation, QueryTimeout, UniqueViolation
from .options import ConnectionOptions

log = logging.getLogger(__name__)

# The workarounds below reach into aiopg's internals; they are applied only on the version they
# were written against (aiopg is pinned, and frozen since 2022).
_AIOPG_1_4 = version("aiopg") == "1.4.0"

Row = dict[str, Any]
Params = Mapping[str, Any] | None

# Errors that say the server cannot do our work any more, whatever the statement: it is shutting
# down, or it is a standby (a primary demoted by a failover or switchover refuses writes and
# LISTEN with SQLSTATE 25006). A connection that saw one is closed, so the pool opens a new one,
# which the single endpoint routes to the new primary.
_SERVER_GONE = (
    psycopg2.errors.AdminShutdown,
    psycopg2.errors.CrashShutdown,
    psycopg2.errors.CannotConnectNow,
    psycopg2.errors.ReadOnlySqlTransaction,
)


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise driver, network and event-loop errors as the project's own (see db.errors)."""
    try:
        yield
    except asyncio.CancelledError as exc:
        # aiopg turns a statement the server cancelled (statement_timeout, pg_cancel_backend) into
        # a bare CancelledError raised while handling the QueryCanceled. Left as it is, it would
        # look like a cancelled task: a request would end without an answer and a background loop
        # would stop for good. A real cancellation of this task still propagates.
        if isinstance(exc.__context__, psycopg2.errors.QueryCanceled) and not being_cancelled():
            raise QueryTimeout(_message(exc.__context__)) from exc.__context__
        raise
    except psycopg2.errors.UniqueViolation as exc:
        raise UniqueViolation(exc.diag.constraint_name) from exc
    except psycopg2.errors.ForeignKeyViolation as exc:
        raise ForeignKeyViolation(exc.diag.constraint_name) from exc
    except psycopg2.errors.QueryCanceled as exc:
        raise QueryTimeout(_message(exc)) from exc
    except (psycopg2.OperationalError, psycopg2.InterfaceError, *_SERVER_GONE) as exc:
        raise DatabaseUnavailable(_message(exc)) from exc
    except psycopg2.Error as exc:
        raise DatabaseError(_message(exc)) from exc
    except TimeoutError as exc:
        raise QueryTimeout("timed out waiting for the database") from exc
    except OSError as exc:
        raise DatabaseUnavailable(_message(exc)) from exc


def _message(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def array_literal(values: list[Any]) -> str | None:
    """`values` as the text of a PostgreSQL array ('{1,2,NULL}', '{"a","b"}'), or None when they
    are not all ints (and NULLs), or all strings and NULLs.

    psycopg2 adapts a list element by element (quoting each through libpq): for the thousands of
    values of one batch statement that was the single largest CPU cost of applying a backlog. One
    string of the whole array costs a fraction of that; the SQL casts it (%(ids)s::bigint[]),
    which every list parameter here does anyway."""
    if all(type(v) is int for v in values):  # not bool, an int subclass: bigint[] rejects it
        return "{" + ",".join(map(str, values)) + "}"
    if all(v is None or type(v) is int for v in values):
        return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"
    if all(v is None or type(v) is str for v in values):
        return (
            "{"
            + ",".join("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
            + "}"
        )
    return None


def _adapted(params: Params) -> Params:
    """`params` with each list as its array literal; the same mapping when it has no list (most
    queries: no copy on their way)."""
    if not params:
        return params
    literals = {
        name: literal
        for name, value in params.items()
        if type(value) is list and (literal := array_literal(value)) is not None
    }
    return {**params, **literals} if literals else params


class Connection:
    """A connection lent out by the pool, or one of its own: run SQL, get dict rows.

    A list parameter travels as one array literal (see array_literal): cast it in the SQL."""

    def __init__(self, raw: aiopg.Connection, query_timeout: float | None = None, limits: str = "") -> None:
        self._raw = raw
        self._query_timeout = query_timeout  # None: the connection's own (its connect timeout)
        # Sent first in every transaction (ConnectionOptions.transaction_limits): the limits are
        # never session state, so a transaction pooler may run each transaction anywhere.
        self._limits = limits
        # Set by transaction(): BEGIN is sent with the first statement, saving a round trip.
        self._begin_pending = False
        self._in_transaction = False

    def _with_begin(self, sql: str) -> str:
        if self._begin_pending:
            self._begin_pending = False
            self._in_transaction = True
            return "BEGIN;" + self._limits + sql
        if self._in_transaction:
            return sql
        # A statement on its own is a transaction of its own: its limits go with it (a multi-
        # statement string runs as one implicit transaction, in which is_local settings hold).
        return self._limits + sql

    @contextlib.contextmanager
    def _statement(self) -> Iterator[None]:
        try:
            with translated_errors():
                yield
        except DatabaseUnavailable as exc:
            if isinstance(exc.__cause__, _SERVER_GONE):
                self.close()  # never reused: see _SERVER_GONE
            raise

    async def fetch_all(self, sql: str, params: Params = None) -> list[Row]:
        """Rows of the (last) statement. Several statements separated by ';' go in one round
        trip; in READ COMMITTED each still takes its own snapshot."""
        with self._statement():
            async with self._raw.cursor(timeout=self._query_timeout) as cur:
                await cur.execute(self._with_begin(sql), _adapted(params))
                if cur.description is None:
                    return []
                names = [column.name for column in cur.description]
                return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]

    async def fetch_one(self, sql: str, params: Params = None) -> Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Params = None) -> None:
        with self._statement():
            async with self._raw.cursor(timeout=self._query_timeout) as cur:
                await cur.execute(self._with_begin(sql), _adapted(params))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """BEGIN ... COMMIT, or ROLLBACK if the body raises (including on cancellation).

        BEGIN travels with the body's first statement; a body that sends nothing costs nothing.
        (Transaction control is the driver's own SQL, like LISTEN below: not a query of sql/.)"""
        self._begin_pending = True
        try:
            yield self
        except BaseException:
            if self._begin_pending:  # nothing was sent
                self._begin_pending = False
                raise
            try:
                if not self.closed:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.execute("ROLLBACK"))
            finally:
                self._in_transaction = False
            raise
        if self._begin_pending:
            self._begin_pending = False
            return
        try:
            await self.execute("COMMIT")
        finally:
            self._in_transaction = False

    def quote_ident(self, name: str) -> str:
        """An identifier quoted for SQL text (identifiers cannot be bound parameters)."""
        with translated_errors():
            return str(psycopg2.extensions.quote_ident(name, self._raw.raw))

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    @property
    def idle(self) -> bool:
        """Open and outside any transaction: safe to hand to the next caller."""
        return not self.closed and self._raw.raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE

    def close(self) -> None:
        if not self._raw.closed:
            self._raw.close()

    async def backend_pid(self) -> int:
        with translated_errors():
            return int(await self._raw.get_backend_pid())


def _release_half_built(exc: BaseException) -> None:
    """Close the aiopg connection a failed attempt left half built.

    With uvloop, aiopg's Connection.__init__ can fail in `loop.add_reader` (RuntimeError: the
    handler is closed) when libpq has already closed the socket of a refused attempt. The object
    it was building is only reachable from the traceback, and it keeps that socket's file
    descriptor registered in uvloop, which makes the next attempt on the same descriptor number
    fail the same way: close it, which also unregisters it."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, aiopg.Connection):
            _close_quietly(candidate)
        tb = tb.tb_next


def _has_input(raw: aiopg.Connection) -> bool:
    """Whether an idle connection has something to read: nothing should arrive on one, so this is
    the server's goodbye (FATAL, EOF, a reset) that the event loop has not handled yet.

    aiopg's free list keeps such a connection until its reader callback has run, and a statement
    sent on it fails (DatabaseUnavailable) although a fresh connection would have served it. With
    uvloop it can be worse: an error on the socket (a reset) closes the loop's watcher of it
    without a word, and a statement sent on it waits for an answer nobody will report, until the
    query timeout. One poll(2) of the socket, no round trip, catches both before anything is sent."""
    try:
        return _socket_events(raw.raw.fileno()) != 0
    except (OSError, ValueError, psycopg2.Error):  # no socket any more
        return True


def _socket_events(fileno: int) -> int:
    """What poll(2) reports for a socket right now, without waiting (0: nothing to read)."""
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return sum(events for _, events in poller.poll(0))


_aiopg_ready = aiopg.Connection._ready


def _ready_to_the_end(weak_self: weakref.ref[aiopg.Connection]) -> None:
    """aiopg's reader callback, plus one more read, right after it, of a socket that failed while
    a statement waits for its answer.

    When the server resets a connection (it was terminated, or stopped, while our statement was on
    the way: over TCP, the unread statement makes the kernel answer with a reset), uvloop runs the
    reader callback once more and then closes its watcher of the socket, silently. If that one
    read got only the server's FATAL message and not the end of the stream, libpq still waits for
    more, the callback never comes again, and the statement waits out the query timeout (15 s at
    the defaults) instead of failing at once. Reading again once uvloop is done with the socket
    lets libpq see the reset: the statement fails now, and aiopg unregisters the socket."""
    _aiopg_ready(weak_self)
    raw = weak_self()
    if raw is not None and _waits_on_failed_socket(raw):
        raw._loop.call_soon(_read_the_failure, weak_self)


def _read_the_failure(weak_self: weakref.ref[aiopg.Connection]) -> None:
    for _ in range(3):  # each read moves libpq on; it needs at most the error and the end
        raw = weak_self()
        if raw is None or not _waits_on_failed_socket(raw):
            return
        _aiopg_ready(weak_self)


def _waits_on_failed_socket(raw: aiopg.Connection) -> bool:
    """A statement waits for its answer (not for the socket to take more: aiopg's error path does
    not unregister a writer) on a socket that reports an error."""
    waiter, fileno = raw._waiter, raw._fileno
    if waiter is None or waiter.done() or raw._writing or fileno is None:
        return False
    try:
        events = _socket_events(fileno)
    except (OSError, ValueError):
        return False
    return bool(events & select.POLLERR and not events & select.POLLNVAL)


if _AIOPG_1_4:
    aiopg.Connection._ready = staticmethod(_ready_to_the_end)


def _close_quietly(raw: aiopg.Connection) -> None:
    with contextlib.suppress(Exception):
        raw.close()
    # aiopg fails the connection's internal future when it closes; nobody will read it.
    waiter = getattr(raw, "_waiter", None)
    if waiter is not None and waiter.done() and not waiter.cancelled():
        waiter.exception()


async def _open_raw(options: ConnectionOptions) -> aiopg.Connection:
    # A second attempt only after the event loop's own failure (see _release_half_built): releasing
    # the half-built connection clears the stale registration, and nothing was sent yet.
    for attempt in (1, 2):
        try:
            with translated_errors():
                return await aiopg.connect(options.dsn, timeout=options.connect_timeout, **options.driver_kwargs())
        except (RuntimeError, AssertionError) as exc:
            _release_half_built(exc)
            if attempt == 2:
                raise DatabaseUnavailable(f"connecting failed: {_message(exc)}") from None
    raise AssertionError("unreachable")


async def connect(options: ConnectionOptions) -> Connection:
    """A single connection outside the pool (migrations, tools)."""
    return Connection(await _open_raw(options), options.query_timeout, options.transaction_limits())


# aiopg 1.4.0 (frozen since 2022) wakes a caller waiting for a pooled connection only when an open
# connection is returned. When a closed one comes back (the server restarted, a query timed out),
# the waiters sleep on until POOL_ACQUIRE_TIMEOUT although there is room for a new connection: the
# fault suite saw 3 s 503s while PostgreSQL restarted. Pool._wakeup is aiopg's own (private) way to
# wake one; it is called only on the version whose internals this was written against.
_POOL_WAKEUP_WORKAROUND = _AIOPG_1_4


class Pool:
    """The shared connection pool. `acquire()` hands out a live connection or raises
    DatabaseUnavailable (never anything else) within `acquire_timeout`."""

    def __init__(self, raw: aiopg.Pool, acquire_timeout: float, query_timeout: float, limits: str = "") -> None:
        self._raw = raw
        self._limits = limits
        self._acquire_timeout = acquire_timeout
        self._query_timeout = query_timeout
        self._wakeups: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, options: ConnectionOptions, *, min_size: int, max_size: int, acquire_timeout: float) -> Pool:
        try:
            with translated_errors():
                raw = await aiopg.create_pool(
                    options.dsn,
                    minsize=min_size,
                    maxsize=max_size,
                    # aiopg uses this for connecting (and as the default query limit, which our
                    # Connection overrides with query_timeout). The pool connects while holding
                    # its lock, so a connect that hangs (a half-open path) must give up soon.
                    timeout=options.connect_timeout,
                    # A connection idle this long is replaced, so one that died quietly is not kept.
                    pool_recycle=300,
                    **options.driver_kwargs(),
                )
        except (RuntimeError, AssertionError) as exc:
            _release_half_built(exc)
            raise DatabaseUnavailable(f"connecting failed: {_message(exc)}") from None
        return cls(raw, acquire_timeout, options.query_timeout, options.transaction_limits())

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        try:
            async with asyncio.timeout(self._acquire_timeout):
                raw = await self._acquire_live()
        except TimeoutError:
            raise DatabaseUnavailable("no database connection came free in time") from None
        conn = Connection(raw, self._query_timeout, self._limits)
        try:
            yield conn
        finally:
            if not conn.idle:
                # Never hand a connection in an unknown transaction state to the next caller.
                conn.close()
            await self._raw.release(raw)
            if raw.closed:
                self._wake_a_waiter()

    async def _acquire_live(self) -> aiopg.Connection:
        """A connection from aiopg's pool, retried while aiopg hands out one that died in its free
        list (nothing was sent on it yet, so a retry is safe)."""
        while True:
            try:
                with translated_errors():
                    raw = await self._raw.acquire()
            except AssertionError as exc:
                # aiopg's _acquire asserts `not conn.closed` on the connection it took from the free
                # list; one terminated by the server while the pool was busy connecting fails it.
                # That connection left the pool's books with the assertion: close it and go on.
                dead = exc.args[0] if exc.args else None
                if isinstance(dead, aiopg.Connection):
                    _close_quietly(dead)
                continue
            except RuntimeError as exc:  # "Cannot acquire connection after closing pool", uvloop
                _release_half_built(exc)
                raise DatabaseUnavailable(_message(exc)) from None
            if raw.closed or _has_input(raw):  # died in the free list, noticed or not
                raw.close()
                await self._raw.release(raw)
                continue
            return raw

    def _wake_a_waiter(self) -> None:
        if not _POOL_WAKEUP_WORKAROUND:
            return
        task = asyncio.create_task(self._raw._wakeup(), name="pool-wakeup")
        self._wakeups.add(task)
        task.add_done_callback(self._wakeups.discard)

    @property
    def size(self) -> int:
        return int(self._raw.size)

    @property
    def in_use(self) -> int:
        return int(self._raw.size - self._raw.freesize)

    async def close(self) -> None:
        for task in list(self._wakeups):
            task.cancel()
        self._raw.close()
        await self._raw.wait_closed()


class Notification(NamedTuple):
    """One NOTIFY as received (a named tuple: two are built per task under load)."""

    channel: str
    payload: str
    pid: int


class ListenConnection(Connection):
    """A connection of its own that LISTENs. It is kept outside the pool: pool.wait_closed()
    would wait for it forever, and it must never be lent to a request."""

    @classmethod
    async def open(cls, options: ConnectionOptions, channels: list[str]) -> ListenConnection:
        conn = cls(await _open_raw(options), options.query_timeout, options.transaction_limits())
        try:
            for channel in channels:
                # LISTEN takes an identifier, which cannot be a bound parameter; the names come
                # from our code, never from input, and are quoted all the same.
                await conn.execute(f"LISTEN {conn.quote_ident(channel)}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def next_notification(self, timeout: float) -> Notification | None:
        """The next notification, or None if none came within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                with translated_errors():
                    raw = await self._raw.notifies.get()
        except TimeoutError:
            return None
        return Notification(raw.channel, raw.payload, raw.pid)

    def pending_notifications(self) -> list[Notification]:
        """Notifications already received, without waiting."""
        found = []
        queue = self._raw.notifies
        while not queue.empty():
            raw = queue.get_nowait()
            found.append(Notification(raw.channel, raw.payload, raw.pid))
        return found
