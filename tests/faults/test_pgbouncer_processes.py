"""Scenario 12: many service processes through PgBouncer in transaction pooling.

8 processes (a pool of 4 each: 32 client connections) share 20 server connections of a PgBouncer
of the scenario's own; each process's LISTEN connection goes to PostgreSQL directly
(LISTEN_DATABASE_URL). 32 clients retry every operation with its Idempotency-Key until it is
answered 2xx, a failed attempt going to the next process. Midway one process is killed (-9) and
started again, then PgBouncer is restarted (every client connection through it dropped at once).
Afterwards: every key one task, the ledgers exact, no 500, every process ready."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from ..pg import free_port
from ..pgbouncer import bouncer
from .harness import (
    KeyedClients,
    Outcome,
    ServerProcess,
    create_users,
    draw_seed,
    final_check_keyed,
    wait_settled,
)

pytestmark = [pytest.mark.faults, pytest.mark.pgbouncer]

PROCESSES = 8
POOL_SIZE = 4
SERVER_CONNECTIONS = 20
CLIENTS = 32
USERS = 16


async def test_eight_processes_through_pgbouncer_survive_a_kill_and_a_pgbouncer_restart(
    servers: Callable[..., ServerProcess], database_url: str, pg_admin_dsn: str, record: Callable[[Outcome], None]
) -> None:
    seed = draw_seed()
    outcome = Outcome(
        "15 8 processes via PgBouncer",
        f"{PROCESSES} processes x pool {POOL_SIZE} on {SERVER_CONNECTIONS} server connections, "
        f"{CLIENTS} clients; kill -9 + restart, PgBouncer restart",
    )
    with bouncer.running(pg_admin_dsn, free_port(), pool_size=SERVER_CONNECTIONS) as pooler:
        fleet = [
            servers(
                url=pooler.routed(database_url),
                LISTEN_DATABASE_URL=database_url,
                POOL_MIN_SIZE="1",
                POOL_MAX_SIZE=str(POOL_SIZE),
                WORKER_CONCURRENCY="2",
                ENQUEUE_MAX_IN_FLIGHT="2",
            )
            for _ in range(PROCESSES)
        ]
        for server in fleet:
            server.start()
        await asyncio.gather(*(server.wait_ready(timeout=60) for server in fleet))
        initial = create_users(database_url, [1_000] * USERS)
        started = time.monotonic()
        async with KeyedClients([s.url for s in fleet], list(initial), CLIENTS, seed=seed) as clients:
            await clients.until_answered(300, timeout=60)
            victim = fleet[3]
            victim.kill()
            victim.start()
            ready_after_kill = await victim.wait_ready(timeout=60)
            await clients.until_answered(len(clients.stats.answered) + 300, timeout=60)
            restarted_at = time.monotonic()
            await asyncio.to_thread(pooler.restart)
            await clients.until_answered(len(clients.stats.answered) + 300, timeout=60)
            first_after_restart = clients.stats.first_answer_after(restarted_at)
            stats = await clients.finish(timeout=60)
        outcome.seconds = round(time.monotonic() - started, 1)
        await wait_settled(database_url)
        # Every process ready at the end: the pool through the restarted PgBouncer, the listener
        # hearing its probe again.
        await asyncio.gather(*(server.wait_ready(timeout=60) for server in fleet))
        pools = pooler.admin("SHOW POOLS")

    outcome.notes = {
        "seed": seed,
        "ready_after_kill_s": round(ready_after_kill, 2),
        "first_2xx_after_pgbouncer_restart_s": round(first_after_restart - restarted_at, 2)
        if first_after_restart
        else None,
        "pgbouncer_pools": len(pools),
    }
    final_check_keyed(database_url, initial, stats, outcome)
    assert stats.statuses[500] == 0, stats.answers()
    record(outcome)
