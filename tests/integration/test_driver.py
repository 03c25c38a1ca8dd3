"""The driver throws nothing but its own errors (db.errors) and releases whatever a failed attempt
opened: against a server that refuses, one that is shutting down, one that accepts and closes at
once, one that accepts and never answers, and a pool whose connections were all terminated; on
uvloop's event loop and asyncio's, each attempt several times in a row (uvloop's stale registration
of a closed socket failed every other attempt). Then the same through the real server process: 503,
never 500, and recovery.

Each scenario runs on a loop of its own (`run_clean`), which fails the test if anything leaked: a
ResourceWarning (aiopg's "Unclosed connection"), a call to the loop's exception handler ("Future
exception was never retrieved", ...), or a socket left open."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import pytest
import uvloop

from message_broker.db.driver import ListenConnection, Pool, connect
from message_broker.db.errors import DatabaseUnavailable, QueryTimeout
from message_broker.db.options import ConnectionOptions
from message_broker.server import new_event_loop

from .. import pg
from ..faults.harness import CONNECT_FAULTS, PASS, FaultProxy
from ..helpers import call, eventually, wait_until
from ..servers import ServerProcess

T = TypeVar("T")

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
ATTEMPTS = 4  # in a row, for each way of opening something
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=list(LOOPS))
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    return LOOPS[request.param]


def run_clean(
    loop_factory: LoopFactory,
    scenario: Callable[[], Awaitable[T]],
    *,
    expected_handler_calls: Callable[[dict[str, Any]], bool] = lambda context: False,
) -> T:
    """Run `scenario()` on a new event loop and fail if it leaked anything."""
    handler_calls: list[dict[str, Any]] = []
    sockets_before = _open_sockets()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.get_loop().set_exception_handler(lambda _loop, context: handler_calls.append(context))
            result = runner.run(scenario())  # type: ignore[arg-type]
            # Collect while the loop lives: aiopg's __del__ and an unread future report to it.
            runner.run(_collect_garbage())
        gc.collect()
    unexpected = [c for c in handler_calls if not expected_handler_calls(c)]
    assert not unexpected, f"the event loop's exception handler was called: {unexpected}"
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, f"resources left open: {leaks}"
    left_open = _open_sockets() - sockets_before
    assert not left_open, f"sockets left open: {left_open}"
    return result


async def _collect_garbage() -> None:
    gc.collect()
    await asyncio.sleep(0)


def _open_sockets() -> set[str]:
    """This process's open sockets, as 'fd -> socket:[inode]'."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(f"{fd} -> {target}")
    return found


# -- every way of opening something must fail the same way ------------------------------------------


async def _open_connection(options: ConnectionOptions) -> None:
    (await connect(options)).close()


async def _open_listen_connection(options: ConnectionOptions) -> None:
    (await ListenConnection.open(options, ["task_created", "task_processed"])).close()


async def _open_pool(options: ConnectionOptions) -> None:
    await (await Pool.open(options, min_size=1, max_size=2, acquire_timeout=5)).close()


async def _acquire_from_empty_pool(options: ConnectionOptions) -> None:
    pool = await Pool.open(options, min_size=0, max_size=2, acquire_timeout=5)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1")
    finally:
        await pool.close()


OPENERS = (_open_connection, _open_listen_connection, _open_pool, _acquire_from_empty_pool)


async def _every_attempt_fails(options: ConnectionOptions) -> list[str]:
    """Each opener ATTEMPTS times in a row: DatabaseUnavailable every time (anything else fails the
    test as it is raised); returns the messages."""
    messages = []
    for _ in range(ATTEMPTS):
        for opener in OPENERS:
            with pytest.raises(DatabaseUnavailable) as raised:
                await opener(options)
            messages.append(str(raised.value))
    return messages


def _options(dsn: str) -> ConnectionOptions:
    return ConnectionOptions(dsn, connect_timeout=3)


# -- a server that refuses ----------------------------------------------------------------------------


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening, so nobody else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_server_that_refuses(loop_factory: LoopFactory, refused_port: int, tmp_path: Path) -> None:
    tcp = _options(f"postgresql://postgres@127.0.0.1:{refused_port}/postgres")
    unix = _options(f"postgresql://postgres@/postgres?host={tmp_path}&port=5432")  # no socket there

    async def scenario() -> list[str]:
        return await _every_attempt_fails(tcp) + await _every_attempt_fails(unix)

    messages = run_clean(loop_factory, scenario)
    assert any("refused" in m for m in messages), messages


# -- a server that accepts and closes -----------------------------------------------------------------


@pytest.fixture
def accept_and_close_port() -> Iterator[int]:
    """A TCP listener (in a thread of its own, not on the loop under test) that closes every
    connection as soon as it has accepted it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.close()

    thread = threading.Thread(target=serve, name="accept-and-close", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        # Wake the accept() so the thread sees the stop.
        with contextlib.suppress(OSError), socket.create_connection(listener.getsockname(), timeout=1):
            pass
        thread.join(5)
        listener.close()


def test_a_server_that_accepts_and_closes(loop_factory: LoopFactory, accept_and_close_port: int) -> None:
    options = _options(f"postgresql://postgres@127.0.0.1:{accept_and_close_port}/postgres")
    messages = run_clean(loop_factory, lambda: _every_attempt_fails(options))
    assert any("closed the connection" in m for m in messages), messages


# -- a server that accepts and never answers ---------------------------------------------------------------

SILENT_SERVER = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
held = []
while True:
    held.append(listener.accept()[0])  # kept open, never read, never answered
"""


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP listener that accepts and then says nothing (a hung proxy, a dead path), in a process
    of its own so that the connections it holds are not this process's sockets."""
    process = subprocess.Popen([sys.executable, "-c", SILENT_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait(5)


def test_a_server_that_never_answers(loop_factory: LoopFactory, silent_port: int) -> None:
    """Every attempt gives up after CONNECT_TIMEOUT as DatabaseUnavailable (QueryTimeout)."""
    options = ConnectionOptions(f"postgresql://postgres@127.0.0.1:{silent_port}/postgres", connect_timeout=0.3)

    async def scenario() -> list[str]:
        messages = []
        for opener in OPENERS:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable) as raised:
                    await opener(options)
                assert time.monotonic() - started < 2, "connecting did not give up in time"
                messages.append(str(raised.value))
        return messages

    messages = run_clean(loop_factory, scenario)
    assert all("timed out" in m for m in messages), messages


# -- connections made and used while a proxy cycles through every fault ------------------------------------

CHURN_S = 10.0
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("loop", list(LOOPS))
async def test_connections_churned_through_a_cycling_fault_proxy_never_abort_the_process(
    loop: str, owned_pg: pg.OwnedPostgres
) -> None:
    """The issue's abort, reproduced: six workers open single connections, LISTEN connections and
    pools through the tests' fault proxy and run statements on them, as fast as they can, while the
    proxy changes every 20-200 ms between letting connections through, closing them at once or
    during the start-up, resetting them, refusing them, swallowing their bytes and resetting every
    open one. Before the driver kept the loop's registrations in step with libpq's socket,
    uvloop's libuv aborted the process within seconds (a queued epoll change for a descriptor
    libpq had closed or replaced: "Fatal Python error: Aborted", SIGABRT) and asyncio's leaked
    connections. The client runs in a process of its own (tests/faults/churn.py), so an abort is
    an exit status here: it must exit 0, every failure a db.errors one, the loop's exception
    handler never called, and some attempts must have got through."""
    proxy = FaultProxy(owned_pg.socket_path, seed=24)
    await proxy.start()
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-X",
            "faulthandler",
            "-m",
            "tests.faults.churn",
            f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres",
            str(CHURN_S),
            loop,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        done = await proxy.cycle(CHURN_S, seed=24)
        out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    finally:
        await proxy.close()
    report = f"exit status {child.returncode}\nstdout: {out.decode()[-2000:]}\nstderr: {err.decode()[-3000:]}"
    assert child.returncode == 0, report
    result = json.loads(out.decode().splitlines()[-1])
    assert set(done) >= {PASS, "reset-all", "stall", *CONNECT_FAULTS}, done
    assert result["outcomes"].get("ok", 0) > 0, report
    assert sum(result["outcomes"].values()) > result["outcomes"]["ok"], report  # faults were met


# -- a real PostgreSQL that is shutting down -------------------------------------------------------------


@contextlib.contextmanager
def smart_shutdown(owned_pg: pg.OwnedPostgres) -> Iterator[None]:
    """`pg_ctl stop -m smart` while a session is held open: until it ends, the server refuses new
    connections with "the database system is shutting down". Afterwards the session ends, the
    server finishes stopping and is started again."""
    held = pg.admin_connection(owned_pg.uri())
    try:
        owned_pg.stop("smart", wait=False)
        wait_until(lambda: _refuses(owned_pg.tcp_uri()), 20, "the server refusing new connections")
        yield
    finally:
        held.close()
        wait_until(lambda: not owned_pg.running(), 20, "the server stopped")
        owned_pg.start()


def _refuses(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        assert "shutting down" in str(exc), exc
        return True
    return False


def test_a_server_that_is_shutting_down(loop_factory: LoopFactory, owned_pg: pg.OwnedPostgres) -> None:
    async def scenario() -> list[str]:
        return await _every_attempt_fails(_options(owned_pg.tcp_uri())) + await _every_attempt_fails(
            _options(owned_pg.uri())
        )

    with smart_shutdown(owned_pg):
        messages = run_clean(loop_factory, scenario)
    assert all("shutting down" in m for m in messages), messages
    # And once it is back, the same calls work.
    run_clean(loop_factory, lambda: _open_connection(_options(owned_pg.tcp_uri())))


# -- a pool whose connections were all terminated --------------------------------------------------------


def test_a_pool_whose_connections_were_all_terminated_serves_on_fresh_ones(
    loop_factory: LoopFactory, database_url: str, sql
) -> None:  # type: ignore[no-untyped-def]
    """Every pooled connection killed (pg_terminate_backend, waiting until each is gone) while the
    event loop is busy elsewhere, so nothing has noticed yet: the next requests are served on
    fresh connections, none fails."""
    size = 4
    name = f"driver-test-{uuid.uuid4().hex[:8]}"
    options = _options(database_url).with_changes(application_name=name)

    async def scenario() -> list[int]:
        pool = await Pool.open(options, min_size=size, max_size=size, acquire_timeout=5)
        killed = []
        try:
            for _ in range(ATTEMPTS):
                await _use_every_connection(pool, size)
                # Blocking on purpose: the loop runs no reader callback between this and the requests.
                sql.execute(
                    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity WHERE application_name = %s",
                    (name,),
                )
                killed.append(sql.fetchone()[0])
                answers = await asyncio.gather(*(_select_one(pool) for _ in range(2 * size)))
                assert answers == [1] * (2 * size)
        finally:
            await pool.close()
        return killed

    killed = run_clean(loop_factory, scenario)
    assert killed == [size] * ATTEMPTS, killed


def test_connections_killed_under_way_fail_as_database_unavailable_and_never_hang(
    loop_factory: LoopFactory, database_url: str, sql
) -> None:  # type: ignore[no-untyped-def]
    """Connections terminated without waiting, while requests take them: some requests may fail,
    as DatabaseUnavailable only and at once (with uvloop, a reset used to leave a statement
    waiting for the 15 s query timeout), and the pool serves again right after."""
    size = 4
    name = f"driver-test-{uuid.uuid4().hex[:8]}"
    options = _options(database_url).with_changes(application_name=name)

    async def attempt(pool: Pool) -> str:
        try:
            async with asyncio.timeout(5):
                return "ok" if await _select_one(pool) == 1 else "wrong answer"
        except DatabaseUnavailable:
            return "unavailable"

    async def scenario() -> dict[str, int]:
        pool = await Pool.open(options, min_size=size, max_size=size, acquire_timeout=5)
        seen: dict[str, int] = {}
        try:
            for _ in range(50):
                await _use_every_connection(pool, size)
                sql.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,)
                )
                for answer in await asyncio.gather(*(attempt(pool) for _ in range(2 * size))):
                    seen[answer] = seen.get(answer, 0) + 1
            assert await _select_one(pool) == 1
        finally:
            await pool.close()
        return seen

    seen = run_clean(loop_factory, scenario)
    assert set(seen) <= {"ok", "unavailable"}, seen


async def _use_every_connection(pool: Pool, size: int) -> None:
    """Have the pool open all `size` connections (each lent at once)."""
    gate = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1")
            if pool.in_use == size:
                gate.set()
            await gate.wait()

    await asyncio.gather(*(hold() for _ in range(size)))


async def _select_one(pool: Pool) -> int:
    async with pool.acquire() as conn:
        row = await conn.fetch_one("SELECT 1 AS one")
    assert row is not None
    return int(row["one"])


# -- a statement the server cancels ----------------------------------------------------------------------


def test_a_statement_the_server_cancels_raises_query_timeout(loop_factory: LoopFactory, database_url: str) -> None:
    """aiopg raises CancelledError for a statement cancelled by statement_timeout; the driver must
    not let that through (a request would end unanswered, a background loop for good), while a
    real cancellation of the task still cancels it."""
    options = _options(database_url).with_changes(statement_timeout_ms=100)

    async def scenario() -> None:
        conn = await connect(options)
        try:
            for _ in range(2):
                with pytest.raises(QueryTimeout, match="statement timeout"):
                    await conn.fetch_one("SELECT pg_sleep(5)")
                assert await conn.fetch_one("SELECT 1 AS one") == {"one": 1}  # still usable
            slow = asyncio.create_task(conn.execute("SELECT pg_sleep(0.05)"))
            await asyncio.sleep(0)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
        finally:
            conn.close()

    # aiopg reports the cancelled statement to the loop's exception handler itself.
    run_clean(
        loop_factory,
        scenario,
        expected_handler_calls=lambda context: isinstance(context.get("exception"), psycopg2.errors.QueryCanceled),
    )


# -- the service: 503, not 500, and back -----------------------------------------------------------------


async def test_the_service_answers_503_while_the_database_is_gone_then_recovers(
    owned_pg: pg.OwnedPostgres, tmp_path: Path
) -> None:
    """The real server process (uvloop, TCP to PostgreSQL), its database stopped: every request
    is a quick 503 database_unavailable, /ready 503, /health 200; started again, it serves."""
    with pg.fresh_database(owned_pg.tcp_uri(), f"mb_driver_{uuid.uuid4().hex[:8]}") as database_url:
        server = ServerProcess(
            database_url,
            tmp_path / "server.log",
            PROBE_INTERVAL="0.5",
            PROBE_TIMEOUT="1",
            RECONNECT_MAX_BACKOFF="0.5",
            POOL_ACQUIRE_TIMEOUT="2",
            CONNECT_TIMEOUT="2",
        )
        await server.start()
        try:
            status, user = await call("POST", f"{server.url}/api/v1/user/", {"username": "u", "balance": 5})
            assert status == 201, user
            amount = f"{server.url}/api/v1/user/{user['id']}/amount/"
            await asyncio.to_thread(owned_pg.stop)
            try:
                await eventually(
                    lambda: _ready_is(server, 503),
                    interval=0.05,
                    what="/ready 503 with the database stopped",
                )
                for _ in range(ATTEMPTS):
                    for method, url, body in (
                        ("POST", amount, {"type": "replenishment", "amount": 1}),
                        ("GET", f"{server.url}/api/v1/user/{user['id']}", None),
                        ("GET", f"{server.url}/api/v1/user/", None),
                    ):
                        started = time.monotonic()
                        status, answer = await call(method, url, body)
                        assert status == 503, (method, url, status, answer)
                        assert answer["error"]["code"] == "database_unavailable", answer
                        assert time.monotonic() - started < 3, "a 503 took longer than POOL_ACQUIRE_TIMEOUT"
                ready_status, ready = await call("GET", server.url + "/ready")
                assert ready_status == 503 and ready["checks"]["database"] is False, ready
                assert (await call("GET", server.url + "/health"))[0] == 200
            finally:
                await asyncio.to_thread(owned_pg.start)
            await eventually(
                lambda: _ready_is(server, 200),
                timeout=20,
                interval=0.05,
                what="/ready 200 again",
                on_fail=server.log_tail,
            )
            status, task = await call("POST", amount, {"type": "replenishment", "amount": 1})
            assert status == 202, task
            assert server.stop() == 0
            log = server.log_path.read_text()
            assert "Traceback" not in log, server.log_tail()
        finally:
            server.stop()


async def _ready_is(server: ServerProcess, status: int) -> bool:
    return (await call("GET", server.url + "/ready"))[0] == status


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_the_services_loop_reports_a_cancelled_statement_once(
    kind: str, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiopg hands a statement the server cancelled to the loop's exception handler (an ERROR with
    a traceback) before raising it to the caller, who answers for it: the service's loop drops
    that report, and passes every other on."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    options = _options(database_url).with_changes(statement_timeout_ms=100)
    loop = new_event_loop(kind)

    async def scenario() -> None:
        conn = await connect(options)
        try:
            with pytest.raises(QueryTimeout, match="statement timeout"):
                await conn.fetch_one("SELECT pg_sleep(5)")
        finally:
            conn.close()
        asyncio.get_running_loop().call_exception_handler({"message": "anything else"})

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["anything else"]
