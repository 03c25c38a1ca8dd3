"""What migration 0003 (numbering finishing transactions in commit order) costs the apply path.

Applies the same pending tasks on two fresh databases: one with migration 0001 only and the
original finish_tasks statement ("before"), one with every migration and the current statement
("after"), alternating, several rounds. Needs a PostgreSQL that lets us create databases:

    .venv/bin/python tests/bench/finish_order_cost.py postgresql://root@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
import uuid

import psycopg2

from message_broker.db import migrate as migrations
from message_broker.db import queries, repository
from message_broker.db.connector import ConnectionOptions, Pool, dsn_with_database

# The statement as it was before migration 0003 (from the first commit of sql/queries.sql).
_ORIGINAL_QUERIES = subprocess.run(
    ["git", "show", "7544e6b:sql/queries.sql"], capture_output=True, text=True, check=True
).stdout


async def _apply_all(dsn: str, users: int, batch: int, concurrency: int) -> float:
    pool = await Pool.open(ConnectionOptions(dsn), min_size=concurrency, max_size=concurrency + 2, acquire_timeout=30)
    slots = asyncio.Semaphore(concurrency)

    async def drain(user_id: int) -> None:
        while True:
            async with slots:
                if not await repository.apply_pending_batch(pool, user_id, batch):
                    return

    started = time.perf_counter()
    await asyncio.gather(*(drain(u) for u in range(1, users + 1)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return elapsed


async def run(admin_dsn: str, after: bool, users: int, per_user: int, batch: int) -> float:
    name = f"mb_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    dsn = dsn_with_database(admin_dsn, name)
    every = migrations.available_migrations()
    try:
        migrations.available_migrations = lambda: every if after else every[:1]  # type: ignore[assignment]
        await migrations.migrate(ConnectionOptions(dsn))
        queries.all_queries.cache_clear()
        if not after:
            queries.all_queries()["finish_tasks"] = queries.parse(_ORIGINAL_QUERIES)["finish_tasks"]
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute(
            "INSERT INTO users (username, balance) SELECT 'u' || g, 1000000 FROM generate_series(1, %s) g", (users,)
        )
        cur.execute(
            "INSERT INTO tasks (user_id, type, amount) SELECT u, 'write-off', 1 "
            "FROM generate_series(1, %s), generate_series(1, %s) AS u",
            (per_user, users),
        )
        cur.execute("VACUUM ANALYZE")
        elapsed = await _apply_all(dsn, users, batch, concurrency=6)
        cur.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
        assert cur.fetchone()[0] == 0
        conn.close()
        return users * per_user / elapsed
    finally:
        migrations.available_migrations = lambda: every  # type: ignore[assignment]
        queries.all_queries.cache_clear()
        admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


async def main(admin_dsn: str) -> None:
    for users, per_user, batch in ((20, 4000, 500), (2000, 1, 500)):
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for after in (False, True):
                rates[after].append(await run(admin_dsn, after, users, per_user, batch))
        print(
            f"{users} users x {per_user} tasks, batches of {batch}: "
            f"before {statistics.median(rates[False]):,.0f} tasks/s, after {statistics.median(rates[True]):,.0f} "
            f"(runs: {[round(r) for r in rates[False]]} vs {[round(r) for r in rates[True]]})",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://root@127.0.0.1:5432/postgres"))
