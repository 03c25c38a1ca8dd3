"""The pool when connections break: a waiter gets the room a broken connection leaves, and a
connect into a dead path gives up within CONNECT_TIMEOUT."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from message_broker.db.driver import Pool
from message_broker.db.errors import DatabaseUnavailable
from message_broker.db.options import ConnectionOptions

from ..helpers import eventually


async def test_a_broken_connection_makes_room_for_a_waiter(database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    pool = await Pool.open(ConnectionOptions(database_url), min_size=0, max_size=2, acquire_timeout=3.0)
    holding = asyncio.Event()
    release = asyncio.Event()
    try:

        async def hold(query: str, *, keep: bool) -> None:
            async with pool.acquire() as conn:
                holding.set()
                with contextlib.suppress(DatabaseUnavailable):
                    await conn.execute(query)
                if keep:
                    await release.wait()

        doomed = asyncio.create_task(hold("SELECT pg_sleep(60)", keep=False))
        await holding.wait()
        holding.clear()
        keeper = asyncio.create_task(hold("SELECT 1", keep=True))
        await holding.wait()
        assert pool.in_use == 2
        waiter = asyncio.create_task(_acquire_once(pool))
        await asyncio.sleep(0)  # let it start waiting
        # Kill the sleeping query's backend: its connection comes back closed, which leaves room
        # for one new connection. The waiter must get it, not wait out its 3 s and fail.
        # (The statement travels after the transaction's limits: "SELECT set_config(...);SELECT pg_sleep(60)".)
        sql.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE '%SELECT pg_sleep(60)' AND pid <> pg_backend_pid()"
        )
        await eventually(lambda: _done(waiter), timeout=2.5)
        assert waiter.result() == 1
        release.set()
        await asyncio.gather(doomed, keeper)
    finally:
        release.set()
        await pool.close()


async def _acquire_once(pool: Pool) -> int:
    async with pool.acquire() as conn:
        row = await conn.fetch_one("SELECT 1 AS one")
    assert row is not None
    return int(row["one"])


async def _done(task: asyncio.Task[int]) -> bool:
    return task.done()


async def test_connecting_into_a_dead_path_gives_up_within_connect_timeout() -> None:
    """A server that accepts TCP and never answers (a hung proxy, a dead path)."""
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    options = ConnectionOptions(f"postgresql://nobody@127.0.0.1:{port}/none", connect_timeout=1.0)
    try:
        # The query limit is 15 s; connecting must give up after CONNECT_TIMEOUT (1 s) instead.
        async with asyncio.timeout(5):
            with pytest.raises(DatabaseUnavailable):
                await Pool.open(options, min_size=1, max_size=2, acquire_timeout=10.0)
    finally:
        for writer in silent:
            writer.close()
        server.close()


@pytest.mark.parametrize(
    ("values", "cast"),
    [
        ([1, -2, 0, 2**63 - 1, -(2**63)], "bigint[]"),
        (["plain", None, 'a "quoted" word', "back\\slash", "NULL", "", "a,b", "{}", " padded ", "é✓"], "text[]"),
        ([], "bigint[]"),
        ([None, None], "text[]"),
    ],
)
async def test_a_list_parameter_arrives_as_the_same_array(database_url: str, values: list[object], cast: str) -> None:
    """Lists travel as one array literal (driver.array_literal): every value must survive."""
    pool = await Pool.open(ConnectionOptions(database_url), min_size=0, max_size=1, acquire_timeout=3.0)
    try:
        async with pool.acquire() as conn:
            row = await conn.fetch_one(f"SELECT %(values)s::{cast} AS got", {"values": values})
    finally:
        await pool.close()
    assert row is not None and row["got"] == values
