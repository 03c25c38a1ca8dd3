"""The service against a real PgBouncer in transaction pooling: what breaks there (a LISTEN through it,
session state left on a server connection, a session lock) and how the service avoids it or says so."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from message_broker.db.driver import Pool
from message_broker.db.migrate import available_migrations, migrate
from message_broker.db.options import ConnectionOptions
from message_broker.http import keys

from .. import pg
from ..conftest import MakeClient
from ..helpers import create_user, eventually, post_task, wait_processed
from ..integration.test_startup import _lines, _serve
from . import bouncer

pytestmark = pytest.mark.pgbouncer


async def test_a_listen_through_a_transaction_pooler_is_caught(
    make_client: MakeClient,
    database_url: str,
    pgbouncer: bouncer.PgBouncer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """LISTEN_DATABASE_URL pointed at PgBouncer: the LISTEN is accepted and hears nothing. The
    service says so (an ERROR naming the fix), /ready names the listener, and it keeps trying."""
    caplog.set_level(logging.INFO, logger="message_broker")
    client = await make_client(listen_database_url=pgbouncer.routed(database_url))
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.deaf_connects >= 2, timeout=30, what="two deaf connects")
    assert not listener.connected
    response = await client.get("/ready")
    body = await response.json()
    assert response.status == 503 and body["checks"]["listener"] is False, body
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "no ERROR for a deaf listener"
    assert all("LISTEN_DATABASE_URL" in e and "direct" in e and "session" in e for e in errors), errors
    # Work is still done (the safety sweep finds it), only without wake-ups.
    user = await create_user(client, "deaf", 0)
    task = await post_task(client, user["id"], "replenishment", 7)
    assert (await wait_processed(client, task["id"], timeout=20))["balance_after"] == 7


async def test_the_pool_leaves_no_session_state_on_a_shared_server_connection(
    database_url: str, pg_admin_dsn: str
) -> None:
    """With one server connection behind PgBouncer, the service's transactions and a plain client
    take turns on the same PostgreSQL session: the client sees none of the service's settings.
    (Startup options, as the service used to send, make PgBouncer refuse the connection.)"""
    with bouncer.running(pg_admin_dsn, pg.free_port(), pool_size=1) as single:
        pool = await Pool.open(
            ConnectionOptions(single.routed(database_url), statement_timeout_ms=4_321),
            min_size=1,
            max_size=2,
            acquire_timeout=5,
        )
        try:
            async with pool.acquire() as conn:
                pids = {(await conn.fetch_one("SELECT pg_backend_pid() AS pid"))["pid"]}  # type: ignore[index]
                async with conn.transaction():
                    row = await conn.fetch_one("SELECT current_setting('statement_timeout') AS value")
                    assert row == {"value": "4321ms"}
        finally:
            await pool.close()
        plain = psycopg2.connect(single.routed(database_url))
        plain.autocommit = True
        with contextlib.closing(plain), plain.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('statement_timeout')")
            pid, timeout = cur.fetchone()
        assert pid in pids, "not the same server connection: the check would prove nothing"
        assert timeout == "0"
        with pytest.raises(psycopg2.OperationalError, match="unsupported startup parameter"):
            psycopg2.connect(single.routed(database_url), options="-c statement_timeout=1000").close()


async def test_concurrent_migrations_through_pgbouncer(pg_admin_dsn: str, pgbouncer: bouncer.PgBouncer) -> None:
    """The migrations' lock is a transaction's: a session lock through a transaction pooler would be
    taken on one server connection and released (or not) on another."""
    name = f"mb_bouncer_{uuid.uuid4().hex[:8]}"
    with pg.fresh_database(pg_admin_dsn, name) as direct:
        options = ConnectionOptions(pgbouncer.routed(direct))
        results = await asyncio.gather(*(migrate(options) for _ in range(4)))
        assert sorted(m.version for run in results for m in run) == [m.version for m in available_migrations()]
        assert await migrate(options) == []


def test_statement_pooling_is_refused_at_start_up_in_one_line(pg_admin_dsn: str) -> None:
    """PgBouncer in statement pooling refuses every transaction of more than one statement (the
    migrations, an Idempotency-Key's, a hold's apply). Start-up took its refusal for a database not
    there yet: on a new database, `startup waiting_for_database` for STARTUP_TIMEOUT (60 s) with
    PgBouncer's words, then exit 1, again and again under a supervisor; on a migrated one, exit 1
    with PgBouncer's words and libpq's "the server terminated abnormally". It is a setting to
    change, and start-up says which, at once."""
    name = f"mb_bouncer_{uuid.uuid4().hex[:8]}"
    with (
        pg.fresh_database(pg_admin_dsn, name) as direct,
        bouncer.running(pg_admin_dsn, pg.free_port(), pool_mode="statement") as statement_pooled,
    ):
        for _ in range(2):  # a new database, then one migrated (directly, in between)
            started = time.monotonic()
            url = statement_pooled.routed(direct)
            code, output = _serve({"PORT": str(pg.free_port()), "DATABASE_URL": url, "STARTUP_TIMEOUT": "30"})
            took = time.monotonic() - started
            assert code == 1, output
            [error] = _lines(output, "ERROR")
            assert "statement pooling" in error and "pool_mode = transaction" in error, output
            assert "terminated abnormally" not in error, output
            assert not _lines(output, "WARNING"), output
            assert took < 15, f"{took:.1f} s: waited as for a database not there yet\n{output}"
            assert "Traceback" not in output and "serving on" not in output, output
            asyncio.run(migrate(ConnectionOptions(direct)))


def _bouncer_command(command: str, env: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    """`python -m tests.pgbouncer.bouncer up|down` (make pgbouncer-up / -down): its exit code, its
    output, and the NAME=value lines it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.pgbouncer.bouncer", command],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = done.stdout.splitlines()
    printed = dict(line.split("=", 1) for line in lines if line.startswith(("DATABASE_URL=", "LISTEN_DATABASE_URL=")))
    return done.returncode, done.stdout + done.stderr, printed


def test_pgbouncer_up_again_with_its_own_lines_exported(database_url: str) -> None:
    """The README: run `make pgbouncer-up`, export the two lines it printed, `make run`. Run in that
    shell again, `up` took the exported DATABASE_URL, PgBouncer's own address, for the database: it
    printed LISTEN_DATABASE_URL=<PgBouncer> (a LISTEN through the transaction pooler, deaf) and
    recorded PgBouncer as its own upstream (after a `down`, the next `up` would have put it in front
    of itself). It now answers with the database its state names, and without a state refuses."""
    port = str(pg.free_port())
    # Not under pytest's directory: PgBouncer runs as the server's user, who must reach its files.
    directory = Path(tempfile.mkdtemp(prefix="mb-pgbouncer-"))
    env = {"PGBOUNCER_DIR": str(directory), "PGBOUNCER_PORT": port, "DATABASE_URL": database_url}
    own_address = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        code, output, _ = _bouncer_command("up", {**env, "DATABASE_URL": own_address})
        assert code == 1 and "own address" in output, output
        assert not (directory / "pgbouncer.pid").exists(), output
        code, output, first = _bouncer_command("up", env)
        assert code == 0 and first["LISTEN_DATABASE_URL"] == database_url, output
        assert f":{port}/" in first["DATABASE_URL"], output
        code, output, again = _bouncer_command("up", {**env, **first})  # the lines exported
        assert code == 0 and "already runs" in output, output
        assert again == first, output
        code, output, _ = _bouncer_command("down", env)
        assert code == 0 and "stopped" in output, output
    finally:
        _bouncer_command("down", env)
        shutil.rmtree(directory, ignore_errors=True)
