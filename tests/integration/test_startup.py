"""Start-up and stop of the real server process (`python -m message_broker serve`): its port is
checked before anything else, the database is waited for (with /health answering meanwhile) up to
STARTUP_TIMEOUT, and SIGTERM/SIGINT are counted: the first stops, a second does not break the
stop, a third exits at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2.extensions
import pytest

from message_broker.db.driver import Pool
from message_broker.db.errors import DatabaseUnavailable
from message_broker.db.options import ConnectionOptions, dsn_with_database
from message_broker.server import StopSignals

from ..helpers import call, create_user, eventually
from ..pg import OwnedPostgres, admin_connection, drop, free_port
from ..servers import ServerProcess
from .test_driver import LOOPS, LoopFactory, run_clean

# A log line: "2026-12-04 21:34:46,566 ERROR message_broker: ..."
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


def _serve(env: dict[str, str], timeout: float = 60, command: str = "serve") -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "message_broker", command],
        env={**os.environ, "HOST": "127.0.0.1", "LOG_LEVEL": "INFO", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stdout


def _lines(output: str, level: str) -> list[str]:
    return [line for line in output.splitlines() if (found := LINE.match(line)) and found[2] == level]


def _when(line: str) -> float:
    found = LINE.match(line)
    assert found, line
    return datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _nowhere(transport: str, tmp_path: Path) -> tuple[str, str]:
    """A DATABASE_URL where nothing listens, and how the service names that place."""
    port = free_port()
    if transport == "tcp":
        return f"postgresql://nobody@127.0.0.1:{port}/mb", f"127.0.0.1:{port}"
    return f"postgresql://nobody@/mb?host={tmp_path}&port={port}", f"the Unix socket in {tmp_path} (port {port})"


def test_a_port_in_use_is_one_line_naming_the_port_and_exit_1(tmp_path: Path) -> None:
    """Checked first: with STARTUP_TIMEOUT=0 (wait for ever) and no database anywhere, a server
    that looked for its database before its port would never end."""
    url, _ = _nowhere("tcp", tmp_path)
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = _serve({"PORT": str(port), "DATABASE_URL": url, "STARTUP_TIMEOUT": "0"})
    assert code == 1, output
    assert output.count("\n") == 1, output  # one line, and nothing else
    [error] = _lines(output, "ERROR")
    assert f"port {port} is already in use" in error and "set PORT to a free port" in error
    assert "serving on" not in output and "Traceback" not in output


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_nothing_to_reach_within_startup_timeout_is_one_line_and_exit_1(transport: str, tmp_path: Path) -> None:
    url, where = _nowhere(transport, tmp_path)
    started = time.monotonic()
    code, output = _serve(
        {"PORT": str(free_port()), "DATABASE_URL": url, "STARTUP_TIMEOUT": "2", "RECONNECT_MAX_BACKOFF": "0.5"}
    )
    assert code == 1, output
    assert time.monotonic() - started < 30, output  # not the default 60 s
    [error] = _lines(output, "ERROR")
    assert f"could not reach PostgreSQL at {where}, database mb within STARTUP_TIMEOUT=2 s" in error, error
    assert "Traceback" not in output and "serving on" not in output
    # By the server's own clock: from listening on its port to giving up, the 2 s and little more.
    [listening] = [line for line in output.splitlines() if "listening on" in line]
    assert 1.9 <= _when(error) - _when(listening) < 3.0, output
    # Every attempt said why, in lines the summariser condenses (one per 5 s window here).
    assert 1 <= len([line for line in _lines(output, "WARNING") if "waiting_for_database" in line]) <= 2, output


def test_migrate_waits_for_the_database_as_serve_does(tmp_path: Path) -> None:
    """`message-broker migrate` (make db) started during an outage waits too, up to STARTUP_TIMEOUT."""
    url, where = _nowhere("tcp", tmp_path)
    env = {"DATABASE_URL": url, "STARTUP_TIMEOUT": "1", "RECONNECT_MAX_BACKOFF": "0.5"}
    code, output = _serve(env, command="migrate")
    assert code == 1, output
    [error] = _lines(output, "ERROR")
    assert f"could not reach PostgreSQL at {where}, database mb within STARTUP_TIMEOUT=1 s" in error, output
    assert "waiting_for_database" in output and "Traceback" not in output, output


def test_a_database_error_in_the_last_step_of_start_up_is_one_line_and_exit_1(database_url: str) -> None:
    """The application's own start-up reads (the API tokens, loaded before the first request) fail
    here because a maintenance job holds the table past STATEMENT_TIMEOUT_MS: start-up ends as when
    a migration fails, one line and exit 1. It was the DatabaseError's traceback."""
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
        try:
            code, output = _serve(
                {"PORT": str(free_port()), "DATABASE_URL": database_url, "STATEMENT_TIMEOUT_MS": "500"}
            )
        finally:
            cur.execute("ROLLBACK")
    assert code == 1, output
    [error] = _lines(output, "ERROR")
    assert "canceling statement due to statement timeout" in error, output
    assert "Traceback" not in output and "serving on" not in output, output


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_database_migrated_by_newer_code_is_refused_in_one_line(database_url: str, command: str) -> None:
    """A newer version of the service migrated the database (a rollback of the code, an old
    process restarted during a deploy): its schema has a migration this code does not know, and
    this code's statements may not fit it. It was served ("database schema up to date")."""
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'from_newer_code')")
    code, output = _serve({"PORT": str(free_port()), "DATABASE_URL": database_url}, command=command)
    assert code == 1, output
    [error] = _lines(output, "ERROR")
    assert "migration 9999 that this code does not know" in error, output
    assert "Traceback" not in output and "serving on" not in output and "up to date" not in output, output


@pytest.mark.parametrize("command", ["migrate", "verify", "create-role"])
def test_a_command_that_cannot_reach_the_database_ends_with_one_line_last(command: str, tmp_path: Path) -> None:
    """The reason a command gives up is its last line, and one line: the held-back count of the
    warnings came after it, and verify's and create-role's error was libpq's two lines."""
    url, _ = _nowhere("tcp", tmp_path)
    env = {"DATABASE_URL": url, "STARTUP_TIMEOUT": "1", "RECONNECT_MAX_BACKOFF": "0.2", "APP_DB_ROLE": "nobody"}
    code, output = _serve(env, command=command)
    assert code == 1, output
    [error] = _lines(output, "ERROR")
    assert output.rstrip("\n").splitlines()[-1] == error, output
    assert "Traceback" not in output, output


async def _status(url: str) -> int | None:
    try:
        return (await call("GET", url, timeout=5))[0]
    except (aiohttp.ClientError, TimeoutError):
        return None


async def test_a_database_that_appears_later_is_waited_for(owned_pg: OwnedPostgres, tmp_path: Path) -> None:
    """Nothing listens where DATABASE_URL points when the service starts; PostgreSQL appears 5 s
    later: the service becomes ready without a restart, creates its database and migrates it.
    Meanwhile its port answers: /health 200, /ready 503, the API 503."""
    name = f"mb_late_{uuid.uuid4().hex[:8]}"
    server = ServerProcess(
        dsn_with_database(owned_pg.tcp_uri(), name), tmp_path / "server.log", RECONNECT_MAX_BACKOFF="0.5"
    )
    owned_pg.stop()
    try:
        server.launch()
        started = time.monotonic()
        await eventually(lambda: _status(server.url + "/health"), timeout=30, what="/health answering")
        async with aiohttp.ClientSession() as session, session.get(server.url + "/health/") as response:
            assert (response.status, await response.json()) == (200, {"status": "ok"})
            assert response.headers["Server"] == "message_broker"  # as every answer of the application
            assert response.headers["Connection"] == "close"  # the next request finds the application
        status, body = await call("GET", server.url + "/ready")
        assert (status, body["status"], body["down"]) == (503, "unavailable", ["startup"])
        status, body = await call("POST", server.url + "/api/v1/user/", {"username": "early", "balance": 1})
        assert (status, body["error"]["code"]) == (503, "database_unavailable")
        await eventually(lambda: "waiting_for_database" in server.log_path.read_text(), timeout=30)
        # The scenario: PostgreSQL comes up 5 s after the service (a duration, not a wait for something).
        await asyncio.sleep(max(0.0, 5 - (time.monotonic() - started)))
    finally:
        owned_pg.start()
    try:
        await server.wait_ready(30)
        async with aiohttp.ClientSession(server.url) as session:
            user = await create_user(session, "late", 10)
            async with session.post(
                f"/api/v1/user/{user['id']}/amount/?wait=5", json={"type": "write-off", "amount": 4}
            ) as response:
                assert (await response.json())["balance_after"] == 6
        assert server.stop() == 0
        log = server.log_path.read_text()
        assert f"created database {name}" in log and log.count("serving on") == 1, log
        assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        server.stop()
        drop(owned_pg.uri(), name)


async def test_a_signal_while_waiting_for_the_database_stops_it(tmp_path: Path) -> None:
    url, _ = _nowhere("tcp", tmp_path)
    server = ServerProcess(url, tmp_path / "server.log", STARTUP_TIMEOUT="0")
    try:
        server.launch()
        await eventually(lambda: "waiting_for_database" in server.log_path.read_text(), timeout=30)
        server.signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait_exit, 15)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert code == 0, log
    assert log.rstrip().endswith("stopped") and "Traceback" not in log and " ERROR " not in log, log


# -- signals ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _user_locked(database_url: str, user_id: str) -> Iterator[psycopg2.extensions.cursor]:
    """The user's row locked by a transaction of the test's own, as a person with psql would: the
    worker's apply transaction waits for it (task inserts do not)."""
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (int(user_id),))
        try:
            yield cur
        finally:
            cur.execute("ROLLBACK")


def _apply_waits(sql: psycopg2.extensions.cursor) -> bool:
    sql.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'message_broker' AND wait_event_type = 'Lock'"
    )
    return bool(sql.fetchone()[0])


async def _task_in_a_waiting_transaction(server: ServerProcess, sql: psycopg2.extensions.cursor, user: Any) -> str:
    status, task = await call(
        "POST", f"{server.url}/api/v1/user/{user['id']}/amount/", {"type": "replenishment", "amount": 1}
    )
    assert status == 202, task
    await eventually(lambda: _apply_waits(sql), timeout=15, what="the worker waiting for the locked user")
    return str(task["id"])


def _log_has(server: ServerProcess, text: str) -> bool:
    return text in server.log_path.read_text()


# Signals this far apart are separate requests to stop (closer ones count as one).
APART = StopSignals.SAME_REQUEST + 0.2


async def test_a_second_signal_while_stopping_does_not_break_the_stop(start_server, database_url, sql) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM twice at once (a process group's and make's copy of it: one request), then SIGINT
    while the stop waits for a transaction: the stop goes on, the transaction commits, the pool
    closes, "stopped", exit 0."""
    server = await start_server(SHUTDOWN_TIMEOUT="60")
    async with aiohttp.ClientSession(server.url) as session:
        user = await create_user(session, "stops", 0)
    with _user_locked(database_url, user["id"]):
        task_id = await _task_in_a_waiting_transaction(server, sql, user)
        server.signal(signal.SIGTERM)
        server.signal(signal.SIGTERM)
        await eventually(lambda: _log_has(server, "SIGTERM: stopping"), timeout=15)
        await asyncio.sleep(APART)  # a separate request, by definition
        server.signal(signal.SIGINT)
        await eventually(lambda: _log_has(server, "SIGINT while stopping: the stop goes on"), timeout=15)
        assert _apply_waits(sql), "the stop must still be waiting for the transaction"
    code = await asyncio.to_thread(server.wait_exit, 30)
    log = server.log_path.read_text()
    assert code == 0, log
    # (The kernel may merge the two SIGTERMs at once into one; if not, the log says they were one request.)
    assert log.count("SIGTERM: stopping") == 1 and "Traceback" not in log and " ERROR " not in log, log
    assert log.rstrip().endswith("stopped"), log
    sql.execute("SELECT status FROM tasks WHERE id = %s", (int(task_id),))
    assert sql.fetchone()[0] == "done"  # the transaction the stop waited for committed


async def test_a_third_signal_exits_at_once(start_server, database_url, sql) -> None:  # type: ignore[no-untyped-def]
    """Three separate signals while the stop waits for a transaction (for up to 60 s): the third
    ends the process at once, exit 1, one line saying so; the transaction rolls back and the task
    is applied after a restart (it was acknowledged: it must not be lost)."""
    server = await start_server(SHUTDOWN_TIMEOUT="60")
    async with aiohttp.ClientSession(server.url) as session:
        user = await create_user(session, "hurries", 0)
    with _user_locked(database_url, user["id"]):
        task_id = await _task_in_a_waiting_transaction(server, sql, user)
        server.signal(signal.SIGTERM)
        await eventually(lambda: _log_has(server, "SIGTERM: stopping"), timeout=15)
        await asyncio.sleep(APART)
        server.signal(signal.SIGTERM)
        await eventually(lambda: _log_has(server, "SIGTERM while stopping"), timeout=15)
        await asyncio.sleep(APART)
        sent = time.monotonic()
        server.signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait_exit, 30)
        assert time.monotonic() - sent < 10  # not the 60 s the stop would have waited
    log = server.log_path.read_text()
    assert code == 1, log
    assert "Traceback" not in log and "stopped" not in log, log
    [line] = [line for line in log.splitlines() if " ERROR " in line]
    assert line.endswith("SIGTERM for the third time: exiting at once, without finishing the stop (exit 1)"), log
    again = await start_server()
    async with aiohttp.ClientSession(again.url) as session:

        async def applied() -> bool:
            async with session.get(f"/api/v1/task/{task_id}") as response:
                return (await response.json())["status"] == "done"

        await eventually(applied, timeout=15, what="the acknowledged task applied after the restart")


# -- the pool, opened while PostgreSQL comes up ---------------------------------------------------------

FIRST_ONLY = """
import socket, sys, threading
upstream = ("127.0.0.1", int(sys.argv[1]))
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)

def pump(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for each in (source, sink):
        try:
            each.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

first = True
while True:
    conn = listener.accept()[0]
    if not first:
        conn.close()  # every connection after the first: closed at once
        continue
    first = False
    up = socket.create_connection(upstream)
    threading.Thread(target=pump, args=(conn, up), daemon=True).start()
    threading.Thread(target=pump, args=(up, conn), daemon=True).start()
"""


@pytest.fixture(params=list(LOOPS))
def new_loop(request: pytest.FixtureRequest) -> LoopFactory:
    return LOOPS[request.param]


def test_a_pool_whose_second_connection_fails_closes_the_first(new_loop: LoopFactory, owned_pg: OwnedPostgres) -> None:
    """Seen in scenario 12: aiopg's create_pool dropped a half-filled pool with its first connection
    open when the second failed (a ResourceWarning and "Future exception was never retrieved" in
    the log). Pool.open closes what it opened, and the start-up's next attempt begins clean."""
    process = subprocess.Popen(
        [sys.executable, "-c", FIRST_ONLY, str(owned_pg.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        options = ConnectionOptions(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=3)

        async def scenario() -> None:
            with pytest.raises(DatabaseUnavailable):
                await Pool.open(options, min_size=2, max_size=4, acquire_timeout=5)

        run_clean(new_loop, scenario)
    finally:
        process.kill()
        process.wait(5)
