"""Helpers shared by the tests: polling with a deadline, and API shortcuts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll `probe` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last result: {result!r})")
        await asyncio.sleep(interval)


async def create_user(client: TestClient, username: str, balance: int) -> dict[str, Any]:
    response = await client.post("/api/v1/user/", json={"username": username, "balance": balance})
    assert response.status == 201, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def post_task(client: TestClient, user_id: str, task_type: str, amount: int) -> dict[str, Any]:
    response = await client.post(f"/api/v1/user/{user_id}/amount/", json={"type": task_type, "amount": amount})
    assert response.status == 202, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def wait_processed(client: TestClient, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        response = await client.get(f"/api/v1/task/{task_id}")
        task = await response.json()
        return task if task["status"] != "pending" else None

    return await eventually(finished, timeout=timeout)
