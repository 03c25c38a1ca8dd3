"""Transfers between users: one task in the sender's queue moves money to the recipient, with the
recipient's own entry (transfer-in) written in the same transaction."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from message_broker.db.driver import ListenConnection
from message_broker.db.options import ConnectionOptions
from message_broker.ledger import BIGINT_MAX

from ..helpers import create_user, eventually, post_task, wait_processed
from ..ledger_check import check_database
from ..sse import open_stream


async def transfer(client: TestClient, sender: str, to: Any, amount: Any, **headers: str) -> tuple[int, Any]:
    response = await client.post(f"/api/v1/user/{sender}/transfer/", json={"to": to, "amount": amount}, headers=headers)
    return response.status, await response.json()


async def entries(client: TestClient, user_id: str) -> list[dict[str, Any]]:
    return await (await client.get(f"/api/v1/user/{user_id}/tasks")).json()  # type: ignore[no-any-return]


async def balance(client: TestClient, user_id: str) -> int:
    return int((await (await client.get(f"/api/v1/user/{user_id}")).json())["balance"])


async def test_a_transfer_moves_money_and_the_recipient_gets_its_entry(client: TestClient) -> None:
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 5)
    response = await client.post(f"/api/v1/user/{alice['id']}/transfer/", json={"to": bob["id"], "amount": 30})
    assert response.status == 202
    task = await response.json()
    assert response.headers["Location"] == f"/api/v1/task/{task['id']}"
    assert (task["type"], task["user_id"], task["counterparty_id"], task["amount"], task["status"]) == (
        "transfer",
        alice["id"],
        bob["id"],
        30,
        "pending",
    )
    assert task["transfer_id"] is None and task["hold_id"] is None
    done = await wait_processed(client, task["id"])
    assert (done["status"], done["balance_after"], done["available_after"]) == ("done", 70, 70)
    (entry,) = await entries(client, bob["id"])
    assert entry["type"] == "transfer-in" and entry["status"] == "done" and entry["amount"] == 30
    assert (entry["counterparty_id"], entry["transfer_id"], entry["balance_after"]) == (alice["id"], task["id"], 35)
    assert entry["processed_at"] == entry["created_at"]  # written finished, in the transfer's transaction
    assert await (await client.get(f"/api/v1/task/{entry['id']}")).json() == entry
    assert (await balance(client, alice["id"]), await balance(client, bob["id"])) == (70, 35)


async def test_wait_answers_with_the_outcome(client: TestClient) -> None:
    alice, bob = await create_user(client, "alice", 10), await create_user(client, "bob", 0)
    response = await client.post(f"/api/v1/user/{alice['id']}/transfer/?wait=5", json={"to": bob["id"], "amount": 11})
    assert response.status == 200
    body = await response.json()
    assert (body["status"], body["reason"], body["balance_after"]) == ("cancelled", "insufficient_funds", 10)
    assert await entries(client, bob["id"]) == []  # a cancelled transfer moves nothing
    assert (await balance(client, alice["id"]), await balance(client, bob["id"])) == (10, 0)


async def test_a_transfer_that_would_overflow_the_recipient_is_cancelled(client: TestClient) -> None:
    alice, rich = await create_user(client, "alice", 10), await create_user(client, "rich", BIGINT_MAX - 5)
    status, task = await transfer(client, alice["id"], rich["id"], 6)
    assert status == 202
    done = await wait_processed(client, task["id"])
    assert (done["status"], done["reason"], done["balance_after"]) == ("cancelled", "balance_overflow", 10)
    assert await entries(client, rich["id"]) == []
    status, task = await transfer(client, alice["id"], rich["id"], 5)
    assert (await wait_processed(client, task["id"]))["status"] == "done"
    assert await balance(client, rich["id"]) == BIGINT_MAX


@pytest.mark.parametrize("with_key", [False, True])
async def test_an_unknown_sender_or_recipient_is_404_and_nothing_is_stored(
    client: TestClient, sql, with_key: bool
) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 10)
    headers = {"Idempotency-Key": "k-recipient"} if with_key else {}
    status, body = await transfer(client, alice["id"], "999", 1, **headers)
    assert status == 404 and body["error"]["code"] == "user_not_found"
    assert body["error"]["details"] == {"user_id": "999"}
    headers = {"Idempotency-Key": "k-sender"} if with_key else {}
    status, body = await transfer(client, "998", alice["id"], 1, **headers)
    assert status == 404 and body["error"]["details"] == {"user_id": "998"}
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 0
    sql.execute("SELECT count(*) FROM idempotency_keys")
    assert sql.fetchone()[0] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"to": "SELF", "amount": 1},  # to the sender
        {"to": 2, "amount": 1},  # ids are strings of digits
        {"to": "0", "amount": 1},
        {"to": "-2", "amount": 1},
        {"to": " 2", "amount": 1},
        {"to": "٢", "amount": 1},
        {"to": "99999999999999999999", "amount": 1},
        {"to": "2", "amount": 0},
        {"to": "2", "amount": BIGINT_MAX + 1},
        {"to": "2", "amount": "5"},
        {"to": "2", "amount": 5.0},
        {"to": "2"},
        {"amount": 5},
        {"to": "2", "amount": 5, "type": "transfer"},
    ],
)
async def test_bad_transfers_are_400_and_change_nothing(client: TestClient, sql, body: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    alice, bob = await create_user(client, "alice", 10), await create_user(client, "bob", 0)
    if body.get("to") == "SELF":
        body = {**body, "to": alice["id"]}
    elif body.get("to") == "2":
        body = {**body, "to": bob["id"]}
    response = await client.post(f"/api/v1/user/{alice['id']}/transfer/", json=body)
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["code"] == "validation_failed"
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 0


async def test_an_idempotency_key_makes_one_transfer(client: TestClient) -> None:
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 0)
    answers = await asyncio.gather(
        *(transfer(client, alice["id"], bob["id"], 10, **{"Idempotency-Key": "pay-1"}) for _ in range(5))
    )
    assert {status for status, _ in answers} == {202}
    assert len({body["id"] for _, body in answers}) == 1
    await wait_processed(client, answers[0][1]["id"])
    assert (await balance(client, alice["id"]), await balance(client, bob["id"])) == (90, 10)
    status, body = await transfer(client, alice["id"], bob["id"], 11, **{"Idempotency-Key": "pay-1"})
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"


async def test_the_transfer_in_is_heard_like_every_finished_task(client: TestClient, database_url: str) -> None:
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 0)
    listener = await ListenConnection.open(ConnectionOptions(database_url), ["task_processed", "task_created"])
    try:
        status, task = await transfer(client, alice["id"], bob["id"], 40)
        assert status == 202
        heard: dict[str, list[dict[str, Any]]] = {"task_processed": [], "task_created": []}
        while len(heard["task_processed"]) < 2:
            notification = await listener.next_notification(timeout=10)
            assert notification is not None
            heard[notification.channel].append(
                json.loads(notification.payload) if notification.channel == "task_processed" else notification.payload
            )
        by_type = {n["type"]: n for n in heard["task_processed"]}
        assert by_type["transfer"]["id"] == task["id"]
        assert by_type["transfer-in"]["transfer_id"] == task["id"] and by_type["transfer-in"]["user_id"] == bob["id"]
        # The recipient's entry is written finished: no worker is woken for it.
        assert heard["task_created"] == [alice["id"]]
    finally:
        listener.close()


async def test_transfers_both_ways_from_several_processes_never_deadlock(
    make_client, sql, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Transfers in both directions between the same users, through three app instances at once:
    every one finishes, no deadlock is reported by the service or by PostgreSQL, and the ledgers
    explain every balance (money conserved)."""
    caplog.set_level(logging.WARNING)
    clients = [await make_client(batch_size=5, apply_max_users=4) for _ in range(3)]
    users = [await create_user(clients[0], f"ring{i}", 1000) for i in range(4)]
    sql.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    deadlocks_before = sql.fetchone()[0]

    async def pay(worker: int) -> list[str]:
        ids = []
        for n in range(40):
            sender = users[(worker + n) % 4]
            recipient = users[(worker + n + 1 + n % 2) % 4]  # both directions around the ring
            client = clients[(worker + n) % 3]
            status, task = await transfer(client, sender["id"], recipient["id"], 1 + (worker * n) % 300)
            assert status == 202, task
            ids.append(task["id"])
        return ids

    ids = [i for batch in await asyncio.gather(*(pay(w) for w in range(6))) for i in batch]
    for task_id in ids:
        await wait_processed(clients[0], task_id, timeout=30)
    for client in clients:
        await client.close()  # their backends exit and report their statistics
    assert not [r for r in caplog.records if "deadlock" in r.getMessage().lower()]

    async def stats_reported() -> bool:
        # Behind PgBouncer (make test-pgbouncer) the server connections outlive the closed pools:
        # end them (idle by now), so that they exit and report their statistics too.
        sql.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return bool(sql.fetchone()[0] == 0)

    await eventually(stats_reported, timeout=10)
    sql.execute("SELECT pg_stat_clear_snapshot()")
    sql.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    assert sql.fetchone()[0] == deadlocks_before
    summary = check_database(sql, {int(u["id"]): 1000 for u in users})
    assert summary.by_type["transfer"] == len(ids) and summary.transfers == summary.by_type["transfer-in"]


async def test_histories_explain_balances_after_mixed_traffic(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    users = [await create_user(client, f"mix{i}", 50) for i in range(3)]
    sent = []
    for n in range(60):
        user, other = users[n % 3], users[(n + 1) % 3]
        if n % 3 == 0:
            sent.append(await post_task(client, user["id"], "write-off", 7 + n % 11))
        elif n % 3 == 1:
            sent.append((await transfer(client, user["id"], other["id"], 5 + n % 13))[1])
        else:
            sent.append(await post_task(client, user["id"], "replenishment", 3 + n % 5))
    for task in sent:
        await wait_processed(client, task["id"])
    check_database(sql, {int(u["id"]): 50 for u in users})


async def test_both_event_streams_carry_the_transfer_in(client: TestClient) -> None:
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 0)
    bob_url = str(client.make_url(f"/api/v1/user/{bob['id']}/events"))
    all_url = str(client.make_url("/api/v1/events"))
    async with open_stream(client.session, bob_url) as bobs, open_stream(client.session, all_url) as everyone:
        await bobs.until_live()
        await everyone.until_live()
        status, task = await transfer(client, alice["id"], bob["id"], 25)
        assert status == 202
        (entry,) = await bobs.events(1)
        assert (entry.task["type"], entry.task["transfer_id"], entry.task["balance_after"]) == (
            "transfer-in",
            task["id"],
            25,
        )
        assert entry.id == entry.task["id"]
        seen = [event.task for event in await everyone.events(2)]
        assert [t["type"] for t in seen] == ["transfer", "transfer-in"]  # applied in this order, one batch
