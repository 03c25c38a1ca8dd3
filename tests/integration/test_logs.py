"""Structured logs: one key=value line per batch at DEBUG, one per problem at WARNING."""

from __future__ import annotations

import logging
import re

import pytest
from aiohttp.test_utils import TestClient

from message_broker.http import keys

from ..helpers import create_user, eventually, post_task, wait_processed


async def test_one_debug_line_per_batch(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="message_broker")
    user = await create_user(client, "logged", 0)
    await wait_processed(client, (await post_task(client, user["id"], "replenishment", 3))["id"])

    def debug_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]

    # The worker logs its batch once the COMMIT has come back to it, which a client reading the
    # task can see first.
    await eventually(
        lambda: any(re.fullmatch(r"batch applied users=1 tasks=1 ms=[\d.]+", line) for line in debug_lines()),
        timeout=5,
        what="the apply's debug line",
        on_fail=lambda: str(debug_lines()),
    )
    assert any(re.fullmatch(r"batch done kind=enqueue items=1 ms=[\d.]+", line) for line in debug_lines())


async def test_a_lost_listen_connection_is_one_warning(  # type: ignore[no-untyped-def]
    client: TestClient, sql, caplog: pytest.LogCaptureFixture
) -> None:
    listener = client.server.app[keys.LISTENER]
    await eventually(lambda: listener.connected, timeout=5)
    caplog.set_level(logging.WARNING, logger="message_broker")
    sql.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    await eventually(lambda: listener.connects == 2, timeout=10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if w.startswith("listen lost error=")]) == 1, warnings
    assert any(re.fullmatch(r"listen reconnected backend_pid=\d+", w) for w in warnings), warnings
