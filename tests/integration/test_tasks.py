import asyncio

from aiohttp.test_utils import TestClient

from ..helpers import create_user, post_task, wait_processed
from ..ledger_check import check_database

MAX = 2**63 - 1


async def test_task_is_accepted_then_applied(client: TestClient) -> None:
    user = await create_user(client, "u", 500)
    response = await client.post(f"/api/v1/user/{user['id']}/amount/", json={"type": "write-off", "amount": 200})
    assert response.status == 202
    task = await response.json()
    assert response.headers["Location"] == f"/api/v1/task/{task['id']}"
    assert task["user_id"] == user["id"] and task["type"] == "write-off" and task["amount"] == 200
    assert (task["status"], task["reason"], task["balance_after"], task["processed_at"]) == (
        "pending",
        None,
        None,
        None,
    )
    assert task["created_at"]
    done = await wait_processed(client, task["id"])
    assert (done["status"], done["reason"], done["balance_after"]) == ("done", None, 300)
    assert done["processed_at"] >= done["created_at"]
    assert (await (await client.get(f"/api/v1/user/{user['id']}")).json())["balance"] == 300


async def test_write_off_beyond_balance_is_cancelled(client: TestClient) -> None:
    user = await create_user(client, "u", 100)
    task = await post_task(client, user["id"], "write-off", 101)
    done = await wait_processed(client, task["id"])
    assert (done["status"], done["reason"], done["balance_after"]) == ("cancelled", "insufficient_funds", 100)
    assert (await (await client.get(f"/api/v1/user/{user['id']}")).json())["balance"] == 100


async def test_replenishment_past_bigint_is_cancelled(client: TestClient) -> None:
    user = await create_user(client, "rich", MAX - 5)
    task = await post_task(client, user["id"], "replenishment", 6)
    done = await wait_processed(client, task["id"])
    assert (done["status"], done["reason"], done["balance_after"]) == ("cancelled", "balance_overflow", MAX - 5)
    last = await post_task(client, user["id"], "replenishment", 5)
    assert (await wait_processed(client, last["id"]))["balance_after"] == MAX


async def test_tasks_sent_one_after_another_apply_in_that_order(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "ordered", 0)
    # Only this order works out: each write-off needs the replenishment just before it.
    steps = [("replenishment", 10), ("write-off", 10), ("replenishment", 7), ("write-off", 7)] * 10
    ids = [(await post_task(client, user["id"], kind, amount))["id"] for kind, amount in steps]
    finished = [await wait_processed(client, task_id) for task_id in ids]
    assert [t["status"] for t in finished] == ["done"] * len(steps)
    assert [t["balance_after"] for t in finished][:4] == [10, 0, 7, 0]
    sql.execute("SELECT id FROM tasks ORDER BY processed_at, id")
    assert [str(row[0]) for row in sql.fetchall()] == ids


async def test_task_for_unknown_user_is_404_and_not_stored(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    response = await client.post("/api/v1/user/424242/amount/", json={"type": "replenishment", "amount": 1})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "user_not_found"
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 0


async def test_get_task_and_user_tasks(client: TestClient) -> None:
    user = await create_user(client, "hist", 0)
    other = await create_user(client, "other", 0)
    ids = [(await post_task(client, user["id"], "replenishment", i + 1))["id"] for i in range(5)]
    await post_task(client, other["id"], "replenishment", 1)
    for task_id in ids:
        await wait_processed(client, task_id)
    listed = await (await client.get(f"/api/v1/user/{user['id']}/tasks")).json()
    assert [t["id"] for t in listed] == ids
    page = await (await client.get(f"/api/v1/user/{user['id']}/tasks/", params={"limit": "2", "after": ids[1]})).json()
    assert [t["id"] for t in page] == ids[2:4]
    assert (await client.get("/api/v1/task/99999999")).status == 404
    assert (await client.get("/api/v1/user/99999999/tasks")).status == 404
    empty_user = await create_user(client, "empty", 0)
    empty = await client.get(f"/api/v1/user/{empty_user['id']}/tasks")
    assert empty.status == 200 and await empty.json() == []


async def test_concurrent_tasks_keep_every_ledger_consistent(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    users = [await create_user(client, f"c{i}", 50) for i in range(4)]
    initial = {int(u["id"]): 50 for u in users}

    async def hammer(worker: int) -> list[str]:
        ids = []
        for n in range(40):
            user = users[(worker + n) % len(users)]
            kind = "write-off" if (worker * 7 + n) % 3 else "replenishment"
            ids.append((await post_task(client, user["id"], kind, 1 + (worker * 13 + n * 5) % 40))["id"])
        return ids

    batches = await asyncio.gather(*(hammer(w) for w in range(16)))
    for task_id in [i for batch in batches for i in batch]:
        await wait_processed(client, task_id, timeout=30)
    sql.execute("SELECT count(*), count(*) FILTER (WHERE status = 'pending') FROM tasks")
    assert sql.fetchone() == (16 * 40, 0)
    check_database(sql, initial)
