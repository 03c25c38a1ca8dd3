"""The statements phase of `make bench`: one user with 1,000,000 finished tasks; `balance?at` at
1,000 random times (p99), a 100,000-entry statement streamed as JSON and as CSV (entries/s and the
server's RSS while it streams), and `message-broker verify` over the whole database (tasks/s)."""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp

from ..audit import verify
from ..db.options import ConnectionOptions
from ..db.queries import named_queries
from .procs import Server, cpu_seconds, rss_bytes

if TYPE_CHECKING:
    from . import __main__ as bench_main

HISTORY = 1_000_000
STATEMENT_ENTRIES = 100_000
LOOKUPS = 1_000


def _sql(name: str) -> str:
    return named_queries("bench.sql")[name]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def statements_phase(bench: bench_main.Bench, database: str, figures: Any, say: Any, maintain: Any) -> None:
    say(f"statements: one user with {HISTORY:,} finished tasks")
    async with bench.sql(database) as conn:
        user = await conn.fetch_one(_sql("history_user"))
        assert user is not None
        start: datetime = user["created_at"] + timedelta(seconds=1)
        await conn.execute(_sql("history_tasks"), {"user_id": user["id"], "n": HISTORY, "start": start})
        await maintain(conn, "vacuum_all")
    end = start + timedelta(milliseconds=HISTORY)
    server = bench.server(database)
    await server.start()
    try:
        result: dict[str, Any] = {"tasks": HISTORY}
        result["balance_at"] = await _lookups(server, user["id"], start, end)
        lookups = result["balance_at"]
        say(
            f"  balance?at: p50 {lookups['p50_ms']:.2f} ms, p99 {lookups['p99_ms']:.2f} ms, "
            f"server CPU {lookups['server_cpu_ms']:.2f} ms each"
        )
        window = (start + timedelta(milliseconds=400_000), start + timedelta(milliseconds=400_000 + STATEMENT_ENTRIES))
        for kind in ("json", "csv"):
            result[kind] = await _statement(server, user["id"], window, kind)
            say(
                f"  statement ({kind}): {result[kind]['entries_per_s']:,.0f} entries/s "
                f"({result[kind]['entries_per_cpu_s']:,.0f} per server CPU second), RSS "
                f"{result[kind]['rss_before'] / 2**20:.1f} -> peak {result[kind]['rss_peak'] / 2**20:.1f} MiB"
            )
    finally:
        await server.stop()
    lines: list[str] = []
    report = await verify(ConnectionOptions(bench.dsn(database)), out=lines.append)
    result["verify"] = {
        "tasks": report.tasks,
        "seconds": report.seconds,
        "per_s": report.rate,
        "problems": report.problems,
    }
    say(f"  {lines[-1]}")
    figures.statements = result


async def _lookups(server: Server, user_id: int, start: datetime, end: datetime) -> dict[str, float]:
    """Client-measured round trips over one kept-alive connection: an upper bound of the server's time."""
    span = (end - start).total_seconds()
    times = []
    cpu_before = cpu_seconds(server.pid)
    async with aiohttp.ClientSession(base_url=server.url) as session:
        for _ in range(LOOKUPS):
            at = start + timedelta(seconds=random.uniform(0, span))
            began = time.perf_counter()
            async with session.get(f"/api/v1/user/{user_id}/balance", params={"at": at.isoformat()}) as response:
                assert response.status == 200, await response.text()
                await response.read()
            times.append((time.perf_counter() - began) * 1000)
    # The server's CPU per answer says what it costs whatever else runs on the machine.
    cpu_ms = (cpu_seconds(server.pid) - cpu_before) / LOOKUPS * 1000
    return {"p50_ms": _percentile(times, 0.5), "p99_ms": _percentile(times, 0.99), "server_cpu_ms": cpu_ms}


async def _statement(server: Server, user_id: int, window: tuple[datetime, datetime], kind: str) -> dict[str, float]:
    params = {"from": window[0].isoformat(), "to": window[1].isoformat(), "format": kind}
    rss_before = peak = rss_bytes(server.pid)
    cpu_before = cpu_seconds(server.pid)
    received = 0
    began = time.perf_counter()
    async with (
        aiohttp.ClientSession(base_url=server.url) as session,
        session.get(f"/api/v1/user/{user_id}/statement", params=params) as response,
    ):
        assert response.status == 200, await response.text()
        last_sample = 0.0
        async for chunk in response.content.iter_chunked(1 << 16):
            received += len(chunk)
            if time.perf_counter() - last_sample > 0.02:
                peak = max(peak, rss_bytes(server.pid))
                last_sample = time.perf_counter()
    seconds = time.perf_counter() - began
    cpu = cpu_seconds(server.pid) - cpu_before
    return {
        "seconds": seconds,
        # Entries per second of the server's CPU: the rate one free core would stream at.
        "entries_per_cpu_s": STATEMENT_ENTRIES / cpu if cpu > 0 else 0.0,
        "bytes": received,
        "entries_per_s": STATEMENT_ENTRIES / seconds,
        "rss_before": rss_before,
        "rss_peak": peak,
    }
