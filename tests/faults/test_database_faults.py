"""Scenarios 3, 4, 5, 7 and 8: the database connection killed, gone half-open, the database
stopped, a notification suppressed, and the pool exhausted."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from message_broker.db.driver import ListenConnection
from message_broker.db.options import ConnectionOptions, dsn_with_database

from ..helpers import accounted, call, samples, value
from ..pg import OwnedPostgres, admin_connection, fresh_database
from .harness import (
    FaultProxy,
    Load,
    Outcome,
    ProcessedObserver,
    ServerProcess,
    create_users,
    final_check,
    http_status,
    poll,
    wait_drained,
)

pytestmark = pytest.mark.faults
OWNS_ITS_POSTGRES = pytest.mark.direct_only(
    "stops, restarts or proxies a PostgreSQL of its own; scenario 12 restarts PgBouncer under 8 processes instead"
)


async def _timed(method: str, url: str, body: Any = None, **kwargs: Any) -> tuple[int, Any, float]:
    """call(), and the seconds the answer took."""
    started = time.monotonic()
    status, answer = await call(method, url, body, **kwargs)
    return status, answer, time.monotonic() - started


async def _post(
    url: str, user_id: int, kind: str, amount: int, timeout: float = 10.0, idempotency_key: str | None = None
) -> tuple[int, Any, float]:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    body = {"type": kind, "amount": amount}
    return await _timed("POST", f"{url}/api/v1/user/{user_id}/amount/", body, headers=headers, timeout=timeout)


async def _finished_within(url: str, task_id: int, seconds: float) -> float:
    started = time.monotonic()
    await poll(lambda: _is_finished(url, task_id), timeout=seconds, what=f"task {task_id} applied")
    return time.monotonic() - started


async def _is_finished(url: str, task_id: int) -> bool:
    try:
        status, task = await call("GET", f"{url}/api/v1/task/{task_id}")
    except aiohttp.ClientError:
        return False
    return status == 200 and task["status"] in ("done", "cancelled")


TRANSPORTS = ["unix", "tcp"]


def _service_url(owned_pg: OwnedPostgres, transport: str, database: str) -> str:
    """How the service reaches the owned server: its Unix socket, or TCP on 127.0.0.1."""
    return dsn_with_database(owned_pg.tcp_uri() if transport == "tcp" else owned_pg.uri(), database)


def _over(transport: str) -> str:
    return ", TCP" if transport == "tcp" else ""


@OWNS_ITS_POSTGRES
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_listen_connection_killed(
    servers: Callable[..., ServerProcess], owned_pg: OwnedPostgres, transport: str, record: Callable[[Outcome], None]
) -> None:
    """3. pg_terminate_backend on the LISTEN connection: /ready says 503 until it is back, and a
    task posted meanwhile (its NOTIFY lost) and one posted just after are applied within 5 s."""
    name = f"mb_listen_{uuid.uuid4().hex[:8]}"
    outcome = Outcome(
        f"3 LISTEN connection killed{_over(transport)}", "pg_terminate_backend of the LISTEN connection, under load"
    )
    with fresh_database(owned_pg.uri(), name) as database_url:
        # No sweep in this test's lifetime: only the rescan after the reconnect can find the task
        # posted while the listener was down.
        server = servers(url=_service_url(owned_pg, transport, name), SWEEP_INTERVAL="600")
        await server.start_ready()
        initial = create_users(database_url, [1_000] * 9)
        quiet, *ids = list(initial)  # the load never touches `quiet`: no loop of its own is running
        admin = admin_connection(owned_pg.uri())
        sql = admin_connection(database_url)
        acknowledged: list[int] = []
        with contextlib.closing(admin), contextlib.closing(sql), admin.cursor() as acur, sql.cursor() as cur:
            async with ProcessedObserver(database_url) as observer, Load([server.url], lambda i: [ids[i]], 8) as load:
                await load.until_acknowledged(100)
                cur.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'message_broker listener'"
                )
                (listener_pid,) = cur.fetchone()
                # Refuse new connections for a moment, so the listener cannot come straight back
                # and /ready can be seen to say 503; the pool's open connections keep serving.
                acur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                try:
                    cur.execute("SELECT pg_terminate_backend(%s)", (listener_pid,))
                    await poll(lambda: _ready_is(server, 503), timeout=5, what="/ready 503")
                    # Posted while nobody listens: its notification is lost for good. (A 503 is
                    # fair while new connections are refused and the pool wants one: try again.)
                    answer = await poll(
                        lambda: _accepted(server.url, quiet, "replenishment", 7), timeout=10, what="a 202 meanwhile"
                    )
                    during = int(answer["id"])
                    acknowledged.append(during)
                    assert await _ready_is(server, 503)
                finally:
                    acur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                back = time.monotonic()
                await poll(lambda: _ready_is(server, 200), timeout=10, what="/ready 200 again")
                outcome.notes["ready_again_s"] = round(time.monotonic() - back, 2)
                outcome.notes["task_posted_while_down_applied_s"] = round(
                    await _finished_within(server.url, during, 5.0), 2
                )
                status, body, _ = await _post(server.url, quiet, "replenishment", 9)
                assert status == 202, body
                acknowledged.append(int(body["id"]))
                outcome.notes["task_posted_after_applied_s"] = round(
                    await _finished_within(server.url, int(body["id"]), 5.0), 2
                )
                await load.until_acknowledged(len(load.stats.acknowledged) + 100)
                await load.finish()
                await wait_drained(database_url, observer=observer)
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'message_broker listener'"
            )
            assert cur.fetchone()[0] != listener_pid
        outcome.sent = len(acknowledged)
        record(
            final_check(database_url, initial, load.stats, outcome, observer=observer, extra_acknowledged=acknowledged)
        )
        server.stop()


async def _accepted(url: str, user_id: int, kind: str, amount: int) -> Any:
    status, body, _ = await _post(url, user_id, kind, amount)
    assert status in (202, 503), (status, body)
    return body if status == 202 else None


async def _ready_is(server: ServerProcess, status: int) -> bool:
    return await http_status(server.url + "/ready") == status


@OWNS_ITS_POSTGRES
async def test_half_open_database_connection(
    servers: Callable[..., ServerProcess], owned_pg: OwnedPostgres, record: Callable[[Outcome], None]
) -> None:
    """4. A proxy between the service and PostgreSQL stops forwarding without closing anything.
    The service notices within 15 s (with the default probe settings), comes back once traffic
    flows again, and applies everything once. Writes resume once the probe has gone unanswered and
    the LISTEN connection's own round trip too (the path is silent, not the pool busy), not when
    the statements stuck on the silent connections reach their query timeout (15 s): those are
    abandoned then (Pool.abandon_stalled)."""
    proxy = FaultProxy(owned_pg.socket_path)
    await proxy.start()
    name = f"mb_halfopen_{uuid.uuid4().hex[:8]}"
    outcome = Outcome("4 half-open connection", "a TCP proxy that swallows every byte and closes nothing")
    try:
        with fresh_database(owned_pg.uri(), name) as direct_url:
            via_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
            # The default probe settings, so "within 15 s" is what a deployment gets.
            server = servers(url=via_proxy, PROBE_INTERVAL="5", PROBE_TIMEOUT="3")
            await server.start_ready(timeout=30)
            initial = create_users(direct_url, [1_000] * 16)
            ids = list(initial)
            async with ProcessedObserver(direct_url) as observer:
                async with Load([server.url], lambda i: [ids[i]], 16, request_timeout=60) as load:
                    await load.until_acknowledged(200)
                    proxy.stall()
                    stalled = time.monotonic()
                    await poll(lambda: _ready_is(server, 503), timeout=15, interval=0.2, what="/ready 503")
                    outcome.notes["noticed_s"] = round(time.monotonic() - stalled, 2)
                    proxy.heal()
                    healed = time.monotonic()
                    await poll(lambda: _ready_is(server, 200), timeout=30, interval=0.2, what="/ready 200")
                    outcome.notes["ready_after_heal_s"] = round(time.monotonic() - healed, 2)
                    acked = len(load.stats.acknowledged)
                    await load.until_acknowledged(acked + 200, timeout=60)
                    outcome.notes["first_200_after_heal_s"] = round(time.monotonic() - healed, 2)
                    resumed = load.first_acknowledged_sent_after(stalled)
                    assert resumed is not None
                    outcome.notes["writes_resumed_after_stall_s"] = round(resumed - stalled, 2)
                outcome.notes["drain_s"] = round(await wait_drained(direct_url, timeout=60, observer=observer), 2)
                outcome.notes["max_latency_s"] = round(load.stats.max_latency, 2)
            record(final_check(direct_url, initial, load.stats, outcome, observer=observer))
            server.stop()
            # 5 s quiet + 3 s for the probe + 3 s for the LISTEN connection's own round trip (11 s),
            # and room for a busy machine; waiting out the query timeout (15 s) is beyond it.
            assert outcome.notes["writes_resumed_after_stall_s"] < 13, outcome.notes
    finally:
        await proxy.close()


@OWNS_ITS_POSTGRES
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_database_stopped_and_started_under_load(
    servers: Callable[..., ServerProcess], owned_pg: OwnedPostgres, transport: str, record: Callable[[Outcome], None]
) -> None:
    """5. PostgreSQL stopped and started under load: quick 503s meanwhile (no request hangs,
    no 500), the service recovers by itself, nothing acknowledged is lost. Over TCP this is the
    issue's report (16 clients, stop -m fast, 3 s later start: with uvloop the LISTEN loop died
    and /ready stayed 503)."""
    name = f"mb_restart_{uuid.uuid4().hex[:8]}"
    outcome = Outcome(
        f"5 PostgreSQL restarted{_over(transport)}", "pg_ctl stop -m fast under load, 3 s down, then start"
    )
    with fresh_database(owned_pg.uri(), name) as url:
        server = servers(url=_service_url(owned_pg, transport, name))
        await server.start_ready()
        initial = create_users(url, [1_000] * 16)
        ids = list(initial)
        async with Load([server.url], lambda i: [ids[i]], 16, request_timeout=30) as load:
            await load.until_acknowledged(300)
            await asyncio.to_thread(owned_pg.stop)
            down = time.monotonic()
            refused = load.stats.statuses[503]
            await poll(lambda: _ready_is(server, 503), timeout=5, what="/ready 503 while the database is down")
            await poll(lambda: load.stats.statuses[503] >= refused + 50, timeout=10, what="503s while down")
            # The outage lasts 3 s under load (a duration, not a wait for something to happen).
            await asyncio.sleep(max(0.0, 3 - (time.monotonic() - down)))
            await asyncio.to_thread(owned_pg.start)
            outcome.notes["down_s"] = round(time.monotonic() - down, 2)
            up = time.monotonic()
            await poll(lambda: _ready_is(server, 200), timeout=20, what="/ready 200 after the restart")
            outcome.notes["ready_after_start_s"] = round(time.monotonic() - up, 2)
            await load.until_acknowledged(len(load.stats.acknowledged) + 300)
        outcome.notes["drain_s"] = round(await wait_drained(url), 2)
        outcome.notes["max_latency_s"] = round(max(load.stats.max_latency, load.stats.max_error_latency), 2)
        outcome.notes["answers_over_1s"] = len(load.stats.slow)
        # No request hung: every answer, 202 or 503, came within a few seconds.
        assert load.stats.max_latency < 5, load.stats
        assert not load.stats.errors, f"requests without an HTTP answer: {load.stats.errors}"
        assert set(load.stats.statuses) <= {202, 503}, load.stats.statuses
        assert "Traceback" not in server.log_text(), server.log_tail()
        record(final_check(url, initial, load.stats, outcome))
        server.stop()


async def test_task_with_suppressed_notification_is_applied_by_the_sweep(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """7. Tasks inserted with triggers off (session_replication_role = replica: no NOTIFY) are
    applied by the safety sweep within one SWEEP_INTERVAL, while other users' traffic flows."""
    sweep = 2.0
    initial = create_users(database_url, [100] * 9)
    ids = list(initial)
    quiet, busy = ids[:5], ids[5:]
    server = servers(SWEEP_INTERVAL=str(sweep))
    await server.start_ready()
    outcome = Outcome("7 notification suppressed", "INSERT with session_replication_role = replica (no trigger)")
    created = await ListenConnection.open(ConnectionOptions(database_url), ["task_created"])
    sql = admin_connection(database_url)
    inserted: list[int] = []
    delays = []
    try:
        with contextlib.closing(sql), sql.cursor() as cur:
            async with ProcessedObserver(database_url) as observer, Load([server.url], lambda i: [busy[i]], 4) as load:
                for user_id in quiet:
                    cur.execute("SET session_replication_role = replica")
                    cur.execute(
                        "INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'replenishment', 5) RETURNING id",
                        (user_id,),
                    )
                    task_id = cur.fetchone()[0]
                    cur.execute("RESET session_replication_role")
                    inserted.append(task_id)
                    delays.append(await _finished_within(server.url, task_id, sweep + 2))
                await load.until_acknowledged(50)
                await load.finish()
                await wait_drained(database_url, observer=observer)
        # No task_created ever named a quiet user: only the sweep could have found their tasks.
        woken = {int(n.payload) for n in created.pending_notifications()}
        assert woken.isdisjoint(quiet), woken
        assert woken & set(busy)
    finally:
        created.close()
    assert "found_missed_work=yes" in server.log_text()
    outcome.notes["inserted_without_notify"] = len(inserted)
    outcome.notes["max_apply_s"] = round(max(delays), 2)
    outcome.sent = len(inserted)
    record(final_check(database_url, initial, load.stats, outcome, observer=observer, extra_acknowledged=inserted))


async def test_exhausted_pool_answers_503_quickly(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """8. Slow requests hold every pooled connection (their INSERTs wait on a row lock held in
    psql); new requests get 503 within POOL_ACQUIRE_TIMEOUT instead of waiting, and everything
    recovers when the lock goes. The slow ones carry Idempotency-Keys: that path inserts on a
    connection of its own per request (plain POSTs share batched INSERTs, which would hold only
    ENQUEUE_MAX_IN_FLIGHT connections however many requests wait)."""
    acquire_timeout = 1.0
    pool_size = 4
    initial = create_users(database_url, [1_000] * 6)
    victim, *others = list(initial)
    server = servers(
        POOL_MIN_SIZE="1",
        POOL_MAX_SIZE=str(pool_size),
        WORKER_CONCURRENCY="1",
        POOL_ACQUIRE_TIMEOUT=str(acquire_timeout),
    )
    await server.start_ready()
    outcome = Outcome("8 pool exhausted", f"psql holds a row lock; {pool_size + 2} requests block on it")
    locker = admin_connection(database_url)
    locker.autocommit = False
    acknowledged: list[int] = []
    answers: dict[str, int] = {}
    with contextlib.closing(locker), locker.cursor() as lock:
        lock.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (victim,))
        slow = [
            asyncio.create_task(_post(server.url, victim, "replenishment", 1, timeout=30, idempotency_key=f"slow-{n}"))
            for n in range(pool_size + 2)
        ]
        await poll(
            lambda: _waiting_on_locks(database_url) >= pool_size, timeout=10, what="the pool held by blocked requests"
        )
        fast: list[tuple[int, Any, float]] = await asyncio.gather(
            *(_post(server.url, others[i % len(others)], "replenishment", 1) for i in range(20))
        )
        reads = await asyncio.gather(*(_timed("GET", server.url + f"/api/v1/user/{others[0]}") for _ in range(5)))
        health = await _timed("GET", server.url + "/health")
        ready = await _timed("GET", server.url + "/ready")
        locker.commit()  # the slow requests go through now
        slow_results = await asyncio.gather(*slow)
    for status, body, seconds in fast + reads:
        assert status == 503, (status, body)
        assert body["error"]["code"] == "database_unavailable"
        assert seconds < acquire_timeout + 1.5, f"a 503 took {seconds:.2f}s"
    assert health[0] == 200 and ready[0] == 503
    slow_statuses = [status for status, _, _ in slow_results]
    # Those that got a connection went through once the lock was released; the rest were refused quickly.
    assert set(slow_statuses) <= {202, 503} and slow_statuses.count(202) >= pool_size - 1, slow_statuses
    acknowledged += [int(body["id"]) for status, body, _ in slow_results if status == 202]
    await poll(lambda: _ready_is(server, 200), timeout=10, what="/ready 200 after the lock went")
    after = [await _post(server.url, user_id, "write-off", 3) for user_id in others]
    for status, body, _ in after:
        assert status == 202, body
        acknowledged.append(int(body["id"]))
    await wait_drained(database_url)
    for status, _, _ in [*fast, *reads, *slow_results, *after]:
        answers[str(status)] = answers.get(str(status), 0) + 1
    outcome.sent = len(fast) + len(reads) + len(slow_results) + len(after)
    outcome.notes["max_503_s"] = round(max(seconds for _, _, seconds in fast + reads), 2)
    outcome.notes["pool_max_size"] = pool_size
    outcome.notes["pool_acquire_timeout_s"] = acquire_timeout
    outcome.answers = answers
    record(final_check(database_url, initial, None, outcome, extra_acknowledged=acknowledged))


def _waiting_on_locks(database_url: str) -> int:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'message_broker' AND wait_event_type = 'Lock'"
        )
        return int(cur.fetchone()[0])


@OWNS_ITS_POSTGRES
async def test_an_outage_is_a_few_log_lines_and_every_503_is_counted(
    servers: Callable[..., ServerProcess], owned_pg: OwnedPostgres, record: Callable[[Outcome], None]
) -> None:
    """10. PostgreSQL stopped for 11 s under load (TCP): thousands of 503s, but the log has the
    first 503 warning and then one line per 5 s window saying how many it stands for (the last
    window's count too, once the outage is over); the lines account for every 503 the clients
    got, and so does /metrics (message_broker_http_errors_total, code database_unavailable)."""
    window = 5.0  # logs.configure_logging's summarize_window
    name = f"mb_outage_{uuid.uuid4().hex[:8]}"
    outcome = Outcome("10 quiet logs in an outage, TCP", "pg_ctl stop -m fast under load, 11 s down, then start")
    with fresh_database(owned_pg.uri(), name) as url:
        server = servers(url=_service_url(owned_pg, "tcp", name))
        await server.start_ready()
        initial = create_users(url, [1_000] * 16)
        ids = list(initial)
        # From here on nothing asks /ready: its 503s are counted under database_unavailable too.
        before = await _unavailable_count(server)
        log_start = len(server.log_text())
        async with Load([server.url], lambda i: [ids[i]], 16, request_timeout=30) as load:
            await load.until_acknowledged(200)
            await asyncio.to_thread(owned_pg.stop)
            down = time.monotonic()
            # The outage lasts 11 s under load: two full windows and a part.
            await asyncio.sleep(11)
            await asyncio.to_thread(owned_pg.start)
            outcome.notes["down_s"] = round(time.monotonic() - down, 2)
            await load.until_acknowledged(len(load.stats.acknowledged) + 300, timeout=30)
        refused = load.stats.statuses[503]
        assert refused >= 200, load.stats.statuses

        def lines() -> list[str]:
            logged = server.log_text()[log_start:].splitlines()
            return [line for line in logged if " WARNING " in line and "status=503" in line]

        # The last window's count is written once that window has passed, with no 503 after it.
        await poll(
            lambda: accounted(lines()) == refused,
            timeout=window + 5,
            what=f"log lines accounting for all {refused} 503s",
            on_fail=lambda: "\n".join(lines()),
        )
        counted = await _unavailable_count(server) - before
        assert counted == refused, f"/metrics counted {counted} 503s, the clients got {refused}"
        outcome.notes["answers_503"] = refused
        outcome.notes["log_lines_503"] = len(lines())
        outcome.notes["metric_503"] = counted
        # The first line, then one per window (the trailing one included), for the time 503s came:
        # the 11 s outage and however long PostgreSQL then took to accept connections again (its
        # "starting up" refusals are 503s too; on a loaded machine that took several seconds).
        first, last = load.stats.answered[503]
        outcome.notes["503s_for_s"] = round(last - first, 2)
        assert len(lines()) <= (last - first) / window + 3, (round(last - first, 2), lines())
        record(final_check(url, initial, load.stats, outcome))
        server.stop()


async def _unavailable_count(server: ServerProcess) -> int:
    _, text = await call("GET", server.url + "/metrics")
    found = samples(text)
    return int(value(found, "message_broker_http_errors_total", default=0, status="503", code="database_unavailable"))
