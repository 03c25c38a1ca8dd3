"""Scenario 11: a seeded random schedule of faults while 32 clients retry every operation with its
Idempotency-Key until it is answered 2xx: the service killed (-9) or stopped (SIGTERM) and
restarted, every connection of the service terminated, PostgreSQL restarted. Afterwards: the ledger
check, every key answered maps to exactly one task and every task posted to exactly one key, no
500, nothing acknowledged lost.

FAULTS_SEED replays a schedule (the seed is printed, and named in any failure); FAULTS_RANDOM_SECONDS
sets how long faults are injected (75 s)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from message_broker.db.options import dsn_with_database

from ..pg import OwnedPostgres, admin_connection, fresh_database
from .harness import (
    KeyedClients,
    Outcome,
    ServerProcess,
    create_users,
    draw_seed,
    final_check_keyed,
    wait_settled,
)

pytestmark = pytest.mark.faults

CLIENTS = 32
USERS = 16
FAULTS = ("kill -9", "SIGTERM", "connections terminated", "PostgreSQL restarted")


@pytest.mark.direct_only("restarts and terminates a PostgreSQL of its own; scenario 12 covers faults through PgBouncer")
async def test_random_faults_under_retrying_clients(
    servers: Callable[..., ServerProcess], owned_pg: OwnedPostgres, record: Callable[[Outcome], None]
) -> None:
    seed = draw_seed()
    seconds = float(os.environ.get("FAULTS_RANDOM_SECONDS", "75"))
    print(f"\nrandom fault schedule: FAULTS_SEED={seed} FAULTS_RANDOM_SECONDS={seconds:g}")
    try:
        await _scenario(servers, owned_pg, record, seed, seconds)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n(replay this schedule with FAULTS_SEED={seed})") from exc


async def _scenario(
    servers: Callable[..., ServerProcess],
    owned_pg: OwnedPostgres,
    record: Callable[[Outcome], None],
    seed: int,
    seconds: float,
) -> None:
    name = f"mb_random_{uuid.uuid4().hex[:8]}"
    outcome = Outcome(f"11 random faults (seed {seed})", f"a fault every 2.5-5 s for {seconds:g} s, 32 clients")
    rng = random.Random(seed)
    with fresh_database(owned_pg.uri(), name) as url:
        # The service over TCP (uvloop, the default), the test's own connections over the socket.
        server = servers(url=dsn_with_database(owned_pg.tcp_uri(), name))
        await server.start_ready()
        initial = create_users(url, [1_000] * USERS)
        injected: list[str] = []
        kinds: Counter[str] = Counter()
        async with KeyedClients(server.url, list(initial), CLIENTS, seed=seed) as clients:
            await clients.until_answered(200)
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                # The load runs on between faults (a duration, not a wait for something).
                await asyncio.sleep(rng.uniform(2.5, 5.0))
                kind = rng.choice(FAULTS)
                at = time.monotonic() - started
                detail = await _inject(kind, rng, server, owned_pg, name)
                kinds[kind] += 1
                injected.append(f"{at:.1f}s {kind}{f' ({detail})' if detail else ''}")
            answered_during = len(clients.stats.answered)
            # Whatever the last fault was, the service comes back by itself.
            await server.wait_ready(timeout=30)
            await clients.until_answered(answered_during + 200)
            stats = await clients.finish(timeout=60)
        await wait_settled(url)

        outcome.notes = {"seed": seed, "faults": dict(kinds), "injected": injected}
        final_check_keyed(url, initial, stats, outcome)
        record(outcome)
        server.stop()


async def _inject(kind: str, rng: random.Random, server: ServerProcess, owned_pg: OwnedPostgres, database: str) -> Any:
    if kind == "kill -9":
        server.kill()
        server.start()
        return f"ready again in {await server.wait_ready(timeout=30):.1f} s"
    if kind == "SIGTERM":
        code, took = await server.terminate(timeout=15)
        assert code == 0, f"SIGTERM: exit code {code} after {took:.1f} s\n{server.log_tail()}"
        server.start()
        return f"exit 0 in {took:.1f} s, ready again in {await server.wait_ready(timeout=30):.1f} s"
    if kind == "connections terminated":
        return f"{_terminate_service_connections(owned_pg, database)} connections"
    down = rng.uniform(1.0, 3.0)
    await asyncio.to_thread(owned_pg.stop)
    # Down for that long under load (a duration).
    await asyncio.sleep(down)
    await asyncio.to_thread(owned_pg.start)
    return f"down {down:.1f} s"


def _terminate_service_connections(owned_pg: OwnedPostgres, database: str) -> int:
    conn = admin_connection(owned_pg.uri())
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name LIKE 'message_broker%%'",
            (database,),
        )
        return int(cur.fetchone()[0])
