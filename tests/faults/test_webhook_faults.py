"""Webhook scenarios W1-W5: the receiver down for 30 s, a receiver slower than the timeout, kill -9
of the service during a burst of deliveries, three processes sharing the work, PostgreSQL
restarted. Each ends with the same check: every finished task (the endpoint is subscribed to
everything) has exactly one delivery row, delivered, and was received at least once with its one
webhook-id, every signature verified by the Standard Webhooks reference library."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import pytest

from ..helpers import call
from ..pg import OwnedPostgres, admin_connection, fresh_database
from ..webhook_receiver import Answer, Receiver
from .harness import Load, Outcome, ServerProcess, create_users, final_check, poll, wait_drained

pytestmark = pytest.mark.faults

CLIENTS = 8
USERS = 8
# Short enough to finish in seconds, long enough (about a minute in all) to ride out 30 s down.
WEBHOOKS = {
    "WEBHOOK_ALLOW_PRIVATE": "true",
    "WEBHOOK_RETRY_SCHEDULE": "1s,2s,4s,8s,15s,15s,15s,15s",
    "WEBHOOK_TIMEOUT": "2",
}


async def _register(server: ServerProcess, receiver: Receiver) -> tuple[str, str]:
    status, body = await call("POST", f"{server.url}/api/v1/webhooks/", {"url": receiver.url})
    assert status == 201, body
    return body["id"], body["secret"]


def _deliveries(database_url: str) -> dict[str, int]:
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM webhook_deliveries GROUP BY status")
        return dict(cur.fetchall())


async def wait_delivered(database_url: str, timeout: float = 120.0) -> float:
    """Until no task and no delivery is pending; the seconds it took."""
    started = time.monotonic()
    await wait_drained(database_url, timeout=60)
    await poll(
        lambda: "pending" not in _deliveries(database_url),
        timeout=timeout,
        interval=0.2,
        what="no delivery pending",
        on_fail=lambda: str(_deliveries(database_url)),
    )
    return time.monotonic() - started


def webhook_check(database_url: str, receiver: Receiver, endpoint_id: str, secret: str, outcome: Outcome) -> None:
    """Every finished task: exactly one delivery row for the endpoint, delivered, and received at
    least once (2xx) with webhook-id msg_<task>_<endpoint> and only that id; every request signed."""
    conn = admin_connection(database_url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT id FROM tasks WHERE status <> 'pending'")
        finished = {row[0] for row in cur.fetchall()}
        cur.execute("SELECT task_id, count(*), min(status), sum(attempts) FROM webhook_deliveries GROUP BY task_id")
        rows = {task_id: (count, status, attempts) for task_id, count, status, attempts in cur.fetchall()}
        cur.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
        assert cur.fetchone() == (0,)
    assert set(rows) == finished, f"finished tasks without a delivery: {sorted(finished - set(rows))[:10]}"
    assert all(count == 1 for count, _, _ in rows.values()), "a task with two delivery rows"
    assert {status for _, status, _ in rows.values()} == {"delivered"}
    events = receiver.verify_all(secret)  # raises on any request whose signature does not verify
    ids_of_task: dict[str, set[str]] = defaultdict(set)
    for request, event in zip(receiver.received, events, strict=True):
        ids_of_task[event["data"]["id"]].add(request.webhook_id)
    for task_id, ids in ids_of_task.items():
        assert ids == {f"msg_{task_id}_{endpoint_id}"}, (task_id, ids)
    received = {int(task_id) for task_id in receiver.task_ids()}
    assert received == finished, f"never received: {sorted(finished - received)[:10]}"
    accepted = receiver.ids()
    outcome.notes |= {
        "tasks_finished": len(finished),
        "requests": len(receiver.received),
        "received_2xx": sum(accepted.values()),
        "received_more_than_once": sum(1 for n in accepted.values() if n > 1),
        "attempts": sum(attempts for _, _, attempts in rows.values()),
    }


async def _burst(server_urls: list[str], ids: list[int], acknowledged: int) -> Load:
    async with Load(server_urls, lambda i: [ids[i % len(ids)]], CLIENTS) as load:
        await load.until_acknowledged(acknowledged)
    return load


async def test_receiver_down_for_30_s_then_back(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """W1. The receiver refuses connections for 30 s while tasks finish; once it is back, every
    event arrives, each under its one id."""
    outcome = Outcome("W1 webhook receiver down 30 s", "receiver stopped for 30 s during a burst, then started")
    receiver = await Receiver().start()
    try:
        initial = create_users(database_url, [1_000] * USERS)
        server = servers(**WEBHOOKS)
        await server.start_ready()
        endpoint_id, secret = await _register(server, receiver)
        await receiver.stop()
        down = time.monotonic()
        load = await _burst([server.url], list(initial), 300)
        await wait_drained(database_url)
        # Down for 30 s (a duration, the scenario's premise), while every attempt fails.
        await asyncio.sleep(max(0.0, 30 - (time.monotonic() - down)))
        await receiver.start()
        outcome.notes["down_s"] = round(time.monotonic() - down, 1)
        outcome.notes["all_delivered_after_s"] = round(await wait_delivered(database_url), 1)
        final_check(database_url, initial, load.stats, outcome)
        webhook_check(database_url, receiver, endpoint_id, secret, outcome)
        assert outcome.notes["attempts"] > outcome.notes["tasks_finished"]  # the failures were retried
        record(outcome)
    finally:
        await receiver.stop()


async def test_receiver_slower_than_the_timeout(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """W2. The receiver answers the first 40 requests after 3 s (the timeout is 2 s): those attempts
    fail and are made again under the same id; everything is delivered."""
    outcome = Outcome("W2 webhook receiver past timeout", "40 answers after 3 s with WEBHOOK_TIMEOUT=2")
    receiver = await Receiver().start()
    receiver.next_answers = [Answer(200, delay=3) for _ in range(40)]
    try:
        initial = create_users(database_url, [1_000] * USERS)
        server = servers(**WEBHOOKS)
        await server.start_ready()
        endpoint_id, secret = await _register(server, receiver)
        load = await _burst([server.url], list(initial), 200)
        outcome.notes["all_delivered_after_s"] = round(await wait_delivered(database_url), 1)
        final_check(database_url, initial, load.stats, outcome)
        webhook_check(database_url, receiver, endpoint_id, secret, outcome)
        assert outcome.notes["received_more_than_once"] > 0  # the slow answers came after the sender gave up
        record(outcome)
    finally:
        await receiver.stop()


async def test_kill_9_during_a_burst_of_deliveries(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """W3. kill -9 of the service while deliveries are in flight; restarted, it sends what was
    left once the dead process's leases end."""
    outcome = Outcome("W3 kill -9 during webhook deliveries", "SIGKILL with deliveries in flight, then a restart")
    receiver = await Receiver().start()
    receiver.answer = Answer(200, delay=0.05)  # deliveries take a while: many in flight
    try:
        initial = create_users(database_url, [1_000] * USERS)
        server = servers(**WEBHOOKS)
        await server.start_ready()
        endpoint_id, secret = await _register(server, receiver)
        load = await _burst([server.url], list(initial), 400)
        await poll(lambda: len(receiver.received) >= 20, timeout=30, what="some deliveries made")
        server.kill()
        outcome.notes["received_before_kill"] = len(receiver.received)
        outcome.notes["pending_at_kill"] = _deliveries(database_url).get("pending", 0)
        assert outcome.notes["pending_at_kill"] > 0
        server.start()
        await server.wait_ready()
        outcome.notes["all_delivered_after_s"] = round(await wait_delivered(database_url), 1)
        final_check(database_url, initial, load.stats, outcome)
        webhook_check(database_url, receiver, endpoint_id, secret, outcome)
        record(outcome)
    finally:
        await receiver.stop()


async def test_three_processes_share_the_deliveries(
    servers: Callable[..., ServerProcess], database_url: str, record: Callable[[Outcome], None]
) -> None:
    """W4. Three processes on one database: each delivery is claimed by one of them, so a receiver
    that always answers 200 gets every event exactly once."""
    outcome = Outcome("W4 webhooks from three processes", "three service processes, load spread over them")
    receiver = await Receiver().start()
    try:
        initial = create_users(database_url, [1_000] * USERS)
        three = [servers(**WEBHOOKS) for _ in range(3)]
        for server in three:
            await server.start_ready()
        endpoint_id, secret = await _register(three[0], receiver)
        load = await _burst([s.url for s in three], list(initial), 600)
        outcome.notes["all_delivered_after_s"] = round(await wait_delivered(database_url), 1)
        final_check(database_url, initial, load.stats, outcome)
        webhook_check(database_url, receiver, endpoint_id, secret, outcome)
        assert outcome.notes["received_more_than_once"] == 0
        assert outcome.notes["attempts"] == outcome.notes["tasks_finished"]
        record(outcome)
    finally:
        await receiver.stop()


async def test_postgresql_restarted_during_deliveries(
    servers: Callable[..., ServerProcess], owned_pg: OwnedPostgres, record: Callable[[Outcome], None]
) -> None:
    """W5. PostgreSQL stopped for 3 s and started while deliveries are under way."""
    outcome = Outcome("W5 PostgreSQL restarted, webhooks", "pg_ctl stop -m fast during deliveries, 3 s, start")
    receiver = await Receiver().start()
    receiver.answer = Answer(200, delay=0.05)
    name = f"mb_webhooks_{uuid.uuid4().hex[:8]}"
    try:
        with fresh_database(owned_pg.uri(), name) as url:
            server = servers(url=url, **WEBHOOKS)
            await server.start_ready()
            initial = create_users(url, [1_000] * USERS)
            endpoint_id, secret = await _register(server, receiver)
            load = await _burst([server.url], list(initial), 300)
            await poll(lambda: len(receiver.received) >= 20, timeout=30, what="some deliveries made")
            await asyncio.to_thread(owned_pg.stop)
            down = time.monotonic()
            await asyncio.sleep(3)  # the outage's length: the scenario's premise
            await asyncio.to_thread(owned_pg.start)
            outcome.notes["down_s"] = round(time.monotonic() - down, 1)
            outcome.notes["all_delivered_after_s"] = round(await wait_delivered(url), 1)
            final_check(url, initial, load.stats, outcome)
            webhook_check(url, receiver, endpoint_id, secret, outcome)
            record(outcome)
            server.stop()
    finally:
        await receiver.stop()
