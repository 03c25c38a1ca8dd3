"""Webhooks end to end: endpoints registered over HTTP, tasks finished by the real workers, events
POSTed to a real receiver, every signature verified by the Standard Webhooks reference library
(`standardwebhooks`), retries, Retry-After, 410, rotation, replay, the delivery log and its purge."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

import psycopg2.extensions
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks import Webhook, WebhookVerificationError

from message_broker.db.webhooks import purge_deliveries
from message_broker.http import keys
from message_broker.worker.housekeeping import PURGE_WEBHOOK_DELIVERIES, Purge

from ..conftest import MakeClient
from ..helpers import create_user, eventually, post_task, scrape, value, wait_processed
from ..pg import free_port
from ..webhook_receiver import Answer, Received, Receiver


async def _client(make_client: MakeClient, **overrides: Any) -> TestClient:
    # The production SWEEP_INTERVAL: every wake-up here must come from a notification or the
    # sender's own timer, never from the periodic re-read.
    # The sender in its own process, as `serve` runs it: the wake-ups and results go through pipes.
    settings = {
        "webhook_allow_private": True,
        "webhook_timeout": 5.0,
        "sweep_interval": 30.0,
        "webhook_sender": "process",
    }
    return await make_client(**{**settings, **overrides})


def insert_endpoint(sql: psycopg2.extensions.cursor, url: str) -> int:
    """An endpoint for task.done written straight to the database (past the API's checks)."""
    sql.execute(
        "INSERT INTO webhook_endpoints (url, events, secret) VALUES (%s, ARRAY['task.done'], %s) RETURNING id",
        (url, b"k" * 32),
    )
    return sql.fetchone()[0]  # type: ignore[index,no-any-return]


async def register(client: TestClient, url: str, **fields: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/webhooks/", json={"url": url, **fields})
    assert response.status == 201, await response.text()
    body = await response.json()
    assert response.headers["Location"] == f"/api/v1/webhooks/{body['id']}"
    return body  # type: ignore[no-any-return]


async def deliveries(client: TestClient, webhook_id: str, query: str = "") -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/webhooks/{webhook_id}/deliveries/{query}")
    assert response.status == 200, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def settled(client: TestClient, webhook_id: str, count: int) -> list[dict[str, Any]]:
    """The delivery log once it has `count` deliveries and none pending (results are recorded
    just after the receiver answers)."""

    async def probe() -> list[dict[str, Any]]:
        log = await deliveries(client, webhook_id)
        return log if len(log) == count and all(d["status"] != "pending" for d in log) else []

    return await eventually(probe, timeout=10, what=f"{count} deliveries settled")


async def test_every_finished_task_is_delivered_once_signed_with_the_task_as_the_api_shows_it(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    client = await _client(make_client)
    hook = await register(client, receiver.url, description="all of them")
    assert hook["events"] == ["task.done", "task.cancelled"] and hook["status"] == "enabled"
    assert hook["secret"].startswith("whsec_") and len(hook["secret"]) == len("whsec_") + 44
    user = await create_user(client, "hooked", 100)
    other = await create_user(client, "other", 0)
    done = await post_task(client, user["id"], "replenishment", 50)
    cancelled = await post_task(client, user["id"], "write-off", 1000)
    response = await client.post(f"/api/v1/user/{user['id']}/transfer/", json={"to": other["id"], "amount": 30})
    transfer = await response.json()
    finished = [await wait_processed(client, t["id"]) for t in (done, cancelled, transfer)]
    # The transfer's credit is a task of its own (transfer-in), finished in the same transaction.
    sql.execute("SELECT id FROM tasks WHERE type = 'transfer-in'")
    (credit_id,) = sql.fetchone()
    expected = {t["id"] for t in finished} | {str(credit_id)}

    await eventually(lambda: receiver.task_ids() == expected, timeout=15, what="every event received")
    events = receiver.verify_all(hook["secret"])
    assert receiver.ids() == {f"msg_{task_id}_{hook['id']}": 1 for task_id in expected}
    for request, event in zip(receiver.received, events, strict=True):
        task_response = await client.get(f"/api/v1/task/{event['data']['id']}")
        as_api = await task_response.json()
        assert event == {"type": f"task.{as_api['status']}", "timestamp": as_api["processed_at"], "data": as_api}
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["User-Agent"] == "message_broker"
        assert request.headers["webhook-signature"].count("v1,") == 1
    # One delivery row per task, all delivered, each with its attempt.
    log = await settled(client, hook["id"], len(expected))
    assert sorted(d["task_id"] for d in log) == sorted(expected)
    assert [d["id"] for d in log] == sorted((d["id"] for d in log), reverse=True)  # newest first
    for d in log:
        assert d["status"] == "delivered" and d["attempt_count"] == 1 and d["next_attempt_at"] is None
        assert [a["http_status"] for a in d["attempts"]] == [200] and d["attempts"][0]["error"] is None
        assert d["webhook_id"] == f"msg_{d['task_id']}_{hook['id']}"
    got = await (await client.get(f"/api/v1/webhooks/{hook['id']}")).json()
    assert "secret" not in got and got["deliveries"] == {"pending": 0, "delivered": 4, "failed": 0}
    samples = await eventually(lambda: _scraped(client, "delivered", 4), timeout=5)
    assert value(samples, "message_broker_webhook_lag_seconds_count") == 4


async def _scraped(client: TestClient, result: str, count: int) -> Any:
    samples = await scrape(client)
    return samples if value(samples, "message_broker_webhook_deliveries_total", 0, result=result) >= count else None


async def test_every_answer_carrying_an_endpoint_has_its_deliveries_by_status(
    make_client: MakeClient, receiver: Receiver
) -> None:
    """POST's 201, PATCH's 200 and rotate-secret's 200 had no `deliveries` object, which GET has,
    the README's 201 shows, and the OpenAPI document now requires of every webhook."""
    client = await _client(make_client)
    hook = await register(client, receiver.url)
    assert hook["deliveries"] == {"pending": 0, "delivered": 0, "failed": 0}
    user = await create_user(client, "counted", 0)
    task = await post_task(client, user["id"], "replenishment", 1)
    await eventually(lambda: task["id"] in receiver.task_ids(), timeout=15)
    await settled(client, hook["id"], 1)
    got = await (await client.get(f"/api/v1/webhooks/{hook['id']}")).json()
    assert got["deliveries"] == {"pending": 0, "delivered": 1, "failed": 0}

    patched = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"description": "counted"})
    assert patched.status == 200, await patched.text()
    body = await patched.json()
    assert body == {**got, "description": "counted", "updated_at": body["updated_at"]}
    rotated = await client.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret")
    assert rotated.status == 200, await rotated.text()
    body = await rotated.json()
    assert body == {**got, "description": "counted", "updated_at": body["updated_at"], "secret": body["secret"]}
    assert set(hook) == set(body)  # the 201 and rotate-secret's 200: GET's fields and the secret

    spec = await (await client.get("/api/v1/openapi.json")).json()
    assert "deliveries" in spec["components"]["schemas"]["Webhook"]["required"]


async def test_an_endpoint_gets_only_the_events_it_subscribed_to_and_none_while_disabled(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    client = await _client(make_client)
    hook = await register(client, receiver.url, events=["task.cancelled"])
    user = await create_user(client, "picky", 10)
    done = await post_task(client, user["id"], "replenishment", 5)
    cancelled = await post_task(client, user["id"], "write-off", 500)
    await wait_processed(client, done["id"])
    await wait_processed(client, cancelled["id"])
    await eventually(lambda: receiver.task_ids() == {cancelled["id"]}, timeout=15)
    sql.execute("SELECT task_id, event_type FROM webhook_deliveries")
    assert sql.fetchall() == [(int(cancelled["id"]), "task.cancelled")]

    response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": "disabled"})
    body = await response.json()
    assert response.status == 200 and body["status"] == "disabled" and body["disabled_reason"] == "manual"
    again = await post_task(client, user["id"], "write-off", 500)
    await wait_processed(client, again["id"])
    sql.execute("SELECT count(*) FROM webhook_deliveries")
    assert sql.fetchone() == (1,)  # nothing for a task finished while it was disabled

    # Enabled again (README: "While an endpoint is disabled"), it gets what finishes from then on,
    # not the gap; a replay from the moment it was disabled (its updated_at then) recovers that.
    response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": "enabled"})
    assert response.status == 200
    later = await post_task(client, user["id"], "write-off", 500)
    await eventually(lambda: later["id"] in receiver.task_ids(), timeout=15)
    sql.execute("SELECT count(*) FROM webhook_deliveries WHERE task_id = %s", (int(again["id"]),))
    assert sql.fetchone() == (0,) and again["id"] not in receiver.task_ids()
    response = await client.post(f"/api/v1/webhooks/{hook['id']}/replay", json={"since": body["updated_at"]})
    assert response.status == 202, await response.text()
    await eventually(lambda: again["id"] in receiver.task_ids(), timeout=15, what="the gap replayed")
    assert cancelled["id"] in receiver.task_ids() and receiver.ids()[f"msg_{cancelled['id']}_{hook['id']}"] == 1


async def test_a_replay_from_the_disable_recovers_a_task_whose_transaction_spanned_it(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor, database_url: str
) -> None:
    """The README's recipe for a disabled endpoint's gap (enable, replay from its updated_at) also
    recovers the events of a transaction that started before the disable and committed after it:
    its batch's finished_at (the transaction's start) is before updated_at, out of the replay's
    reach, so the commit queues them (pending until the endpoint is enabled)."""
    client = await _client(make_client)
    hook = await register(client, receiver.url)
    user = await create_user(client, "spanning", 10)
    lock = psycopg2.connect(database_url)
    try:
        # The apply's commit queues the deliveries (a deferred trigger): it waits here, its
        # transaction (and its batch's finished_at) begun before the disable.
        lock.cursor().execute("LOCK TABLE webhook_deliveries IN SHARE MODE")
        task = await post_task(client, user["id"], "replenishment", 5)
        await eventually(lambda: _count_waiting_apply(sql) == 1, timeout=10, what="the apply waiting at its commit")
        response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": "disabled"})
        disabled = await response.json()
        assert response.status == 200 and disabled["status"] == "disabled"
        lock.commit()
    finally:
        lock.close()
    await wait_processed(client, task["id"])
    response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": "enabled"})
    assert response.status == 200
    response = await client.post(f"/api/v1/webhooks/{hook['id']}/replay", json={"since": disabled["updated_at"]})
    assert response.status == 202, await response.text()
    await eventually(lambda: task["id"] in receiver.task_ids(), timeout=15, what="the spanning task's event")
    receiver.verify_all(hook["secret"])


def _count_waiting_apply(sql: psycopg2.extensions.cursor) -> int:
    """Transactions that have written tasks and wait for a lock on webhook_deliveries."""
    sql.execute(
        "SELECT count(*) FROM pg_locks AS w JOIN pg_locks AS h ON h.pid = w.pid"
        " AND h.relation = 'tasks'::regclass AND h.mode = 'RowExclusiveLock' AND h.granted"
        " WHERE NOT w.granted AND w.relation = 'webhook_deliveries'::regclass"
        # The whole server's locks, and every test database has the same table oids (one template).
        " AND w.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return int(sql.fetchone()[0])  # type: ignore[index]


async def test_failures_are_retried_with_the_same_id_until_delivered(
    make_client: MakeClient, receiver: Receiver
) -> None:
    client = await _client(make_client, webhook_retry_schedule="0.1s,0.1s,0.1s")
    hook = await register(client, receiver.url)
    receiver.next_answers = [Answer(500), Answer(302, {"Location": receiver.url}), Answer(404)]
    user = await create_user(client, "retried", 0)
    task = await post_task(client, user["id"], "replenishment", 1)
    await eventually(lambda: receiver.accepted(), timeout=15, what="delivered after three failures")
    assert [r.status for r in receiver.received] == [500, 302, 404, 200]
    assert {r.webhook_id for r in receiver.received} == {f"msg_{task['id']}_{hook['id']}"}
    # Each attempt is signed afresh (its own timestamp), and every one verifies.
    receiver.verify_all(hook["secret"])
    (delivery,) = await settled(client, hook["id"], 1)
    assert delivery["status"] == "delivered" and delivery["attempt_count"] == 4
    assert [a["http_status"] for a in delivery["attempts"]] == [500, 302, 404, 200]
    assert "redirects are not followed" in delivery["attempts"][1]["error"]
    samples = await eventually(lambda: _scraped(client, "retry", 3), timeout=5)
    assert value(samples, "message_broker_webhook_deliveries_total", result="delivered") == 1


async def test_after_the_schedule_a_delivery_fails_and_a_retry_sends_it_again(
    make_client: MakeClient, receiver: Receiver
) -> None:
    client = await _client(make_client, webhook_retry_schedule="0.05s")
    hook = await register(client, receiver.url)
    receiver.answer = Answer(500)
    user = await create_user(client, "failing", 0)
    await post_task(client, user["id"], "replenishment", 1)

    async def failed() -> list[dict[str, Any]]:
        return await deliveries(client, hook["id"], "?status=failed")

    (delivery,) = await eventually(failed, timeout=15, what="failed after the schedule")
    assert delivery["attempt_count"] == 2 and len(receiver.received) == 2
    assert await deliveries(client, hook["id"], "?status=pending") == []

    receiver.answer = Answer(204)
    pending_one = await client.post(f"/api/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/retry")
    assert pending_one.status == 202, await pending_one.text()
    seen: list[dict[str, Any]] = []

    async def delivered_again() -> bool:
        if receiver.accepted():
            return True
        seen[:] = await deliveries(client, hook["id"])
        return False

    await eventually(
        delivered_again,
        timeout=15,
        what="delivered after the retry",
        on_fail=lambda: f"deliveries: {seen}; received: {receiver.received}",
    )
    (delivery,) = await settled(client, hook["id"], 1)
    assert delivery["attempt_count"] == 3
    again = await client.post(f"/api/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/retry")
    assert again.status == 409 and (await again.json())["error"]["code"] == "webhook_delivery_not_failed"
    missing = await client.post(f"/api/v1/webhooks/{hook['id']}/deliveries/999999/retry")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "webhook_delivery_not_found"


async def test_410_gone_disables_the_endpoint(make_client: MakeClient, receiver: Receiver) -> None:
    client = await _client(make_client)
    hook = await register(client, receiver.url)
    receiver.answer = Answer(410)
    user = await create_user(client, "gone", 0)
    await post_task(client, user["id"], "replenishment", 1)

    async def disabled() -> Any:
        body = await (await client.get(f"/api/v1/webhooks/{hook['id']}")).json()
        return body if body["status"] == "disabled" else None

    body = await eventually(disabled, timeout=15)
    assert body["disabled_reason"] == "gone" and body["deliveries"]["failed"] == 1
    assert len(receiver.received) == 1
    # Enabled again, it gets what finishes from then on.
    response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": "enabled"})
    assert (await response.json())["disabled_reason"] is None
    receiver.answer = Answer(200)
    task = await post_task(client, user["id"], "replenishment", 2)
    await eventually(lambda: task["id"] in receiver.task_ids(), timeout=15)


async def test_retry_after_on_429_is_honoured(make_client: MakeClient, receiver: Receiver) -> None:
    client = await _client(make_client, webhook_retry_schedule="10m")
    hook = await register(client, receiver.url)
    receiver.next_answers = [Answer(429, {"Retry-After": "1"})]
    user = await create_user(client, "throttled", 0)
    await post_task(client, user["id"], "replenishment", 1)
    # The schedule says 10 minutes; the receiver said 1 second.
    await eventually(lambda: receiver.accepted(), timeout=15, what="delivered after Retry-After")
    assert [r.status for r in receiver.received] == [429, 200]
    (delivery,) = await settled(client, hook["id"], 1)
    assert delivery["attempts"][0]["error"] == "HTTP 429"


async def test_an_answer_whose_body_stalls_is_judged_by_its_status(make_client: MakeClient) -> None:
    # The status line comes at once; the body drips for longer than the timeout. The answer is
    # the status: 200 is delivered with no error, 500 is "HTTP 500" (not "no answer").
    statuses = [500, 200]

    async def dripping(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=statuses.pop(0))
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                await response.write(b"x")
                await asyncio.sleep(0.1)
        return response

    app = web.Application()
    app.router.add_post("/hook", dripping)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        client = await _client(make_client, webhook_timeout=1.0, webhook_retry_schedule="0.1s")
        hook = await register(client, f"http://127.0.0.1:{port}/hook")
        user = await create_user(client, "dripping", 0)
        await post_task(client, user["id"], "replenishment", 1)
        (delivery,) = await settled(client, hook["id"], 1)
        assert delivery["status"] == "delivered", delivery
        assert [(a["http_status"], a["error"]) for a in delivery["attempts"]] == [(500, "HTTP 500"), (200, None)]
    finally:
        await runner.cleanup()


async def test_every_delivery_during_a_rotation_carries_both_signatures(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    client = await _client(make_client)
    hook = await register(client, receiver.url)
    user = await create_user(client, "rotating", 0)
    first = await post_task(client, user["id"], "replenishment", 1)
    await eventually(lambda: first["id"] in receiver.task_ids(), timeout=15)

    response = await client.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret")
    assert response.status == 200, await response.text()
    new_secret = (await response.json())["secret"]
    assert new_secret != hook["secret"] and new_secret.startswith("whsec_")
    second = await post_task(client, user["id"], "replenishment", 2)
    await eventually(lambda: second["id"] in receiver.task_ids(), timeout=15)
    during = receiver.received[-1]
    assert during.headers["webhook-signature"].count("v1,") == 2
    # A receiver that knows only one of the two keys accepts it.
    _verify_one(during, new_secret)
    _verify_one(during, hook["secret"])

    # Once the overlap is over (24 h; moved here), only the new key signs.
    sql.execute("UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 s'")
    third = await post_task(client, user["id"], "replenishment", 3)
    await eventually(lambda: third["id"] in receiver.task_ids(), timeout=15)
    after = receiver.received[-1]
    assert after.headers["webhook-signature"].count("v1,") == 1
    _verify_one(after, new_secret)
    with pytest.raises(AssertionError):
        _verify_one(after, hook["secret"])
    # Every request verifies with one key or the other.
    receiver.verify_all(hook["secret"], new_secret)


def _verify_one(request: Received, secret: str) -> None:
    try:
        Webhook(secret).verify(request.body, request.headers)
    except WebhookVerificationError as exc:
        raise AssertionError(str(exc)) from exc


async def test_replay_sends_the_events_again_with_their_original_ids(
    make_client: MakeClient, receiver: Receiver
) -> None:
    client = await _client(make_client)
    hook = await register(client, receiver.url)
    user = await create_user(client, "replayed", 0)
    tasks = [await post_task(client, user["id"], "replenishment", n) for n in (1, 2, 3)]
    ids = {t["id"] for t in tasks}
    await eventually(lambda: receiver.task_ids() == ids, timeout=15)
    first_ids = receiver.ids()
    # A replay queues again what is delivered: the results are recorded (just after the answers).
    await settled(client, hook["id"], 3)

    response = await client.post(f"/api/v1/webhooks/{hook['id']}/replay", json={"since": "2000-01-01T00:00:00Z"})
    assert response.status == 202, await response.text()
    assert (await response.json())["queued"] == 3
    await eventually(lambda: len(receiver.accepted()) == 6, timeout=15)
    assert receiver.ids() == {webhook_id: 2 for webhook_id in first_ids}
    receiver.verify_all(hook["secret"])
    log = await settled(client, hook["id"], 3)  # still one row per event
    # Keyset pages, newest first, with the next page's Link.
    response = await client.get(f"/api/v1/webhooks/{hook['id']}/deliveries/?limit=2")
    first_page = await response.json()
    assert [d["id"] for d in first_page] == [d["id"] for d in log[:2]]
    assert response.headers["Link"] == (
        f'</api/v1/webhooks/{hook["id"]}/deliveries/?limit=2&before={log[1]["id"]}>; rel="next"'
    )
    rest = await deliveries(client, hook["id"], f"?limit=2&before={log[1]['id']}")
    assert [d["id"] for d in rest] == [log[2]["id"]]


async def test_every_attempt_across_replays_and_retries_is_logged_numbered_in_order(
    make_client: MakeClient, receiver: Receiver
) -> None:
    """A replay used to set the delivery's attempts back to 0: its attempts took the numbers 1, 2,
    ... again and the log dropped them (the old attempt 1, a 204, stood for the replay's first
    500). Now the attempts count on over the delivery's whole life, every one is in the log, and
    the retry schedule starts again for each replay; a manual retry is one attempt."""
    client = await _client(make_client, webhook_retry_schedule="0.05s,0.05s")  # 3 attempts a schedule
    hook = await register(client, receiver.url)
    receiver.answer = Answer(204)
    user = await create_user(client, "replayed-failing", 0)
    task = await post_task(client, user["id"], "replenishment", 1)
    await eventually(lambda: receiver.accepted(), timeout=15, what="delivered")
    (delivery,) = await settled(client, hook["id"], 1)
    assert delivery["status"] == "delivered" and delivery["attempt_count"] == 1

    async def ended(status: str, count: int) -> dict[str, Any]:
        """The delivery once no longer pending (a replay and a retry make it pending at once)."""

        async def probe() -> dict[str, Any] | None:
            (d,) = await deliveries(client, hook["id"])
            return d if d["status"] != "pending" else None

        d = await eventually(probe, timeout=15, what="the delivery settled")
        assert (d["status"], d["attempt_count"], len(d["attempts"])) == (status, count, count), d
        return d

    def logged(d: dict[str, Any]) -> list[tuple[int, int]]:
        return [(a["attempt"], a["http_status"]) for a in d["attempts"]]

    async def replay() -> None:
        response = await client.post(f"/api/v1/webhooks/{hook['id']}/replay", json={"since": "2000-01-01T00:00:00Z"})
        assert response.status == 202 and (await response.json())["queued"] == 1

    async def retry() -> None:
        response = await client.post(f"/api/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/retry")
        assert response.status == 202, await response.text()

    # A replay of the delivered event, to a receiver now failing: the whole schedule again.
    receiver.answer = Answer(500)
    await replay()
    delivery = await ended("failed", 4)
    assert logged(delivery) == [(1, 204), (2, 500), (3, 500), (4, 500)]
    assert [r.status for r in receiver.received] == [204, 500, 500, 500]

    # A manual retry of the failed delivery: one attempt, numbered on; failed again.
    await retry()
    delivery = await ended("failed", 5)
    assert logged(delivery)[4:] == [(5, 500)] and len(receiver.received) == 5
    receiver.answer = Answer(204)
    await retry()
    delivery = await ended("delivered", 6)
    assert logged(delivery)[5:] == [(6, 204)]

    # A second replay starts the schedule again (three attempts, not one past its end).
    receiver.answer = Answer(500)
    await replay()
    delivery = await ended("failed", 9)
    assert logged(delivery) == [(1, 204), (2, 500), (3, 500), (4, 500), (5, 500), (6, 204)] + [
        (n, 500) for n in (7, 8, 9)
    ]
    assert [r.status for r in receiver.received] == [204, 500, 500, 500, 500, 204, 500, 500, 500]
    assert {r.webhook_id for r in receiver.received} == {f"msg_{task['id']}_{hook['id']}"}
    receiver.verify_all(hook["secret"])


async def test_deleting_an_endpoint_drops_its_pending_deliveries(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    client = await _client(make_client, webhook_retry_schedule="1h")
    hook = await register(client, receiver.url)
    receiver.answer = Answer(500)
    user = await create_user(client, "deleted", 0)
    await post_task(client, user["id"], "replenishment", 1)
    await eventually(lambda: receiver.received, timeout=15)
    sql.execute("SELECT status FROM webhook_deliveries")
    assert sql.fetchall() == [("pending",)]
    samples = await scrape(client)
    assert value(samples, "message_broker_webhook_pending_deliveries", endpoint=hook["id"]) == 1
    response = await client.delete(f"/api/v1/webhooks/{hook['id']}")
    assert response.status == 204
    sql.execute("SELECT (SELECT count(*) FROM webhook_deliveries), (SELECT count(*) FROM webhook_attempts)")
    assert sql.fetchone() == (0, 0)
    assert (await client.get(f"/api/v1/webhooks/{hook['id']}")).status == 404
    samples = await scrape(client)
    assert value(samples, "message_broker_webhook_pending_deliveries", 0, endpoint=hook["id"]) == 0


async def test_enabling_a_disabled_endpoint_sends_its_pending_deliveries_at_once(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    """README: PATCH {"status": "enabled"} resumes it, pending deliveries first: a delivery that
    waits for its next retry (an hour here) is due at once, not at that retry. Enabling an endpoint
    that is enabled moves nothing: its failures keep their pauses."""
    client = await _client(make_client, webhook_retry_schedule="1h")
    hook = await register(client, receiver.url)
    receiver.answer = Answer(500)
    user = await create_user(client, "resumed", 0)
    await post_task(client, user["id"], "replenishment", 1)

    def retry_in_an_hour() -> bool:
        sql.execute("SELECT status, next_attempt_at > now() + interval '40 minutes' FROM webhook_deliveries")
        return sql.fetchall() == [("pending", True)]

    await eventually(retry_in_an_hour, timeout=15, what="the failed attempt recorded, the next in an hour")
    response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": "enabled"})
    assert response.status == 200 and retry_in_an_hour()
    receiver.answer = Answer(200)
    for status in ("disabled", "enabled"):
        response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": status})
        assert response.status == 200, await response.text()
    (delivery,) = await settled(client, hook["id"], 1)
    assert delivery["status"] == "delivered"
    assert [r.status for r in receiver.received] == [500, 200]


async def test_an_endpoint_failing_for_webhook_disable_after_is_disabled(
    make_client: MakeClient, receiver: Receiver
) -> None:
    client = await _client(make_client, webhook_retry_schedule="0.2s,0.2s,0.2s,0.2s,0.2s", webhook_disable_after=0.5)
    hook = await register(client, receiver.url)
    receiver.answer = Answer(503)
    user = await create_user(client, "failing-long", 0)
    await post_task(client, user["id"], "replenishment", 1)

    async def disabled() -> Any:
        body = await (await client.get(f"/api/v1/webhooks/{hook['id']}")).json()
        return body if body["status"] == "disabled" else None

    body = await eventually(disabled, timeout=15, what="disabled after failing for 0.5 s")
    assert body["disabled_reason"] == "failing"
    # Several attempts, all failed, spanning at least WEBHOOK_DISABLE_AFTER.
    (delivery,) = await deliveries(client, hook["id"])
    assert delivery["status"] == "pending" and len(delivery["attempts"]) >= 2
    assert all(a["http_status"] == 503 for a in delivery["attempts"])


async def test_a_private_address_is_refused_at_delivery_too(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    """Registered while private addresses were allowed (or DNS said otherwise then): every
    attempt checks again."""
    client = await _client(make_client, webhook_allow_private=False, webhook_retry_schedule="1h")
    endpoint_id = insert_endpoint(sql, receiver.url.replace("127.0.0.1", "localhost"))
    user = await create_user(client, "sneaky", 0)
    await post_task(client, user["id"], "replenishment", 1)

    async def attempted() -> list[dict[str, Any]]:
        log = await deliveries(client, str(endpoint_id))
        return log if log and log[0]["attempts"] else []

    (delivery,) = await eventually(attempted, timeout=15)
    error = delivery["attempts"][0]["error"]
    assert error.startswith("refused: ") and "loopback" in error, error
    assert delivery["attempts"][0]["http_status"] is None
    assert receiver.received == []


async def test_delivered_and_failed_deliveries_are_purged_after_the_retention(
    client: TestClient, sql: psycopg2.extensions.cursor
) -> None:
    endpoint_id = insert_endpoint(sql, "http://x.test/")
    sql.execute(
        "INSERT INTO webhook_deliveries (endpoint_id, task_id, event_type, status, finished_at, next_attempt_at) "
        "SELECT %s, n, 'task.done', s, CASE WHEN s = 'pending' THEN NULL ELSE now() - interval '8 days' END, "
        "       now() + interval '1 day' "
        "FROM generate_series(1, 6) AS n, LATERAL (SELECT (ARRAY['pending','delivered','failed'])[n %% 3 + 1] AS s) x",
        (endpoint_id,),
    )
    sql.execute("INSERT INTO webhook_attempts SELECT id, 1, now(), 1, 500, 'x' FROM webhook_deliveries")
    app = client.server.app
    purge = partial(purge_deliveries, app[keys.POOL], app[keys.SETTINGS].webhook_retention)
    # Two rows per statement: the purge goes on until a batch comes back short.
    await app[keys.HOUSEKEEPING].purge_now(Purge(PURGE_WEBHOOK_DELIVERIES, 1, 2, purge))

    def left() -> list[tuple[str, int]]:
        # (The service's own turn may hold some rows a moment longer: SKIP LOCKED left them to it.)
        sql.execute("SELECT status, (SELECT count(*) FROM webhook_attempts) FROM webhook_deliveries")
        return sql.fetchall()  # type: ignore[no-any-return]

    await eventually(lambda: left() == [("pending", 2), ("pending", 2)], timeout=10, on_fail=lambda: str(left()))


async def test_a_slow_endpoint_does_not_hold_up_another(make_client: MakeClient, receiver: Receiver) -> None:
    slow = await Receiver().start()
    try:
        client = await _client(make_client, webhook_timeout=30.0)
        await register(client, slow.url)
        fast_hook = await register(client, receiver.url)
        slow.answer = Answer(200, delay=25)
        user = await create_user(client, "busy", 0)
        tasks = [await post_task(client, user["id"], "replenishment", n) for n in range(1, 11)]
        # The slow endpoint has 4 requests hanging (its limit); the fast one gets all 10 meanwhile.
        await eventually(lambda: len(receiver.accepted()) == 10, timeout=10, what="the fast endpoint served")
        assert receiver.task_ids() == {t["id"] for t in tasks}
        # The slow one has its 4 requests (its limit per endpoint) hanging, none finished.
        assert slow.started == 4 and slow.received == []
        log = await settled(client, fast_hook["id"], 10)
        assert all(d["status"] == "delivered" for d in log)
    finally:
        await slow.stop()


async def test_a_result_the_database_refuses_is_recorded_once_it_accepts_and_the_event_is_not_sent_again(
    make_client: MakeClient, receiver: Receiver, sql: psycopg2.extensions.cursor
) -> None:
    # Recording an attempt fails while this trigger refuses its row; a sequence (outside any
    # transaction) counts the refusals.
    sql.execute("CREATE SEQUENCE test_refusals")
    sql.execute(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " PERFORM nextval('test_refusals'); RAISE EXCEPTION 'refused by the test'; END $$"
    )
    sql.execute(
        "CREATE TRIGGER test_refuse BEFORE INSERT ON webhook_attempts FOR EACH ROW EXECUTE FUNCTION test_refuse()"
    )
    client = await _client(make_client)
    hook = await register(client, receiver.url)
    user = await create_user(client, "refused", 0)
    task = await post_task(client, user["id"], "replenishment", 1)

    def refusals() -> int:
        sql.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM test_refusals")
        return int(sql.fetchone()[0])

    # Sent, then its result refused twice: the batch tried its statement again.
    await eventually(lambda: refusals() >= 2, timeout=10, what="the recording tried again")
    (delivery,) = await deliveries(client, hook["id"])
    assert delivery["status"] == "pending" and delivery["attempts"] == []
    sql.execute("DROP TRIGGER test_refuse ON webhook_attempts")
    (delivery,) = await settled(client, hook["id"], 1)
    assert delivery["status"] == "delivered" and [a["http_status"] for a in delivery["attempts"]] == [200]
    # Sent once: the lane did not wait for the recording, nor did the claim come back to send it again.
    assert [r.webhook_id for r in receiver.received] == [f"msg_{task['id']}_{hook['id']}"]
    receiver.verify_all(hook["secret"])
    samples = await eventually(lambda: _scraped(client, "delivered", 1), timeout=5)
    assert value(samples, "message_broker_webhook_deliveries_total", result="delivered") == 1


@pytest.mark.parametrize("change", ["url", "disabled", "deleted"])
async def test_what_was_claimed_for_an_endpoint_follows_its_change(
    make_client: MakeClient, receiver: Receiver, change: str
) -> None:
    """An endpoint answers slowly, so most of its deliveries wait, claimed, in this process's
    lanes. Its URL is changed (or it is disabled, or deleted): the old URL gets the attempts
    already under way and no more (they used to go on for as long as the claims lasted); the
    new URL gets the rest, or nobody does."""
    client = await _client(make_client)
    receiver.answer = Answer(delay=1.0)
    hook = await register(client, receiver.url)
    user = await create_user(client, "busy", 0)
    tasks = [await post_task(client, user["id"], "replenishment", 1) for _ in range(40)]
    await eventually(lambda: receiver.started >= 4, timeout=10, what="the first attempts under way")
    moved = await Receiver().start()
    try:
        if change == "url":
            response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"url": moved.url})
        elif change == "disabled":
            response = await client.patch(f"/api/v1/webhooks/{hook['id']}", json={"status": "disabled"})
        else:
            response = await client.delete(f"/api/v1/webhooks/{hook['id']}")
        assert response.status in (200, 204), await response.text()
        # Each lane may start one more attempt while the change's notification is on its way (an
        # answer takes 1 s); then none.
        changed_at_most = receiver.started + 4
        if change == "url":
            expected = {t["id"] for t in tasks}
            await eventually(
                lambda: receiver.task_ids() | moved.task_ids() == expected, timeout=20, what="every event received"
            )
        else:
            # The lanes stop: every attempt made is answered, within an answer's time or two (they
            # used to go on, one attempt after another, for as long as their claims lasted).
            await eventually(lambda: len(receiver.received) == receiver.started, timeout=5, what="the lanes stopped")
        assert receiver.started <= changed_at_most, (receiver.started, changed_at_most)
    finally:
        await moved.stop()
