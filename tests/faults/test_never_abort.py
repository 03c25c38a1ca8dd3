"""Scenario 12: the service never exits on its own. Its connections to PostgreSQL go through the
tests' fault proxy, which changes every 20-200 ms between letting connections through, closing them
at once or during the start-up, resetting them, refusing them, swallowing their bytes and resetting
every open one, while 16 clients use the whole API with Idempotency-Keys; on uvloop's event loop and
on asyncio's. Before the driver kept the loop's registrations in step with libpq's socket, uvloop's
libuv aborted the process ("Fatal Python error: Aborted"). The harness fails any scenario in which a
service process exits that the scenario did not stop (checked here on itself first)."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ..pg import OwnedPostgres, fresh_database
from .harness import (
    FaultProxy,
    KeyedClients,
    Outcome,
    ServerProcess,
    create_users,
    draw_seed,
    final_check_keyed,
    http_status,
    poll,
    server_factory,
    wait_settled,
)

pytestmark = pytest.mark.faults

CYCLE_S = float(os.environ.get("FAULTS_CYCLE_S", "20"))


async def test_the_harness_fails_a_scenario_whose_process_exits_on_its_own(tmp_path: Path, database_url: str) -> None:
    """A process that dies by a signal nobody in the scenario sent fails the scenario at its end,
    with its exit status and log; one the scenario killed itself does not."""
    exits = pytest.raises(AssertionError, match=r"exited on its own with status -6")
    with exits as raised, server_factory(tmp_path, database_url) as make:
        died, killed = make("dies"), make("killed")
        await died.start_ready()
        await killed.start_ready()
        assert died.proc is not None
        os.kill(died.proc.pid, signal.SIGABRT)  # as libuv's abort() would
        await poll(lambda: died.proc is not None and died.proc.poll() is not None, timeout=10, what="exit")
        killed.kill()
    assert "killed1" not in str(raised.value)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_connections_faulted_every_few_milliseconds_never_stop_the_service(
    servers: Callable[..., ServerProcess], owned_pg: OwnedPostgres, loop: str, record: Callable[[Outcome], None]
) -> None:
    seed = draw_seed()
    print(f"seed {seed} (FAULTS_SEED={seed} replays it)")
    proxy = FaultProxy(owned_pg.socket_path, seed=seed)
    await proxy.start()
    name = f"mb_abort_{uuid.uuid4().hex[:8]}"
    outcome = Outcome(
        f"14 connection faults, {loop}", "close, close in start-up, reset, refuse, silence, reset-all every 20-200 ms"
    )
    try:
        with fresh_database(owned_pg.uri(), name) as direct_url:
            server = servers(url=f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}", EVENT_LOOP=loop)
            await server.start_ready(timeout=30)
            initial = create_users(direct_url, [10_000] * 8)
            async with KeyedClients(server.url, list(initial), 16, seed=seed, request_timeout=10) as load:
                await load.until_answered(50)
                done = await proxy.cycle(CYCLE_S, seed=seed)
                await poll(
                    lambda: http_status(server.url + "/ready"), timeout=30, interval=0.2, what="/ready answering"
                )
                answered = len(load.stats.answered)
                await load.until_answered(answered + 50, timeout=60)
                stats = await load.finish(timeout=60)
            outcome.notes["settle_s"] = round(await wait_settled(direct_url, timeout=60), 2)
            assert server.proc is not None and server.proc.poll() is None, server.log_tail()
            outcome.notes |= {
                "proxy_changes": dict(done),
                "connections": dict(proxy.connections),
                "aborts": server.aborts(),
                "seed": seed,
            }
            assert server.aborts() == 0, server.log_tail()
            record(final_check_keyed(direct_url, initial, stats, outcome))
            server.stop()
    finally:
        await proxy.close()
