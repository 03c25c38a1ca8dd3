"""The one module that touches aiopg/psycopg2: connections, transactions and error translation.

Everything above this speaks in plain rows (dicts) and the errors of `db.errors`, so the driver
could be swapped by rewriting this file alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .errors import DatabaseError, DatabaseUnavailable, ForeignKeyViolation, QueryTimeout, UniqueViolation

log = logging.getLogger(__name__)

Row = dict[str, Any]
Params = Mapping[str, Any] | None


@dataclass(frozen=True)
class ConnectionOptions:
    dsn: str
    connect_timeout: float = 5.0
    statement_timeout_ms: int = 10_000
    idle_in_transaction_timeout_ms: int = 15_000
    application_name: str = "message_broker"

    @property
    def query_timeout(self) -> float:
        # The client-side limit on one query; the server's statement_timeout fires first, so this
        # only ends queries whose connection has gone silent. No server limit (0, for migrations and
        # bulk loads) means no client limit either, short of a day.
        if self.statement_timeout_ms <= 0:
            return 86_400.0
        return self.statement_timeout_ms / 1000 + 5

    def session_setup_sql(self) -> str:
        # UTC so timestamps read the same from every connection and in NOTIFY payloads.
        return (
            f"SET statement_timeout = {int(self.statement_timeout_ms)};"
            f"SET idle_in_transaction_session_timeout = {int(self.idle_in_transaction_timeout_ms)};"
            "SET TIME ZONE 'UTC';"
        )

    def driver_kwargs(self) -> dict[str, Any]:
        # TCP keepalives let the kernel notice a dead peer even while we only wait for NOTIFYs;
        # they are ignored on Unix sockets.
        return {
            "application_name": self.application_name,
            "connect_timeout": max(1, int(self.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        }


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise driver and network errors as the project's own (see db.errors)."""
    try:
        yield
    except psycopg2.errors.UniqueViolation as exc:
        raise UniqueViolation(exc.diag.constraint_name) from exc
    except psycopg2.errors.ForeignKeyViolation as exc:
        raise ForeignKeyViolation(exc.diag.constraint_name) from exc
    except psycopg2.errors.QueryCanceled as exc:
        raise QueryTimeout(str(exc).strip()) from exc
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc
    except psycopg2.errors.AdminShutdown as exc:
        raise DatabaseUnavailable(str(exc).strip()) from exc
    except psycopg2.Error as exc:
        raise DatabaseError(str(exc).strip()) from exc
    except TimeoutError as exc:
        raise QueryTimeout("timed out waiting for the database") from exc
    except OSError as exc:
        raise DatabaseUnavailable(str(exc)) from exc


def array_literal(values: list[Any]) -> str | None:
    """`values` as the text of a PostgreSQL array ('{1,2,NULL}', '{"a","b"}'), or None when they
    are not all ints, or all strings and NULLs.

    psycopg2 adapts a list element by element (quoting each through libpq): for the thousands of
    values of one batch statement that was the single largest CPU cost of applying a backlog. One
    string of the whole array costs a fraction of that; the SQL casts it (%(ids)s::bigint[]),
    which every list parameter here does anyway."""
    if all(type(v) is int for v in values):  # not bool, an int subclass: bigint[] rejects it
        return "{" + ",".join(map(str, values)) + "}"
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
    """A connection lent out by the pool (or the listener's own): run SQL, get dict rows.

    A list parameter travels as one array literal (see array_literal): cast it in the SQL."""

    def __init__(self, raw: aiopg.Connection, query_timeout: float | None = None) -> None:
        self._raw = raw
        self._query_timeout = query_timeout  # None: the connection's own (its connect timeout)
        # Set by transaction(): BEGIN is sent with the first statement, saving a round trip.
        self._begin_pending = False

    def _with_begin(self, sql: str) -> str:
        if self._begin_pending:
            self._begin_pending = False
            return "BEGIN;" + sql
        return sql

    async def fetch_all(self, sql: str, params: Params = None) -> list[Row]:
        """Rows of the (last) statement. Several statements separated by ';' go in one round
        trip; in READ COMMITTED each still takes its own snapshot."""
        with translated_errors():
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
        with translated_errors():
            async with self._raw.cursor(timeout=self._query_timeout) as cur:
                await cur.execute(self._with_begin(sql), _adapted(params))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """BEGIN ... COMMIT, or ROLLBACK if the body raises (including on cancellation).

        BEGIN travels with the body's first statement; a body that sends nothing costs nothing."""
        self._begin_pending = True
        try:
            yield self
        except BaseException:
            if self._begin_pending:  # nothing was sent
                self._begin_pending = False
                raise
            if not self._raw.closed:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.execute("ROLLBACK"))
            raise
        if self._begin_pending:
            self._begin_pending = False
            return
        await self.execute("COMMIT")

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def close(self) -> None:
        if not self._raw.closed:
            self._raw.close()

    async def backend_pid(self) -> int:
        return int(await self._raw.get_backend_pid())


class Pool:
    """The shared connection pool; `acquire()` gives up after `acquire_timeout` with DatabaseUnavailable."""

    def __init__(self, raw: aiopg.Pool, acquire_timeout: float, query_timeout: float) -> None:
        self._raw = raw
        self._acquire_timeout = acquire_timeout
        self._query_timeout = query_timeout
        self._wakeups: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, options: ConnectionOptions, *, min_size: int, max_size: int, acquire_timeout: float) -> Pool:
        setup = options.session_setup_sql()

        async def on_connect(conn: aiopg.Connection) -> None:
            async with conn.cursor() as cur:
                await cur.execute(setup)

        with translated_errors():
            raw = await aiopg.create_pool(
                options.dsn,
                minsize=min_size,
                maxsize=max_size,
                # aiopg uses this for connecting (and as the default query limit, which our
                # Connection overrides with query_timeout). The pool connects while holding its
                # lock, so a connect that hangs (a half-open path) must give up soon: with the
                # query limit here the fault suite saw every acquire blocked for 15 s.
                timeout=options.connect_timeout,
                on_connect=on_connect,
                # A connection idle this long is replaced, so one that died quietly is not kept.
                pool_recycle=300,
                **options.driver_kwargs(),
            )
        return cls(raw, acquire_timeout, options.query_timeout)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        try:
            async with asyncio.timeout(self._acquire_timeout):
                with translated_errors():
                    raw = await self._raw.acquire()
        except TimeoutError:
            raise DatabaseUnavailable("no database connection came free in time") from None
        except RuntimeError as exc:  # aiopg: "Cannot acquire connection after closing pool"
            raise DatabaseUnavailable(str(exc)) from exc
        try:
            yield Connection(raw, self._query_timeout)
        finally:
            if not raw.closed and raw.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                # Never hand a connection in an unknown transaction state to the next caller.
                raw.close()
            await self._raw.release(raw)
            if raw.closed:
                self._wake_a_waiter()

    def _wake_a_waiter(self) -> None:
        """aiopg 1.4 wakes a caller waiting for a connection only when an open one comes back. When
        a closed one does (the server restarted, a query timed out), the waiters sleep on until
        POOL_ACQUIRE_TIMEOUT although there is now room for a new connection: the fault suite saw
        3 s 503s while PostgreSQL restarted. Wake one as aiopg's own release does, in a task so this
        caller never waits for the pool's lock (held for as long as a slow connect takes)."""
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


async def connect(options: ConnectionOptions) -> Connection:
    """A single connection outside the pool (the LISTEN connection, migrations)."""
    with translated_errors():
        raw = await aiopg.connect(options.dsn, timeout=options.connect_timeout, **options.driver_kwargs())
    conn = Connection(raw, options.query_timeout)
    try:
        await conn.execute(options.session_setup_sql())
    except BaseException:
        raw.close()
        raise
    return conn


class Notification(NamedTuple):
    """One NOTIFY as received (a named tuple: two are built per task under load)."""

    channel: str
    payload: str
    pid: int


class ListenConnection:
    """A dedicated connection that LISTENs. It is kept outside the pool: pool.wait_closed()
    would wait for it forever, and it must never be lent to a request."""

    def __init__(self, conn: Connection, raw: aiopg.Connection) -> None:
        self.conn = conn
        self._raw = raw

    @classmethod
    async def open(cls, options: ConnectionOptions, channels: list[str]) -> ListenConnection:
        conn = await connect(options)
        listener = cls(conn, conn._raw)
        try:
            for channel in channels:
                # Channel names come from our code, never from input; quote_ident all the same.
                await conn.execute(f"LISTEN {psycopg2.extensions.quote_ident(channel, listener._raw.raw)}")
        except BaseException:
            listener.close()
            raise
        return listener

    async def next_notification(self, timeout: float) -> Notification | None:
        """The next notification, or None if none came within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                with translated_errors():
                    raw = await self._raw.notifies.get()
        except TimeoutError:
            return None
        except DatabaseError:
            raise
        return Notification(raw.channel, raw.payload, raw.pid)

    def pending_notifications(self) -> list[Notification]:
        """Notifications already received, without waiting."""
        found = []
        while not self._raw.notifies.empty():
            raw = self._raw.notifies.get_nowait()
            found.append(Notification(raw.channel, raw.payload, raw.pid))
        return found

    async def probe(self, timeout: float) -> None:
        """Prove the connection is alive with a round trip, or raise DatabaseUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                await self.conn.execute("SELECT 1")
        except TimeoutError:
            raise DatabaseUnavailable("LISTEN connection did not answer the probe in time") from None

    def close(self) -> None:
        if not self._raw.closed:
            self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)


def dsn_database(dsn: str) -> str:
    """The database name a DSN (URI or key=value) points at."""
    return str(psycopg2.extensions.parse_dsn(dsn).get("dbname") or "")


def dsn_with_database(dsn: str, dbname: str) -> str:
    """The same DSN pointed at another database (used to reach the maintenance database)."""
    return str(psycopg2.extensions.make_dsn(dsn, dbname=dbname))


def quote_ident(name: str, conn: Connection) -> str:
    return str(psycopg2.extensions.quote_ident(name, conn._raw.raw))
