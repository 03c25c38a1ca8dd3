"""Money first: while the apply has a backlog, the webhook sender claims no new deliveries, for at
most WEBHOOK_GIVE_WAY seconds at a stretch, and sends again as soon as the apply has caught up. In
the sender's own process (the service's lines on its stdin) and inline: the supervisor's backlog,
the cap, and the release."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

import aiohttp
import psycopg2
import psycopg2.extensions
import pytest
from aiohttp.test_utils import TestClient

from message_broker.db.driver import Pool
from message_broker.db.options import ConnectionOptions
from message_broker.http import keys
from message_broker.worker.tasks import BackgroundTasks
from message_broker.worker.webhooks import SenderSettings, WebhookSender

from ..conftest import MakeClient
from ..helpers import create_user, eventually, post_task, scrape, value, wait_processed, waits_for_a_lock_on
from ..webhook_receiver import Receiver
from .test_webhooks import _client, deliveries, insert_endpoint, register

MODES = ["process", "inline"]


async def _sending(client: TestClient, receiver: Receiver) -> dict[str, Any]:
    """Register the receiver and see one event arrive: the sender (a child started) is running."""
    hook = await register(client, receiver.url)
    warm = await create_user(client, "warm", 0)
    await post_task(client, warm["id"], "replenishment", 1)
    await eventually(lambda: len(receiver.received) == 1, timeout=15, what="the first event")
    return hook


@pytest.mark.parametrize("mode", MODES)
async def test_the_events_of_a_users_backlog_are_sent_once_it_is_applied(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor, mode: str
) -> None:
    # Five tasks per apply transaction: a user with 300 stored at once has a full batch in each
    # of 60 transactions, a backlog until the last of them.
    client = await _client(make_client, webhook_sender=mode, batch_size=5, webhook_give_way=60.0)
    await _sending(client, receiver)
    user = await create_user(client, "queued", 0)
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount) SELECT %s, 'replenishment', 1 FROM generate_series(1, 300)",
        (int(user["id"]),),
    )
    await _sent_after_the_backlog(client, receiver, sql, 301, first_transaction=5)


async def test_the_events_of_many_users_backlog_are_sent_once_it_is_applied(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    # One user per apply transaction and one transaction at a time: the 200 users with tasks that
    # the start-up scan finds wait in line, a backlog until the last of them is applied. (Inline:
    # a sender in a process of its own may start after such a short backlog.)
    first = await _client(make_client, webhook_sender="inline")
    await _sending(first, receiver)
    await first.close()
    sql.execute("INSERT INTO users (username, balance) SELECT 'queued-' || i, 0 FROM generate_series(1, 200) AS i")
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount)"
        " SELECT id, 'replenishment', 1 FROM users WHERE username LIKE 'queued-%'"
    )
    client = await _client(
        make_client, webhook_sender="inline", worker_concurrency=1, apply_max_users=1, webhook_give_way=60.0
    )
    await _sent_after_the_backlog(client, receiver, sql, 201, first_transaction=1)


async def _sent_after_the_backlog(
    client: TestClient, receiver: Receiver, sql: psycopg2.extensions.cursor, events: int, first_transaction: int
) -> None:
    """Every event arrived, and none before the backlog was applied but those of its first
    transaction (the backlog is known once that one ends, and its events may already be claimed)."""
    await eventually(lambda: len(receiver.received) == events, timeout=60, what="every event")
    await eventually(lambda: _none_pending(sql), timeout=10, what="every result recorded")
    supervisor = client.server.app[keys.SUPERVISOR]
    assert supervisor.backlogs >= 1 and not supervisor.backlogged
    assert value(await scrape(client), "message_broker_apply_backlog") == 0
    sql.execute(
        "SELECT count(*) FILTER (WHERE a.attempted_at < (SELECT max(processed_at) FROM tasks))"
        " FROM webhook_attempts AS a JOIN webhook_deliveries AS d ON d.id = a.delivery_id"
        " WHERE d.task_id > (SELECT min(id) FROM tasks)"  # all but the first task's, sent before
    )
    (early,) = sql.fetchone()
    # Without giving way, most went out while the rest was applied.
    assert early <= first_transaction


def _none_pending(sql: psycopg2.extensions.cursor) -> bool:
    sql.execute("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
    return sql.fetchone()[0] == 0  # type: ignore[index,no-any-return]


@pytest.mark.parametrize("mode", MODES)
async def test_a_backlog_holds_events_back_at_most_webhook_give_way_seconds(
    make_client: MakeClient, receiver: Receiver, mode: str
) -> None:
    client = await _client(make_client, webhook_sender=mode, webhook_give_way=3.0)
    await _sending(client, receiver)
    sender = client.server.app[keys.WEBHOOK_SENDER]
    user = await create_user(client, "held", 0)
    held_at = time.monotonic()
    # As the supervisor says when a backlog begins; this one never ends.
    sender.give_way(True)
    await post_task(client, user["id"], "replenishment", 2)
    await eventually(lambda: len(receiver.received) == 2, timeout=15, what="the held event")
    assert time.monotonic() - held_at >= 3.0
    # Held back at most half the time: another backlog right after that one is not waited for.
    sender.give_way(False)
    sender.give_way(True)
    sent_at = time.monotonic()
    await post_task(client, user["id"], "replenishment", 3)
    await eventually(lambda: len(receiver.received) == 3, timeout=15, what="the next event")
    assert time.monotonic() - sent_at < 3.0


@pytest.mark.parametrize("mode", MODES)
async def test_held_events_go_as_soon_as_the_apply_has_caught_up(
    make_client: MakeClient, receiver: Receiver, mode: str
) -> None:
    client = await _client(make_client, webhook_sender=mode, webhook_give_way=60.0)
    hook = await _sending(client, receiver)
    sender = client.server.app[keys.WEBHOOK_SENDER]
    user = await create_user(client, "released", 0)
    sender.give_way(True)
    task = await post_task(client, user["id"], "replenishment", 3)
    await wait_processed(client, task["id"])
    released = datetime.now().astimezone()
    sender.give_way(False)
    # Long before the 60 s the hold could last.
    await eventually(lambda: len(receiver.received) == 2, timeout=10, what="the released event")
    (delivery,) = await eventually(
        lambda: _delivered(client, hook["id"], task["id"]), timeout=10, what="its result recorded"
    )
    assert datetime.fromisoformat(delivery["attempts"][0]["attempted_at"]) >= released


async def _delivered(client: TestClient, hook_id: str, task_id: str) -> list[dict[str, Any]]:
    return [d for d in await deliveries(client, hook_id, "?status=delivered") if d["task_id"] == task_id]


async def test_what_a_claim_under_way_when_the_backlog_begins_takes_goes_back(
    database_url: str, sql: psycopg2.extensions.cursor
) -> None:
    """A claim waits for the database (here for a lock; in the service, behind the apply's load)
    while the backlog begins: its snapshot may hold the backlog's deliveries, and a sender in a
    process of its own hears of the backlog late. What it claimed is given back, uncounted, not
    sent; it used to go out beside the backlog."""
    sql.execute("INSERT INTO users (username, balance) VALUES ('held-back', 0) RETURNING id")
    (user_id,) = sql.fetchone()
    sql.execute("INSERT INTO tasks (user_id, type, amount) VALUES (%s, 'replenishment', 1) RETURNING id", (user_id,))
    (task_id,) = sql.fetchone()
    endpoint_id = insert_endpoint(sql, "http://127.0.0.1:9/hook")
    sql.execute(
        "INSERT INTO webhook_deliveries (endpoint_id, task_id, event_type) VALUES (%s, %s, 'task.done')",
        (endpoint_id, task_id),
    )
    pool = await Pool.open(ConnectionOptions(database_url), min_size=1, max_size=2, acquire_timeout=5)
    settings = SenderSettings(
        timeout=1.0, retry_delays=(1.0,), disable_after=60.0, concurrency=1, allow_private=True, max_wait=30.0,
        give_way=60.0,
    )  # fmt: skip
    sender = WebhookSender(pool, BackgroundTasks(), settings, dump_task=lambda task: {}, encode_json=json.dumps)
    other = psycopg2.connect(database_url)
    try:
        other.cursor().execute("LOCK TABLE webhook_endpoints IN ACCESS EXCLUSIVE MODE")
        async with aiohttp.ClientSession() as session:
            claim = asyncio.create_task(sender._claim(session))
            await eventually(waits_for_a_lock_on(sql, "webhook_endpoints"), timeout=10, what="the claim waits")
            sender.give_way(True)
            other.commit()
            assert await claim == 0.0
            assert not sender._running and not any(sender._queued.values())
            await asyncio.gather(*sender._releasing)
            # The next look holds back for the backlog.
            assert await sender._claim(session) > 50
    finally:
        other.close()
        await pool.close()
    sql.execute("SELECT status, attempts FROM webhook_deliveries WHERE endpoint_id = %s", (endpoint_id,))
    assert sql.fetchall() == [("pending", 0)]
