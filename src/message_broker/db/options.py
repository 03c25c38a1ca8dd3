"""How the service reaches PostgreSQL: connection options and DSN handling (no I/O here but
reading the named queries)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions

from ..config import Settings
from .queries import query


@dataclass(frozen=True)
class ConnectionOptions:
    dsn: str
    connect_timeout: float = 5.0
    # Server-side limits: aiopg cancels a query by closing its connection, which does not stop the
    # query on the server; these make PostgreSQL itself give up and release the locks.
    statement_timeout_ms: int = 10_000
    idle_in_transaction_timeout_ms: int = 15_000
    application_name: str = "message_broker"
    # Whether every transaction sets the limits above for itself (see transaction_limits). Off
    # only for statements that cannot run inside a transaction block (CREATE DATABASE, VACUUM).
    per_transaction_limits: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionOptions:
        if not settings.database_url:
            raise ValueError("settings.database_url must be resolved (DATABASE_URL or the embedded server) first")
        return cls(
            dsn=settings.database_url,
            connect_timeout=settings.connect_timeout,
            statement_timeout_ms=settings.statement_timeout_ms,
            idle_in_transaction_timeout_ms=settings.idle_in_transaction_timeout_ms,
        )

    @classmethod
    def for_listener(cls, settings: Settings) -> ConnectionOptions:
        """The LISTEN connection's: LISTEN_DATABASE_URL (a direct or session-pooled endpoint: a
        LISTEN through a transaction pooler hears nothing), else the pool's DATABASE_URL."""
        pool = cls.from_settings(settings)
        return pool.with_changes(dsn=settings.listen_database_url or pool.dsn)

    @property
    def query_timeout(self) -> float:
        # The client-side limit on one query; the server's statement_timeout fires first, so this
        # only ends queries whose connection has gone silent. No server limit (0, for migrations and
        # bulk loads) means no client limit either, short of a day.
        if self.statement_timeout_ms <= 0:
            return 86_400.0
        return self.statement_timeout_ms / 1000 + 5

    def with_changes(self, **changes: Any) -> ConnectionOptions:
        return dataclasses.replace(self, **changes)

    def driver_kwargs(self) -> dict[str, Any]:
        """libpq connection parameters on top of the DSN: no session state (no startup `options`),
        so that the same connection works through PgBouncer in transaction pooling, which refuses
        startup parameters it does not know and hands a server connection to another client after
        every transaction. The limits travel with each transaction instead (transaction_limits).
        TCP keepalives let the kernel notice a dead peer even while we only wait for NOTIFYs
        (ignored on Unix sockets).

        client_encoding: the service sends and reads text as UTF-8, whatever the role or database
        sets (a role's LATIN1 or SQL_ASCII made every non-Latin-1 username a 500). A startup
        parameter PgBouncer knows and keeps per client, like application_name."""
        return {
            "application_name": self.application_name,
            "client_encoding": "UTF8",
            "connect_timeout": max(1, int(self.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        }

    def transaction_limits(self) -> str:
        """The statement that sets this connection's limits for one transaction (set_config with
        is_local: gone at COMMIT or ROLLBACK, like SET LOCAL), ending in ';', or '' when off.

        The driver sends it at the start of every transaction, in the same round trip as the first
        statement, so a pooler may hand each transaction to any server connection. Rendered once:
        its values are our own integers (the UTC time zone is in the query), so it needs no bound
        parameters and can precede a statement that has none.

        lock_timeout is none whatever the role or database sets: the service waits for row locks by
        design (an apply's users, a read of an instant behind an apply; the NOTIFY queue's lock at
        COMMIT), bounded by statement_timeout, and a small one made posts under contention 503s.
        (No comment of that in the query: its text travels with every transaction, and
        pg_stat_activity shows only the first 1 kB of a message.)"""
        if not self.per_transaction_limits:
            return ""
        values = {
            "statement_timeout": str(int(self.statement_timeout_ms)),
            "idle_in_transaction_session_timeout": str(int(self.idle_in_transaction_timeout_ms)),
        }
        sql = query("transaction_limits").rstrip(";")
        return sql % {name: f"'{value}'" for name, value in values.items()} + ";"


def dsn_parameters(dsn: str) -> dict[str, str]:
    """A DSN (URI or key=value) as libpq reads it."""
    return dict(psycopg2.extensions.parse_dsn(dsn))


def dsn_is_readable(dsn: str) -> bool:
    """Whether libpq can read `dsn` at all (a URI or key=value pairs)."""
    try:
        dsn_parameters(dsn)
    except psycopg2.ProgrammingError:
        return False
    return True


def dsn_database(dsn: str) -> str:
    """The database name a DSN points at."""
    return dsn_parameters(dsn).get("dbname") or ""


def dsn_with_database(dsn: str, dbname: str) -> str:
    """The same DSN pointed at another database (used to reach the maintenance database)."""
    return str(psycopg2.extensions.make_dsn(dsn, dbname=dbname))


def dsn_hosts(dsn: str) -> list[str]:
    """The hosts a DSN names (a libpq multi-host DSN names several)."""
    return [host for host in dsn_parameters(dsn).get("host", "").split(",") if host]
