"""The listener tells a silent path to the database (half-open TCP: bytes swallowed, nothing
closed) from a busy pool: only the first makes the pool abandon its stalled statements."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from message_broker.db.driver import Pool
from message_broker.db.errors import DatabaseUnavailable
from message_broker.db.listener import Listener
from message_broker.db.options import ConnectionOptions

from .. import pg
from ..faults.harness import FaultProxy
from ..helpers import eventually

PROBE_INTERVAL = 0.3
PROBE_TIMEOUT = 0.5


async def test_a_pool_blocked_on_a_lock_is_not_a_silent_path(
    database_url: str,
    sql,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every pooled connection waits on a lock held elsewhere (fault scenario 8), so no probe can
    be sent for many probe timeouts; the LISTEN connection still answers its own round trip, so
    those statements are left alone and go through once the lock goes."""
    caplog.set_level(logging.INFO, logger="message_broker")
    options = ConnectionOptions(database_url)
    pool = await Pool.open(options, min_size=0, max_size=2, acquire_timeout=0.2)
    listener = Listener(options, pool, probe_interval=PROBE_INTERVAL, probe_timeout=PROBE_TIMEOUT, max_backoff=0.2)
    running = asyncio.create_task(listener.run())
    sql.execute("SELECT pg_advisory_lock(4242)")
    locked = True
    try:
        await eventually(lambda: listener.connected, timeout=10, what="the listener hearing")

        async def blocked() -> None:
            async with pool.acquire() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock(4242)")

        waiting = [asyncio.create_task(blocked()) for _ in range(2)]

        def not_sent() -> int:
            return sum("listen probe_not_sent" in r.getMessage() for r in caplog.records)

        # Each miss comes after the statements have waited longer than a probe may take.
        await eventually(
            lambda: not_sent() >= 3 or any(task.done() for task in waiting),
            timeout=15,
            what="three probes the pool could not send",
        )
        assert not [task for task in waiting if task.done()], "a statement blocked on a lock was abandoned"
        sql.execute("SELECT pg_advisory_unlock(4242)")
        locked = False
        await asyncio.wait_for(asyncio.gather(*waiting), timeout=10)  # raises if one was abandoned
        assert listener.silent_paths == 0 and listener.connects == 1
    finally:
        if locked:
            sql.execute("SELECT pg_advisory_unlock(4242)")
        listener.interrupt()
        await running
        await pool.close()


@pytest.mark.parametrize("heal", [False, True], ids=["still-silent", "healed-for-new-connections"])
async def test_a_silent_path_abandons_the_stalled_statements(
    owned_pg: pg.OwnedPostgres, heal: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Pool and LISTEN connection through one proxy that goes silent. Still silent, the probe
    cannot be sent and the LISTEN connection does not answer its own round trip; healed for new
    connections (the ones open stay dead, as in fault scenario 4), the probe goes out on a new one
    and the LISTEN connection misses it. Either way the statement stuck on the dead path fails
    within a few probe timeouts instead of its query timeout (15 s), and an idle connection that
    was on that path is not lent again."""
    caplog.set_level(logging.INFO, logger="message_broker")
    proxy = FaultProxy(owned_pg.socket_path)
    await proxy.start()
    options = ConnectionOptions(f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres", connect_timeout=1.0)
    assert options.query_timeout == 15
    # Healed: nothing idle, so the probe opens a new connection. Still silent: one idle
    # connection for the probe to be stuck on, and one that must be retired.
    pool = await Pool.open(options, min_size=1 if heal else 3, max_size=4, acquire_timeout=2.0)
    listener = Listener(options, pool, probe_interval=PROBE_INTERVAL, probe_timeout=PROBE_TIMEOUT, max_backoff=0.2)
    running = asyncio.create_task(listener.run())
    try:
        await eventually(lambda: listener.connected, timeout=10, what="the listener hearing")
        async with pool.acquire() as conn:
            proxy.stall()
            if heal:
                proxy.heal()
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await conn.execute("SELECT 1")
            failed_after = time.monotonic() - started
        evidence = "it missed a probe the pool sent" if heal else "it did not answer a round trip of its own"
        assert any(f"listen path_silent: {evidence}; abandoned 1 pooled" in r.getMessage() for r in caplog.records), (
            caplog.text
        )
        # Quiet, probe, round trip: about 1.3 s here; the query timeout is 15 s.
        assert failed_after < 6, failed_after
        proxy.heal()
        async with asyncio.timeout(6), pool.acquire() as conn:
            assert await conn.fetch_one("SELECT 1 AS one") == {"one": 1}
    finally:
        listener.interrupt()
        await running
        await pool.close()
        with contextlib.suppress(Exception):
            await proxy.close()
