"""The one module that touches aiopg/psycopg2: connections, the pool, LISTEN, and error translation.

Everything above this speaks in plain rows (dicts) and the errors of `db.errors`: whatever the
driver or the event loop throws while talking to PostgreSQL leaves here as one of those, and
whatever a failed attempt opened is closed. The driver could be swapped by rewriting this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
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
from .errors import (
    DatabaseError,
    DatabaseUnavailable,
    ForeignKeyViolation,
    QueryTimeout,
    StatementPooling,
    UniqueViolation,
    WriteCheckFailed,
)
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


# PgBouncer's words (as a FATAL error, then it closes the connection) when pool_mode = statement
# meets a transaction of more than one statement.
_STATEMENT_POOLING = "transaction blocks not allowed in statement pooling mode"

# Our own SQLSTATE: a statement's check of its writes failed (migration 0011).
_WRITE_CHECK_FAILED = "MB001"


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
        if _STATEMENT_POOLING in str(exc):
            raise StatementPooling() from exc
        raise DatabaseUnavailable(_message(exc)) from exc
    except psycopg2.Error as exc:
        if exc.pgcode == _WRITE_CHECK_FAILED:
            raise WriteCheckFailed(_message(exc)) from exc
        raise DatabaseError(_message(exc)) from exc
    except TimeoutError as exc:
        raise QueryTimeout("timed out waiting for the database") from exc
    except OSError as exc:
        raise DatabaseUnavailable(_message(exc)) from exc


def report_cancelled_statements_once(loop: asyncio.AbstractEventLoop) -> None:
    """aiopg hands a statement the server cancelled (statement_timeout) to the loop's exception
    handler, which logs an ERROR with a traceback, and then raises it to the statement's caller,
    who answers for it (translated_errors: a 503, a background loop's warning). One report is
    enough: this handler drops aiopg's and passes every other on."""
    passed_on = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), psycopg2.extensions.QueryCanceledError):
            return
        if passed_on is None:
            loop.default_exception_handler(context)
        else:
            passed_on(loop, context)

    loop.set_exception_handler(handler)


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


# Every transaction is READ COMMITTED, whatever default_transaction_isolation the role or database
# sets: the apply locks its users and then reads, and a read of an instant waits for an apply's
# commit, each counting on its statements seeing what committed before them; under REPEATABLE READ
# or SERIALIZABLE they failed with serialization errors instead (503s, applies retried).
_BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED;"
_SNAPSHOT_BEGIN = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;"
_READ_COMMITTED = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED;"


class Connection:
    """A connection lent out by the pool, or one of its own: run SQL, get dict rows.

    A list parameter travels as one array literal (see array_literal): cast it in the SQL."""

    def __init__(self, raw: aiopg.Connection, query_timeout: float | None = None, limits: str = "") -> None:
        self._raw = raw
        self._query_timeout = query_timeout  # None: the connection's own (its connect timeout)
        # Sent first in every transaction (ConnectionOptions.transaction_limits): the limits are
        # never session state, so a transaction pooler may run each transaction anywhere. After
        # BEGIN, which names the isolation level itself, as they are...
        self._transaction_limits = limits
        # ...and before a statement of its own (an implicit transaction), with its isolation level.
        # Neither without limits: CREATE DATABASE must be alone in its message.
        self._limits = _READ_COMMITTED + limits if limits else ""
        # Set by transaction(): BEGIN is sent with the first statement, saving a round trip.
        self._begin_pending = False
        self._begin = _BEGIN
        self._in_transaction = False
        self._committed = False  # by commit_with(): transaction() has nothing left to send

    def _with_begin(self, sql: str) -> str:
        if self._begin_pending:
            self._begin_pending = False
            self._in_transaction = True
            return self._begin + self._transaction_limits + sql
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

    async def commit_with(self, sql: str, params: Params, then: str) -> list[Row]:
        """End the transaction() around this call: `sql` (its last statements, each ending in ';'),
        COMMIT, and `then` (a statement of its own, after the commit) in one round trip; the rows of
        `then`.

        psycopg2 hands back only the last statement's rows, hence `then`. A statement of `sql` that
        fails aborts the transaction before its COMMIT (the server skips the rest of the message),
        and transaction() rolls it back as usual. `then` runs with the transaction limits too."""
        rows = await self.fetch_all(f"{sql}\nCOMMIT;{self._limits}{then}", params)
        self._committed = True
        self._in_transaction = False
        return rows

    @contextlib.asynccontextmanager
    async def transaction(self, *, snapshot: bool = False) -> AsyncIterator[Connection]:
        """BEGIN ... COMMIT, or ROLLBACK if the body raises (including on cancellation).

        BEGIN travels with the body's first statement; a body that sends nothing costs nothing.
        `snapshot`: one read-only REPEATABLE READ snapshot for every statement of the body (set in
        BEGIN itself: the transaction's limits come before the body's first statement, and SET
        TRANSACTION must precede any query).
        (Transaction control is the driver's own SQL, like LISTEN below: not a query of sql/.)"""
        self._begin = _SNAPSHOT_BEGIN if snapshot else _BEGIN
        self._begin_pending = True
        self._committed = False
        try:
            yield self
        except BaseException:
            if self._begin_pending or self._committed:  # nothing was sent, or nothing is left open
                self._begin_pending = False
                raise
            try:
                if not self.closed:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.execute("ROLLBACK"))
            finally:
                self._in_transaction = False
            raise
        if self._begin_pending or self._committed:
            self._begin_pending = False
            return
        try:
            await self.execute("COMMIT")
        finally:
            self._in_transaction = False

    async def stream(self, sql: str, params: Params = None, *, page_size: int = 10_000) -> AsyncIterator[list[Row]]:
        """The rows of one query a page at a time, through a server-side cursor: memory stays flat
        however many rows there are. Inside a transaction (a cursor lives as long as it)."""
        # aiopg's connections are asynchronous psycopg2 ones, which have no named cursors: the
        # cursor is declared in SQL (the driver's own, like BEGIN).
        cursor = self.quote_ident(f"stream_{id(self):x}")
        # `sql` is a query with bound parameters (params), as every other query here.
        await self.execute(f"DECLARE {cursor} NO SCROLL CURSOR FOR {sql}", params)
        try:
            while True:
                rows = await self.fetch_all(f"FETCH FORWARD {int(page_size)} FROM {cursor}")
                if rows:
                    yield rows
                if len(rows) < page_size:
                    return
        finally:
            if not self.closed:
                with contextlib.suppress(Exception):
                    await self.execute(f"CLOSE {cursor}")

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

    A safety net, no longer the fix: aiopg's Connection.__init__ registers the new socket with the
    loop, and with uvloop that raised RuntimeError (the handler is closed) when an earlier failure
    had left a closed watcher on the same descriptor number (see "the connection's socket and the
    event loop" below, which keeps that from happening). The object it was building is only
    reachable from the traceback: close it, which also unregisters its socket."""
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


# -- the connection's socket and the event loop ----------------------------------------------------
#
# aiopg registers a connection's socket with the event loop in three places: Connection.__init__
# (add_reader, right after libpq opened the socket), Connection._ready (the readiness callback:
# add_writer/remove_writer as libpq asks, and on an error a remove_reader only if the descriptor
# is already bad) and Connection._close. In 1.4.0 the last two can leave the loop watching a
# descriptor libpq has closed, or one it has replaced:
#   - libpq may close the socket and open another while connecting (the server or a proxy closed
#     the connection during start-up: it retries without SSL, or the next address); the new one
#     often gets the same number. aiopg keeps watching the old registration;
#   - when a connection fails while libpq also waits to write (start-up), aiopg forgets the
#     descriptor after removing the reader and never removes the writer;
#   - when the socket is still open after a failure, the reader stays (aiopg PR 926).
# asyncio's selector loop shrugs most of this off (or raises, and leaks a connection). uvloop's
# libuv applies its queued epoll changes at the next loop iteration and calls abort() when one
# fails (EBADF: the descriptor was closed; ENOENT: a modification of a descriptor that is now
# another socket): "Fatal Python error: Aborted", the whole process gone (libuv issue 5130,
# uvloop issue 438). And uvloop closes its watcher of a socket that reports an error (a reset)
# after one callback, without unregistering it: the next add_reader/add_writer on that
# descriptor number raises RuntimeError ("the handler is closed").
#
# So the two callbacks are replaced (on the aiopg version they were written against) by ones that
# hold one rule: after every poll() of libpq, in the same callback (before the loop applies its
# queued changes), the loop watches exactly the socket the connection has now, identified by its
# descriptor number and its inode (a reused number is another socket), and nothing else.


class _Socket(NamedTuple):
    fileno: int
    inode: int


def _socket_now(raw: aiopg.Connection) -> _Socket | None:
    """The socket libpq has open for this connection right now, or None.

    Once connected, libpq never replaces its socket (it can only close it), so then the number
    alone tells: no fstat(2) per readiness callback on the hot path."""
    try:
        fileno = raw._conn.fileno()
        if fileno < 0:
            return None
        known: _Socket | None = getattr(raw, "_mb_socket", None)
        if known is not None and known.fileno == fileno and getattr(raw, "_mb_connected", False):
            return known
        return _Socket(fileno, os.fstat(fileno).st_ino)
    except (OSError, psycopg2.Error):
        return None


def _unwatch(raw: aiopg.Connection) -> None:
    """Stop watching the socket registered for `raw`, whatever became of it (closed, replaced, or
    its uvloop watcher closed after an error): the writer first, so that removing the reader does
    not re-arm a watcher for writing on it."""
    fileno = raw._fileno
    if fileno is None:
        return
    loop = raw._loop
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        loop.remove_writer(fileno)
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        loop.remove_reader(fileno)
    raw._fileno = None
    raw._writing = False
    raw._mb_socket = None


def _watch(raw: aiopg.Connection, sock: _Socket, *, writing: bool) -> None:
    """Watch `sock` for reading, and for writing too if `writing`."""
    loop = raw._loop
    if raw._fileno is None:
        try:
            loop.add_reader(sock.fileno, raw._ready, raw._weakref)
        except RuntimeError:
            # uvloop's closed watcher of a socket that failed earlier on this number: drop it, then add.
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                loop.remove_writer(sock.fileno)
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                loop.remove_reader(sock.fileno)
            loop.add_reader(sock.fileno, raw._ready, raw._weakref)
        raw._fileno, raw._mb_socket, raw._writing = sock.fileno, sock, False
    if writing and not raw._writing:
        try:
            loop.add_writer(sock.fileno, raw._ready, raw._weakref)
        except RuntimeError:  # the watcher was closed under us (see above): start both afresh
            _unwatch(raw)
            _watch(raw, sock, writing=True)
            return
        raw._writing = True
    elif not writing and raw._writing:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            loop.remove_writer(sock.fileno)
        raw._writing = False


def _rewatch(raw: aiopg.Connection, *, writing: bool) -> None:
    """Make the loop watch the socket `raw` has now (see the rule above)."""
    registered: _Socket | None = getattr(raw, "_mb_socket", None)
    now = _socket_now(raw)
    if raw._fileno is not None and registered != now:
        _unwatch(raw)  # closed or replaced: the number may be another socket's already
    if now is not None and not raw._conn.closed:
        _watch(raw, now, writing=writing)


def _on_socket_ready(weak_self: weakref.ref[aiopg.Connection]) -> None:
    """The connection's readiness callback (aiopg's Connection._ready, rewritten to keep the rule
    above): move libpq on, pass notifications on, settle the waiting statement."""
    raw = weak_self()
    if raw is None:
        return
    waiter = raw._waiter
    try:
        state = raw._conn.poll()
        while raw._conn.notifies:
            raw._notifies.put_nowait(raw._conn.notifies.pop(0))
    except (psycopg2.Warning, psycopg2.Error) as exc:
        _rewatch(raw, writing=False)  # a failed statement leaves the socket; a broken connection does not
        raw._notifies_proxy.close(exc)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        return
    if state not in (psycopg2.extensions.POLL_OK, psycopg2.extensions.POLL_READ, psycopg2.extensions.POLL_WRITE):
        raw._fatal_error(f"Fatal error on aiopg connection: unexpected answer {state} from poll()")
        return
    _rewatch(raw, writing=state == psycopg2.extensions.POLL_WRITE)
    if state == psycopg2.extensions.POLL_OK:
        raw._mb_connected = True  # the first POLL_OK ends the start-up
    if raw._fileno is None:
        if waiter is not None and not waiter.done():
            waiter.set_exception(psycopg2.OperationalError("Connection closed"))
        return
    if state == psycopg2.extensions.POLL_OK:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
    elif _waits_on_failed_socket(raw):
        raw._loop.call_soon(_read_the_failure, weak_self)


def _read_the_failure(weak_self: weakref.ref[aiopg.Connection]) -> None:
    """Read again, once uvloop is done with it, a socket that failed while a statement waits.

    When the server resets a connection (it was terminated, or stopped, while our statement was on
    the way), uvloop runs the readiness callback once more and then closes its watcher of the
    socket. If that one read got only the server's FATAL message and not the end of the stream,
    libpq still waits for more, and no callback comes again: the statement would wait out the
    query timeout instead of failing at once. Reading again lets libpq see the reset (the
    statement fails now and the socket is unwatched); each read moves libpq on, and it needs at
    most the error and the end."""
    for _ in range(3):
        raw = weak_self()
        if raw is None or not _waits_on_failed_socket(raw):
            return
        _on_socket_ready(weak_self)


def _waits_on_failed_socket(raw: aiopg.Connection) -> bool:
    """A statement waits for its answer on a socket that reports an error."""
    waiter, fileno = raw._waiter, raw._fileno
    if waiter is None or waiter.done() or raw._writing or fileno is None:
        return False
    try:
        events = _socket_events(fileno)
    except (OSError, ValueError):
        return False
    return bool(events & select.POLLERR and not events & select.POLLNVAL)


def _close_raw(raw: aiopg.Connection) -> None:
    """aiopg's Connection._close, keeping the rule above: unwatch the socket (whatever became of
    it) before libpq closes it, then fail whoever waits on the connection."""
    _unwatch(raw)
    raw._conn.close()
    if raw._loop.is_closed():
        return
    waiter = raw._waiter
    if waiter is not None and not waiter.done():
        waiter.set_exception(psycopg2.OperationalError("Connection closed"))
        waiter.exception()  # retrieved: nobody may be left to await it
    raw._notifies_proxy.close(psycopg2.OperationalError("Connection closed"))


_aiopg_init = aiopg.Connection.__init__


def _init_watched(raw: aiopg.Connection, *args: Any, **kwargs: Any) -> None:
    """aiopg's Connection.__init__ (libpq opens the socket, aiopg watches it), and a note of which
    socket that was, before any poll() can replace it."""
    _aiopg_init(raw, *args, **kwargs)
    raw._mb_socket = _socket_now(raw)


if _AIOPG_1_4:
    aiopg.Connection.__init__ = _init_watched
    aiopg.Connection._ready = staticmethod(_on_socket_ready)
    aiopg.Connection._close = _close_raw


def _close_quietly(raw: aiopg.Connection) -> None:
    with contextlib.suppress(Exception):
        raw.close()
    # aiopg fails the connection's internal future when it closes; nobody will read it.
    waiter = getattr(raw, "_waiter", None)
    if waiter is not None and waiter.done() and not waiter.cancelled():
        waiter.exception()


def _aiopg_kwargs(options: ConnectionOptions) -> dict[str, Any]:
    # No hstore: aiopg would look its type up with one more round trip on every new connection,
    # a step during which a failure left the connection unclosed (aiopg closes it only when the
    # connecting itself fails). Nothing here uses hstore.
    return {"enable_hstore": False, **options.driver_kwargs()}


async def _open_raw(options: ConnectionOptions) -> aiopg.Connection:
    # A second attempt only after the event loop's own failure (see _release_half_built): releasing
    # the half-built connection clears the stale registration, and nothing was sent yet.
    for attempt in (1, 2):
        try:
            with translated_errors():
                return await aiopg.connect(options.dsn, timeout=options.connect_timeout, **_aiopg_kwargs(options))
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
        self._lent: set[aiopg.Connection] = set()
        # When the path to the database was last shown silent (loop time): a connection idle since
        # before then is on that path, and is closed instead of lent (see abandon_stalled).
        self._silent_at = -math.inf

    @classmethod
    async def open(cls, options: ConnectionOptions, *, min_size: int, max_size: int, acquire_timeout: float) -> Pool:
        # aiopg.create_pool's own pool, built and filled here: when one of its first connections
        # fails, create_pool drops the pool with the others open (collected later with a
        # ResourceWarning and "Future exception was never retrieved"; seen when a process started
        # while PostgreSQL came up). Here the pool is closed then.
        raw = aiopg.Pool(
            options.dsn,
            min_size,
            max_size,
            # aiopg uses this for connecting (and as the default query limit, which our Connection
            # overrides with query_timeout). The pool connects while holding its lock, so a
            # connect that hangs (a half-open path) must give up soon.
            options.connect_timeout,
            enable_json=True,
            enable_uuid=True,
            echo=False,
            on_connect=None,
            # A connection idle this long is replaced, so one that died quietly is not kept.
            pool_recycle=300,
            **_aiopg_kwargs(options),
        )
        try:
            with translated_errors():
                if min_size:  # the first acquire connects min_size connections, as create_pool would
                    await raw.release(await raw.acquire())
        except BaseException as exc:
            raw.close()
            await raw.wait_closed()
            if isinstance(exc, (RuntimeError, AssertionError)):
                _release_half_built(exc)
                raise DatabaseUnavailable(f"connecting failed: {_message(exc)}") from None
            raise
        return cls(raw, acquire_timeout, options.query_timeout, options.transaction_limits())

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        try:
            async with asyncio.timeout(self._acquire_timeout):
                raw = await self._acquire_live()
        except TimeoutError:
            raise DatabaseUnavailable("no database connection came free in time") from None
        conn = Connection(raw, self._query_timeout, self._limits)
        self._lent.add(raw)
        try:
            yield conn
        finally:
            self._lent.discard(raw)
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
            # Died in the free list, noticed or not; or idle there since the path went silent.
            if raw.closed or raw.last_usage < self._silent_at or _has_input(raw):
                raw.close()
                await self._raw.release(raw)
                continue
            return raw

    def abandon_stalled(self, older_than: float) -> int:
        """For when the path to the database has been shown silent (the listener's connection
        stopped answering): close every lent connection whose statement has been out for longer
        than `older_than` seconds (returns how many), and every idle one when it is next taken.

        Bytes swallowed on a half-open path close nothing, so those statements would wait out the
        query timeout (STATEMENT_TIMEOUT_MS + 5 s) while holding the pool's room, and an idle
        connection on the same path would take the next statement there. Closed, the statements
        fail now (DatabaseUnavailable, as on any lost connection: their callers retry or answer
        503), and new connections take their place. Never call this because the pool is busy: a
        statement blocked on a lock looks just the same from here."""
        now = asyncio.get_running_loop().time()
        self._silent_at = now
        # aiopg stamps last_usage (loop time) when a cursor is made, which Connection does for
        # every statement: with the statement still executing, that is when it was sent.
        stalled = [
            raw for raw in self._lent if not raw.closed and raw.raw.isexecuting() and now - raw.last_usage > older_than
        ]
        for raw in stalled:
            raw.close()
        return len(stalled)

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


# Off for this session only; skipped where the server has no such setting (before 14).
_NO_IDLE_SESSION_TIMEOUT = (
    "SELECT set_config('idle_session_timeout', '0', false) "
    "WHERE current_setting('idle_session_timeout', true) IS NOT NULL"
)


class ListenConnection(Connection):
    """A connection of its own that LISTENs. It is kept outside the pool: pool.wait_closed()
    would wait for it forever, and it must never be lent to a request."""

    @classmethod
    async def open(cls, options: ConnectionOptions, channels: list[str]) -> ListenConnection:
        conn = cls(await _open_raw(options), options.query_timeout, options.transaction_limits())
        try:
            # A LISTEN connection waits, idle, for notifications: a role's or database's
            # idle_session_timeout (PostgreSQL 14+) ended it every few seconds of quiet, and with it
            # /ready. Session state, like the LISTEN itself (a direct or session-pooled endpoint).
            await conn.execute(_NO_IDLE_SESSION_TIMEOUT)
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
