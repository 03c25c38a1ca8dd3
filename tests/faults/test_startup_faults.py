"""Scenarios 12 and 13: PostgreSQL away while the service starts, and SIGTERM delivered two and
three times to the process group of `make run` under load. Each over the Unix socket and TCP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2.extensions
import pytest

from message_broker.db.migrate import available_migrations
from message_broker.db.options import dsn_with_database
from message_broker.server import StopSignals

from ..helpers import call
from ..pg import OwnedPostgres, admin_connection, drop, fresh_database
from .harness import (
    Load,
    Outcome,
    ProcessedObserver,
    ServerProcess,
    create_users,
    final_check,
    http_status,
    poll,
    server_factory,
    wait_drained,
)

pytestmark = pytest.mark.faults

TRANSPORTS = ["unix", "tcp"]
ROOT = Path(__file__).resolve().parents[2]
# Signals this far apart are separate requests to stop (closer ones count as one).
APART = StopSignals.SAME_REQUEST + 0.2
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def _service_url(owned_pg: OwnedPostgres, transport: str, database: str) -> str:
    return dsn_with_database(owned_pg.tcp_uri() if transport == "tcp" else owned_pg.uri(), database)


def _over(transport: str) -> str:
    return ", TCP" if transport == "tcp" else ", Unix socket"


def _seconds(line: str) -> float:
    found = LOG_TIME.match(line)
    assert found, line
    return time.mktime(time.strptime(found[1], "%Y-%m-%d %H:%M:%S")) + int(found[2]) / 1000


def _lines(text: str, part: str) -> list[str]:
    return [line for line in text.splitlines() if part in line]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_database_away_at_start_up(
    servers: Callable[..., ServerProcess],
    owned_pg: OwnedPostgres,
    tmp_path: Path,
    transport: str,
    record: Callable[[Outcome], None],
) -> None:
    """12. Two servers started while PostgreSQL is stopped, and a third with STARTUP_TIMEOUT=2.
    The third gives up in 2 s with one line and exit 1; the two answer /health 200, /ready 503 and
    the API 503 meanwhile, and become ready without a restart when PostgreSQL starts 5 s later; of
    the two, one creates the database and every migration is applied exactly once."""
    name = f"mb_away_{uuid.uuid4().hex[:8]}"
    url = dsn_with_database(owned_pg.uri(), name)
    service_url = _service_url(owned_pg, transport, name)
    outcome = Outcome(
        f"12 PostgreSQL away at start-up{_over(transport)}",
        "two servers (and one with STARTUP_TIMEOUT=2) started while PostgreSQL is stopped; it starts 5 s later",
    )
    waiting = [servers(url=service_url), servers(url=service_url)]
    # Not from `servers`: its exit is the point (the factory fails a scenario whose servers exit on their own).
    impatient = ServerProcess(service_url, tmp_path, name="impatient", STARTUP_TIMEOUT="2")
    await asyncio.to_thread(owned_pg.stop)
    try:
        started = time.monotonic()
        for server in [*waiting, impatient]:
            server.start()
        assert impatient.proc is not None
        code = await asyncio.to_thread(impatient.proc.wait, 30)
        log = impatient.log_text()
        assert code == 1, log
        [error] = _lines(log, " ERROR ")
        assert "within STARTUP_TIMEOUT=2 s" in error and "Traceback" not in log, log
        [listening] = _lines(log, "listening on")
        outcome.notes["timeout_exit_s"] = round(_seconds(error) - _seconds(listening), 2)
        assert 1.9 <= outcome.notes["timeout_exit_s"] < 3.0, log
        for server in waiting:
            await poll(lambda s=server: http_status(s.url + "/health"), timeout=30, what=f"{server.name} /health")
            assert await http_status(server.url + "/health") == 200
            status, body = await call("GET", server.url + "/ready")
            assert (status, body["down"]) == (503, ["startup"]), body
            status, body = await call("POST", server.url + "/api/v1/user/", {"username": "early", "balance": 1})
            assert (status, body["error"]["code"]) == (503, "database_unavailable"), body
            await poll(lambda s=server: "waiting_for_database" in s.log_text(), timeout=30, on_fail=server.log_tail)
        # The scenario: PostgreSQL comes up 5 s after the servers (a duration, not a wait for something).
        await asyncio.sleep(max(0.0, 5 - (time.monotonic() - started)))
    finally:
        await asyncio.to_thread(owned_pg.start)
    try:
        up = time.monotonic()
        for server in waiting:
            await server.wait_ready(30)
        outcome.notes["ready_after_start_s"] = round(time.monotonic() - up, 2)
        logs = "".join(server.log_text() for server in waiting)
        migrations = len(available_migrations())
        assert len(_lines(logs, "applied migration ")) == migrations, logs
        assert len(_lines(logs, f"created database {name}")) == 1, logs
        assert "Traceback" not in logs and " ERROR " not in logs, logs
        conn = admin_connection(url)
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT version) FROM schema_migrations")
            assert cur.fetchone() == (migrations, migrations)
        outcome.notes["migrations_applied_once"] = migrations
        initial = create_users(url, [1_000] * 16)
        ids = list(initial)
        async with Load([server.url for server in waiting], lambda i: [ids[i]], 16) as load:
            await load.until_acknowledged(300)
        outcome.notes["drain_s"] = round(await wait_drained(url), 2)
        for server in waiting:
            code, _ = await server.terminate()
            assert code == 0, server.log_tail()
        record(final_check(url, initial, load.stats, outcome))
    finally:
        for server in [*waiting, impatient]:
            server.stop()
        drop(owned_pg.uri(), name)


class MakeRun(ServerProcess):
    """`make run` in a session of its own, as a process manager starts it: make leads the process
    group, the server is its child, and signals go to the whole group (systemd's KillMode=control-group)."""

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["make", "--no-print-directory", "-C", str(ROOT), "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def signal_group(self, signum: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def _user_locked(database_url: str, user_id: int) -> Iterator[None]:
    """The user's row locked by a transaction of the test's own: the worker's apply transaction
    for that user waits for it (task inserts do not), so the stop has a transaction to wait for."""
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (user_id,))
        try:
            yield
        finally:
            cur.execute("ROLLBACK")


def _apply_waits(cur: psycopg2.extensions.cursor) -> bool:
    cur.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'message_broker' AND wait_event_type = 'Lock'"
    )
    return bool(cur.fetchone()[0])


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("signals", [2, 3])
async def test_sigterms_to_the_process_group_of_make_run(
    owned_pg: OwnedPostgres, tmp_path: Path, transport: str, signals: int, record: Callable[[Outcome], None]
) -> None:
    """13. `make run` under 16 clients; a transaction waits on a row the test holds; SIGTERM to
    the whole process group (the server gets it twice at once: make forwards it), then again
    `signals - 1` times, each more than a second apart. Two: the stop goes on, finishes the
    transaction once the row is free, closes the pool and says "stopped", its last line. Three:
    the third exits at once with a line saying so. Either way no traceback, and a restart
    applies whatever is left: nothing acknowledged is lost or applied twice.

    The server is make's child, so its exit code reaches make, not the test; tests/integration/
    test_startup.py checks the codes (0 and 1) on a server of its own."""
    name = f"mb_signals_{uuid.uuid4().hex[:8]}"
    outcome = Outcome(
        f"13 {signals} SIGTERMs to make run's group{_over(transport)}",
        f"SIGTERM to the process group of `make run` {signals} times under load, a transaction in progress",
    )
    with fresh_database(owned_pg.uri(), name) as url, server_factory(tmp_path, url) as make_server:
        service_url = _service_url(owned_pg, transport, name)
        run = MakeRun(service_url, tmp_path, name="make-run", SHUTDOWN_TIMEOUT="60")
        try:
            await run.start_ready(timeout=60)  # it migrates the new database
            initial = create_users(url, [1_000] * 16)
            ids = list(initial)
            [locked] = create_users(url, [0], prefix="locked")
            initial[locked] = 0
            async with ProcessedObserver(url) as observer:
                async with Load([run.url], lambda i: [ids[i]], 16) as load:
                    await load.until_acknowledged(300)
                    conn = admin_connection(url)
                    with contextlib.closing(conn), conn.cursor() as cur, _user_locked(url, locked):
                        status, task = await call(
                            "POST", f"{run.url}/api/v1/user/{locked}/amount/", {"type": "replenishment", "amount": 5}
                        )
                        assert status == 202, task
                        await poll(lambda: _apply_waits(cur), timeout=15, what="a transaction waiting for the row")
                        run.signal_group(signal.SIGTERM)
                        await poll(lambda: "SIGTERM: stopping" in run.log_text(), timeout=15, on_fail=run.log_tail)
                        for _ in range(signals - 1):
                            await asyncio.sleep(APART)  # a separate request, by definition
                            run.signal_group(signal.SIGTERM)
                        if signals == 2:
                            await poll(lambda: "SIGTERM while stopping" in run.log_text(), timeout=15)
                            assert _apply_waits(cur), "the stop must still be waiting for the transaction"
                        else:
                            assert run.proc is not None
                            await asyncio.to_thread(run.proc.wait, 15)
                    assert run.proc is not None
                    await asyncio.to_thread(run.proc.wait, 30)
                    outcome.notes["acknowledged_before_restart"] = len(load.stats.acknowledged)
                log = run.log_text()
                server_lines = [line for line in log.splitlines() if LOG_TIME.match(line)]
                assert "Traceback" not in log, log
                if signals == 2:
                    assert server_lines[-1].endswith("INFO message_broker: stopped"), log
                    assert not _lines(log, " ERROR "), log
                else:
                    assert server_lines[-1].endswith("exiting at once, without finishing the stop (exit 1)"), log
                    assert "stopped" not in log, log
                outcome.notes["last_line"] = server_lines[-1].split(": ", 1)[1]
                # make's copy of the group's first SIGTERM, unless the kernel merged the two
                outcome.notes["copies_taken_as_one"] = len(_lines(log, "the same request to stop"))
                outcome.notes["pending_after_stop"] = _pending(url)
                again = make_server(url=service_url)
                await again.start_ready()
                outcome.notes["drain_s"] = round(await wait_drained(url, observer=observer), 2)
            acknowledged = [int(task["id"])]
            record(final_check(url, initial, load.stats, outcome, observer=observer, extra_acknowledged=acknowledged))
        finally:
            run.stop()


def _pending(url: str) -> int:
    conn = admin_connection(url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
        return int(cur.fetchone()[0])
