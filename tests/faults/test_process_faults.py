"""Scenarios 1, 2 and 6: the server process killed, stopped, and run three times over."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from ..pg import admin_connection
from .harness import (
    Load,
    Outcome,
    ProcessedObserver,
    ServerProcess,
    create_users,
    final_check,
    pending_count,
    poll,
    wait_drained,
)

pytestmark = pytest.mark.faults

CLIENTS = 32
USERS = 16


async def test_kill_9_under_load_loses_nothing(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """1. kill -9 while 32 clients post; restart; everything acknowledged is applied exactly once."""
    initial = create_users(database_url, [1_000] * USERS)
    ids = list(initial)
    server = servers()
    await server.start_ready()
    outcome = Outcome("1 kill -9 under load", "SIGKILL of the server while 32 clients post, then a restart")
    async with ProcessedObserver(database_url) as observer:
        async with Load([server.url], lambda i: [ids[i % USERS]], CLIENTS) as load:
            await load.until_acknowledged(400)
            # Kill while work is queued, so the restart has something to finish.
            await poll(lambda: pending_count(database_url) > 0, timeout=10, what="tasks pending under load")
            server.kill()
            outcome.notes["acknowledged_before_kill"] = len(load.stats.acknowledged)
            outcome.notes["pending_at_kill"] = pending_count(database_url)
            refused_before = sum(load.stats.errors.values())
            # The clients keep going and find nobody listening.
            await poll(lambda: sum(load.stats.errors.values()) >= refused_before + CLIENTS, timeout=10)
            server.start()
            outcome.notes["restart_to_ready_s"] = round(await server.wait_ready(), 2)
            await load.until_acknowledged(len(load.stats.acknowledged) + 400)
        outcome.notes["drain_s"] = round(await wait_drained(database_url, observer=observer), 2)
    record(final_check(database_url, initial, load.stats, outcome, observer=observer))


async def test_sigterm_under_load_exits_cleanly_and_loses_nothing(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """2. SIGTERM under the same load: exit 0 within 10 s, nothing lost; a restart finishes the rest."""
    initial = create_users(database_url, [1_000] * USERS)
    ids = list(initial)
    quiet = create_users(database_url, [0] * 8, prefix="quiet")
    initial |= quiet
    server = servers(SWEEP_INTERVAL="600")
    await server.start_ready()
    outcome = Outcome("2 SIGTERM under load", "SIGTERM of the server while 32 clients post, then a restart")
    async with ProcessedObserver(database_url) as observer:
        async with Load([server.url], lambda i: [ids[i % USERS]], CLIENTS) as load:
            await load.until_acknowledged(400)
            # A backlog for users nobody is working on, and nobody was told about (no NOTIFY, no
            # sweep in this server's lifetime): it is all still pending when the server has
            # stopped, and the restart's start-up scan must finish it.
            backlog = _insert_backlog(database_url, list(quiet), per_user=500)
            code, seconds = await server.terminate(timeout=15)
            assert code == 0, f"exit code {code} after {seconds:.1f}s\n{server.log_tail()}"
            assert seconds < 10, f"took {seconds:.1f}s to exit"
            outcome.notes["exit_code"] = code
            outcome.notes["exit_s"] = round(seconds, 2)
            outcome.notes["pending_after_exit"] = pending_count(database_url)
            assert outcome.notes["pending_after_exit"] >= len(backlog), "the restart should have work left"
            refused_before = sum(load.stats.errors.values())
            await poll(lambda: sum(load.stats.errors.values()) >= refused_before + CLIENTS, timeout=10)
            server.start()
            await server.wait_ready()
            await load.until_acknowledged(len(load.stats.acknowledged) + 400)
        outcome.notes["drain_s"] = round(await wait_drained(database_url, observer=observer), 2)
    assert "stopped" in server.log_text()
    outcome.notes["backlog_inserted"] = len(backlog)
    outcome.sent += len(backlog)
    record(final_check(database_url, initial, load.stats, outcome, observer=observer, extra_acknowledged=backlog))
    # Graceful: every request the server had begun was answered (none stored without its 202).
    assert outcome.stored_unacknowledged == 0


def _insert_backlog(database_url: str, user_ids: list[int], per_user: int) -> list[int]:
    """Replenishments of 1 for every user, inserted with triggers off (no task_created)."""
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        cur.execute(
            "INSERT INTO tasks (user_id, type, amount)"
            " SELECT u, 'replenishment', 1 FROM unnest(%s::bigint[]) AS u, generate_series(1, %s)"
            " RETURNING id",
            (user_ids, per_user),
        )
        return [row[0] for row in cur.fetchall()]


async def test_three_servers_on_one_database_apply_each_task_once_in_order(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """6. Three processes behind round-robin clients: exactly-once, and each user's tasks in the
    order its client sent them (every client owns one user and waits for each 202)."""
    clients = 24
    initial = create_users(database_url, [500] * clients)
    ids = list(initial)
    trio = [servers(f"s{i}-") for i in range(3)]
    for server in trio:
        server.start()
    await asyncio.gather(*(server.wait_ready() for server in trio))
    outcome = Outcome("6 three servers, one database", "3 server processes; each request to the next one")
    started = time.monotonic()
    async with ProcessedObserver(database_url) as observer:
        async with Load([s.url for s in trio], lambda i: [ids[i]], clients) as load:
            await load.until_acknowledged(1_500)
        outcome.notes["drain_s"] = round(await wait_drained(database_url, observer=observer), 2)
    outcome.notes["load_s"] = round(time.monotonic() - started, 1)
    for server in trio:
        code, _ = await server.terminate()
        assert code == 0
    # Every process took its share of the requests.
    outcome.notes["acknowledged_per_server"] = [load.stats.acknowledged_by_url[s.url] for s in trio]
    assert all(load.stats.acknowledged_by_url[s.url] > 100 for s in trio), outcome.notes
    record(final_check(database_url, initial, load.stats, outcome, observer=observer, sequential_users=set(ids)))
