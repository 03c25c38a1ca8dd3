"""Shared fixtures. Every test that needs a database gets a fresh one, cloned from a migrated
template on a real PostgreSQL: TEST_DATABASE_URL if set, else an embedded server."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import psycopg2.extensions
import pytest
from aiohttp.test_utils import TestClient

from message_broker.config import Settings
from message_broker.db.options import dsn_with_database
from message_broker.http.app import create_app

from . import pg
from .pgbouncer import bouncer
from .servers import ServerProcess

# make test-pgbouncer: the service's pool goes through a PgBouncer in transaction pooling.
THROUGH_PGBOUNCER = bool(os.environ.get("TEST_PGBOUNCER"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("pgbouncer") and not bouncer.installed():
            item.add_marker(pytest.mark.skip(reason=f"{bouncer.BINARY} is not installed (make pgbouncer-install)"))
        direct = item.get_closest_marker("direct_only")
        if direct and THROUGH_PGBOUNCER:
            item.add_marker(pytest.mark.skip(reason=f"direct connection by design: {direct.args[0]}"))


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pg.server_dsn(tmp_path_factory.mktemp("pg")) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def pgbouncer(pg_admin_dsn: str) -> Iterator[bouncer.PgBouncer]:
    """A PgBouncer of the tests' own, in transaction pooling, in front of the test server."""
    if not bouncer.installed():
        pytest.skip(f"{bouncer.BINARY} is not installed (make pgbouncer-install)")
    with bouncer.running(pg_admin_dsn, pg.free_port()) as running:
        yield running


PoolUrl = Callable[[str], str]


@pytest.fixture(scope="session")
def pool_url(request: pytest.FixtureRequest) -> PoolUrl:
    """A test database's DSN -> the one the service's pool uses: through the session's PgBouncer
    under make test-pgbouncer (TEST_PGBOUNCER), else the same. The LISTEN connection, the tests' own
    SQL and their checks stay direct."""
    if not THROUGH_PGBOUNCER:
        return lambda dsn: dsn
    return request.getfixturevalue("pgbouncer").routed  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> Iterator[str]:
    name = pg.create_template(pg_admin_dsn)
    yield name
    pg.drop(pg_admin_dsn, name)


@pytest.fixture(scope="session")
def owned_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pg.OwnedPostgres]:
    """An embedded PostgreSQL of the tests' own (never the shared one, even with TEST_DATABASE_URL),
    for tests that stop it, restart it or put a proxy in front of it. Whoever stops it starts it
    again before it ends."""
    server = pg.OwnedPostgres(tmp_path_factory.mktemp("owned-pg"))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def database_url(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    name = pg.clone(pg_admin_dsn, template_db)
    yield dsn_with_database(pg_admin_dsn, name)
    pg.drop(pg_admin_dsn, name)


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg2.extensions.cursor]:
    """An autocommit cursor on the test's database, as a person with psql would have."""
    conn = pg.admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        yield cur


@pytest.fixture
def settings(database_url: str, pool_url: PoolUrl) -> Settings:
    # Short timers so tests about sweeps and reconnects finish quickly; the logic is the same.
    return Settings(
        database_url=pool_url(database_url),
        listen_database_url=database_url,
        sweep_interval=2.0,
        probe_interval=0.5,
        probe_timeout=1.0,
        reconnect_max_backoff=0.5,
        user_idle_timeout=0.5,
        pool_min_size=1,
        pool_max_size=8,
        worker_concurrency=4,
        # A sender process per app would cost every test its start-up; the webhook tests and
        # the real server processes run it (tests/integration/test_webhooks.py, test_sender_process.py).
        webhook_sender="inline",
    )


MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(settings: Settings, aiohttp_client) -> MakeClient:  # type: ignore[no-untyped-def]
    """Start the app (with optional settings overrides) behind a real HTTP test server.

    Requesting `settings` (and so the database) before `aiohttp_client` makes pytest stop the
    servers before it drops the database."""

    async def make(**overrides: object) -> TestClient:
        return await aiohttp_client(create_app(dataclasses.replace(settings, **overrides)))  # type: ignore[arg-type]

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> AsyncIterator[TestClient]:
    yield await make_client()


StartServer = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
def start_server(database_url: str, pool_url: PoolUrl, tmp_path) -> Iterator[StartServer]:  # type: ignore[no-untyped-def]
    """Start the real server (`python -m message_broker serve`) as a subprocess on the test's
    database, with extra environment settings; every one started is stopped (SIGTERM) at the end."""
    servers: list[ServerProcess] = []

    async def start(**env: str) -> ServerProcess:
        env = {"LISTEN_DATABASE_URL": database_url, **env}
        server = ServerProcess(pool_url(database_url), tmp_path / f"server-{len(servers)}.log", **env)
        servers.append(server)
        return await server.start()

    yield start
    for server in servers:
        server.stop()
