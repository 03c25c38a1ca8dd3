"""A client that makes and uses database connections through the driver, as fast as it can, for
a while: `python -m tests.faults.churn DSN SECONDS LOOP` (LOOP: uvloop or asyncio).

It runs in a process of its own because what it tests is that the process survives: an abort in
native code under the event loop (uvloop's libuv aborts when a file descriptor it watches was closed
or replaced behind its back) kills the interpreter, which no in-process test could report. Each
worker opens something (a single connection, a LISTEN connection, a pool and its connections), runs
a statement on it, and closes it, over and over; every failure must be one of the driver's own
errors (db.errors), and the event loop's exception handler must never be called. It prints one JSON
line of counts and exits 0, or exits 1 with what went wrong."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections import Counter
from typing import Any

import uvloop

from message_broker.db.driver import ListenConnection, Pool, connect
from message_broker.db.errors import DatabaseError
from message_broker.db.options import ConnectionOptions

WORKERS = 6


async def _single(options: ConnectionOptions) -> None:
    conn = await connect(options)
    try:
        await conn.fetch_one("SELECT 1 AS one")
    finally:
        conn.close()


async def _listen(options: ConnectionOptions) -> None:
    conn = await ListenConnection.open(options, ["task_created"])
    try:
        await conn.execute("SELECT 1")
        await conn.next_notification(timeout=0.01)
    finally:
        conn.close()


async def _pool(options: ConnectionOptions) -> None:
    pool = await Pool.open(options, min_size=0, max_size=3, acquire_timeout=2)
    try:
        for _ in range(3):
            async with pool.acquire() as conn:
                await conn.fetch_one("SELECT 1 AS one")
    finally:
        await pool.close()


OPENERS = (_single, _listen, _pool)


async def churn(dsn: str, seconds: float) -> dict[str, Any]:
    options = ConnectionOptions(dsn, connect_timeout=1, statement_timeout_ms=1000)
    handler_calls: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: handler_calls.append(str(context.get("message"))))
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        n = index
        while time.monotonic() < deadline:
            opener = OPENERS[n % len(OPENERS)]
            n += 1
            try:
                await opener(options)
                outcomes["ok"] += 1
            except DatabaseError as exc:
                outcomes[type(exc).__name__] += 1
            except Exception:
                unexpected.append(traceback.format_exc())
                outcomes["unexpected"] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(i) for i in range(WORKERS)))
    return {"outcomes": dict(outcomes), "unexpected": unexpected[:3], "handler_calls": handler_calls[:5]}


def main(argv: list[str]) -> int:
    dsn, seconds, loop = argv[0], float(argv[1]), argv[2]
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(churn(dsn, seconds))
    print(json.dumps(result), flush=True)
    return 1 if result["unexpected"] or result["handler_calls"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
