"""Concurrent POSTs of tasks share INSERT statements: each request still gets exactly its own
task back, unknown users get 404 with nothing stored, and the others are not disturbed."""

from __future__ import annotations

import asyncio

from message_broker.http import keys

from ..helpers import create_user, wait_processed
from ..ledger_check import check_database


async def test_batched_requests_each_get_their_own_task(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    # One statement at a time, so that requests arriving meanwhile must share the next one.
    client = await make_client(enqueue_max_in_flight=1)
    users = [await create_user(client, f"b{i}", 1000) for i in range(5)]
    unknown = "987654321"
    sent = []
    for n in range(200):
        user_id = unknown if n % 10 == 3 else users[n % len(users)]["id"]
        sent.append((user_id, "write-off" if n % 3 == 0 else "replenishment", 1 + n))

    async def post(user_id: str, kind: str, amount: int) -> tuple[int, dict]:  # type: ignore[type-arg]
        response = await client.post(f"/api/v1/user/{user_id}/amount/", json={"type": kind, "amount": amount})
        return response.status, await response.json()

    answers = await asyncio.gather(*(post(*request) for request in sent))

    accepted = []
    for (user_id, kind, amount), (status, body) in zip(sent, answers, strict=True):
        if user_id == unknown:
            assert status == 404 and body["error"]["code"] == "user_not_found"
        else:
            assert status == 202, body
            assert (body["user_id"], body["type"], body["amount"], body["status"]) == (user_id, kind, amount, "pending")
            accepted.append(body["id"])
    assert len(set(accepted)) == len(accepted) == 180
    batcher = client.server.app[keys.ENQUEUE_BATCHER]
    assert batcher.largest_batch > 1, "no two requests shared a statement"
    assert batcher.batches < len(sent)

    sql.execute("SELECT count(*), count(*) FILTER (WHERE user_id = %s) FROM tasks", (int(unknown),))
    assert sql.fetchone() == (180, 0)
    for task_id in accepted:
        await wait_processed(client, task_id, timeout=30)
    check_database(sql, {int(u["id"]): 1000 for u in users})


async def test_a_batch_of_only_unknown_users_stores_nothing(client, sql) -> None:  # type: ignore[no-untyped-def]
    body = {"type": "replenishment", "amount": 1}
    responses = await asyncio.gather(*(client.post(f"/api/v1/user/{900000 + n}/amount/", json=body) for n in range(20)))
    assert [r.status for r in responses] == [404] * 20
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 0
