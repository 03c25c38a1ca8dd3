"""A background loop that keeps failing in a running service is visible: /ready answers 503 and
names it, /metrics counts its restarts and says it is down; once it runs again, all is well."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from message_broker.http import keys

from ..helpers import eventually, scrape

RESTARTS = "message_broker_background_restarts_total"
UP = "message_broker_background_up"


async def test_a_failing_loop_shows_in_ready_and_metrics_until_it_runs_again(client: TestClient) -> None:
    tasks = client.server.app[keys.TASKS]
    await eventually(lambda: _ready(client, 200), timeout=10)
    healthy = asyncio.Event()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if not healthy.is_set():
            raise RuntimeError("the extra loop failed")
        await tasks.stopping.wait()

    tasks.start("extra", flaky)

    body = await eventually(lambda: _ready(client, 503), timeout=10)
    assert body["down"] == ["extra"] and body["checks"]["background"] is False, body
    assert body["checks"]["listener"] is True and body["checks"]["database"] is True, body
    samples = await eventually(lambda: _scraped_down(client), timeout=10)
    assert samples[(RESTARTS, (("loop", "extra"),))] >= 1
    assert samples[(UP, (("loop", "listener"),))] == 1  # the others run

    healthy.set()
    body = await eventually(lambda: _ready(client, 200), timeout=10)
    assert body["down"] == [] and body["checks"]["background"] is True, body
    samples = await scrape(client)
    assert samples[(UP, (("loop", "extra"),))] == 1
    restarts = samples[(RESTARTS, (("loop", "extra"),))]
    assert restarts == tasks.restarts["extra"] == runs - 1 >= 1


async def _ready(client: TestClient, status: int) -> Any:
    response = await client.get("/ready")
    body = await response.json()
    return body if response.status == status else None


async def _scraped_down(client: TestClient) -> Any:
    """A scrape taken while the loop waits to be started again, with a restart counted."""
    samples = await scrape(client)
    down = samples.get((UP, (("loop", "extra"),))) == 0
    return samples if down and samples.get((RESTARTS, (("loop", "extra"),)), 0) >= 1 else None
