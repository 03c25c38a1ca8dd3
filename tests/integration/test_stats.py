"""GET /api/v1/stats, the figures the operator console shows: their shape, that they follow the
work, and that the pending count is shared for a second and null when it fails."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiohttp.test_utils import TestClient

from message_broker.db import repository
from message_broker.db.errors import QueryTimeout

from ..helpers import create_user, eventually, post_task, wait_processed


async def stats(client: TestClient) -> dict:  # type: ignore[type-arg]
    response = await client.get("/api/v1/stats")
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    return await response.json()  # type: ignore[no-any-return]


async def test_stats_shape_and_figures_follow_the_work(client: TestClient) -> None:
    async def listening() -> dict | None:  # type: ignore[type-arg]
        figures = await stats(client)
        return figures if figures["listener"] else None

    before = await eventually(listening, timeout=10)  # the LISTEN connection comes up after start-up
    assert set(before) == {
        "time",
        "window_seconds",
        "series",
        "pending",
        "latency_ms",
        "active_user_loops",
        "database",
        "listener",
    }
    assert before["window_seconds"] == 300
    assert {name: len(series) for name, series in before["series"].items()} == {
        "accepted": 300,
        "applied": 300,
        "cancelled": 300,
    }
    assert all(sum(series) == 0 for series in before["series"].values())
    assert before["pending"] == 0 and before["latency_ms"] == {"p50": None, "p99": None}
    assert before["database"] is True and before["listener"] is True
    assert abs((datetime.fromisoformat(before["time"]) - datetime.now(UTC)).total_seconds()) < 5

    user = await create_user(client, "counted", 10)
    tasks = [
        await post_task(client, user["id"], "replenishment", 5),
        await post_task(client, user["id"], "write-off", 100),  # cancelled
        await post_task(client, user["id"], "write-off", 15),
    ]
    for task in tasks:
        await wait_processed(client, task["id"])

    async def counted() -> dict | None:  # type: ignore[type-arg]
        after = await stats(client)
        sums = {name: sum(series) for name, series in after["series"].items()}
        return after if sums == {"accepted": 3, "applied": 2, "cancelled": 1} else None

    after = await eventually(counted, timeout=5)
    assert after["latency_ms"]["p50"] is not None and 0 < after["latency_ms"]["p50"] <= after["latency_ms"]["p99"]
    assert after["latency_ms"]["p99"] < 10_000
    assert isinstance(after["active_user_loops"], int)


async def test_the_pending_count_is_shared_for_a_second(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    count_pending = repository.count_pending

    async def counting(pool, timeout):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # long enough for the others to arrive while it runs
        return await count_pending(pool, timeout)

    monkeypatch.setattr(repository, "count_pending", counting)
    answers = await asyncio.gather(*(stats(client) for _ in range(8)))
    assert calls == 1 and {a["pending"] for a in answers} == {0}
    await stats(client)
    assert calls == 1  # within the second: the same figure
    await asyncio.sleep(1.05)
    user = await create_user(client, "later", 0)
    await wait_processed(client, (await post_task(client, user["id"], "replenishment", 1))["id"])
    await stats(client)
    assert calls == 2


async def test_a_failed_count_is_null_while_the_database_still_answers(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def too_slow(pool, timeout):  # type: ignore[no-untyped-def]
        raise QueryTimeout("canceling statement due to statement timeout")

    monkeypatch.setattr(repository, "count_pending", too_slow)
    figures = await stats(client)
    assert figures["pending"] is None and figures["database"] is True
