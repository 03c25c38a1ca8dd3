"""The client's own reference and metadata on tasks: accepted by every endpoint that posts one,
stored, shown everywhere a task is, fingerprinted with an Idempotency-Key; a reference is unique
per user (409 reference_taken, nothing stored), also when requests share one batched insert."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ..helpers import create_user, wait_processed
from ..sse import open_stream


async def post(client: TestClient, path: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    response = await client.post(path, json=body, headers=headers)
    return response.status, await response.json()


def _count(sql) -> int:  # type: ignore[no-untyped-def]
    sql.execute("SELECT count(*) FROM tasks")
    return int(sql.fetchone()[0])


async def test_every_posting_endpoint_keeps_reference_and_metadata(client: TestClient) -> None:
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 0)
    a = alice["id"]
    meta = {"invoice": "INV-7", "note": "ünïcode ok"}
    posted = []
    status, task = await post(
        client,
        f"/api/v1/user/{a}/amount/",
        {"type": "replenishment", "amount": 5, "reference": "r-amount", "metadata": meta},
    )
    assert status == 202 and (task["reference"], task["metadata"]) == ("r-amount", meta)
    posted.append(task)
    status, task = await post(
        client, f"/api/v1/user/{a}/transfer/", {"to": bob["id"], "amount": 5, "reference": "r-transfer"}
    )
    assert status == 202 and (task["reference"], task["metadata"]) == ("r-transfer", {})
    posted.append(task)
    status, hold = await post(
        client, f"/api/v1/user/{a}/holds/", {"amount": 10, "reference": "r-hold", "metadata": {"k": "v"}}
    )
    assert status == 202 and hold["reference"] == "r-hold"
    posted.append(hold)
    status, other = await post(client, f"/api/v1/user/{a}/holds/", {"amount": 10})
    assert status == 202 and (other["reference"], other["metadata"]) == (None, {})
    await wait_processed(client, hold["id"])
    await wait_processed(client, other["id"])
    status, task = await post(client, f"/api/v1/hold/{hold['id']}/capture/", {"amount": 3, "reference": "r-capture"})
    assert status == 202 and task["reference"] == "r-capture"
    posted.append(task)
    status, task = await post(
        client, f"/api/v1/hold/{other['id']}/void/", {"reference": "r-void", "metadata": {"why": "x"}}
    )
    assert status == 202 and (task["reference"], task["metadata"], task["user_id"]) == ("r-void", {"why": "x"}, a)
    posted.append(task)
    for task in posted:
        done = await wait_processed(client, task["id"])
        assert (done["reference"], done["metadata"]) == (task["reference"], task["metadata"])
    listed = await (await client.get(f"/api/v1/user/{a}/tasks")).json()
    assert {t["reference"] for t in listed} == {t["reference"] for t in posted} | {None}
    # Event streams carry them: a replay (from the database) and live (from the notification).
    url = str(client.make_url(f"/api/v1/user/{a}/events"))
    async with open_stream(client.session, url, last_event_id="0") as stream:
        replayed = {e.task["id"]: e.task for e in await stream.until_live()}
        for task in posted:
            assert replayed[task["id"]]["reference"] == task["reference"]
            assert replayed[task["id"]]["metadata"] == task["metadata"]
        status, live = await post(
            client,
            f"/api/v1/user/{a}/amount/",
            {"type": "write-off", "amount": 1, "reference": "r-live", "metadata": {"x": '"quoted\\'}},
        )
        assert status == 202
        event = await stream.next_event()
    assert event.task["id"] == live["id"]
    assert (event.task["reference"], event.task["metadata"]) == ("r-live", {"x": '"quoted\\'})
    assert event.task == await (await client.get(f"/api/v1/task/{live['id']}")).json()


async def test_a_reference_is_unique_per_user_and_409_names_the_task(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 100)
    status, first = await post(
        client, f"/api/v1/user/{alice['id']}/amount/", {"type": "write-off", "amount": 1, "reference": "order-1"}
    )
    assert status == 202
    before = _count(sql)
    for path, body in [
        (f"/api/v1/user/{alice['id']}/amount/", {"type": "replenishment", "amount": 9, "reference": "order-1"}),
        (f"/api/v1/user/{alice['id']}/transfer/", {"to": bob["id"], "amount": 9, "reference": "order-1"}),
        (f"/api/v1/user/{alice['id']}/holds/", {"amount": 9, "reference": "order-1"}),
    ]:
        status, body = await post(client, path, body)
        assert status == 409, body
        assert body["error"]["code"] == "reference_taken"
        assert body["error"]["details"] == {"reference": "order-1", "task_id": first["id"]}
    assert _count(sql) == before
    # Another user may use the same reference.
    status, _ = await post(
        client, f"/api/v1/user/{bob['id']}/amount/", {"type": "replenishment", "amount": 1, "reference": "order-1"}
    )
    assert status == 202


async def test_one_taken_reference_in_a_batched_insert_fails_only_its_request(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 0)
    path = f"/api/v1/user/{alice['id']}/amount/"
    status, first = await post(client, path, {"type": "replenishment", "amount": 1, "reference": "dup"})
    assert status == 202
    # Many at once share inserts (the enqueue batcher); among them the taken reference, and one new
    # reference twice: exactly one of those two is stored.
    bodies = [{"type": "replenishment", "amount": 1, "reference": f"r{n}"} for n in range(40)]
    bodies[7]["reference"] = "dup"
    bodies[20]["reference"] = bodies[30]["reference"] = "twice"
    results = await asyncio.gather(*(post(client, path, body) for body in bodies))
    statuses = [status for status, _ in results]
    assert statuses[7] == 409 and results[7][1]["error"]["details"]["task_id"] == first["id"]
    assert sorted((statuses[20], statuses[30])) == [202, 409]
    winner = results[20] if statuses[20] == 202 else results[30]
    loser = results[30] if statuses[20] == 202 else results[20]
    assert loser[1]["error"]["details"]["task_id"] == winner[1]["id"]
    assert statuses.count(202) == 38
    sql.execute("SELECT count(*) FROM tasks WHERE user_id = %s", (int(alice["id"]),))
    assert sql.fetchone()[0] == 39


async def test_capture_and_void_references_belong_to_the_holds_user(client: TestClient) -> None:
    alice = await create_user(client, "alice", 100)
    status, hold = await post(client, f"/api/v1/user/{alice['id']}/holds/?wait=5", {"amount": 10, "reference": "h"})
    assert status == 200 and hold["status"] == "done"
    status, body = await post(client, f"/api/v1/hold/{hold['id']}/capture/", {"reference": "h"})
    assert status == 409 and body["error"]["details"]["task_id"] == hold["id"]
    status, body = await post(client, "/api/v1/hold/999999/void/", {"reference": "h"})
    assert status == 404 and body["error"]["code"] == "hold_not_found"


async def test_tasks_by_reference(client: TestClient) -> None:
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 100)
    status, task = await post(
        client, f"/api/v1/user/{alice['id']}/amount/", {"type": "write-off", "amount": 1, "reference": "a b&c"}
    )
    assert status == 202
    found = await client.get(f"/api/v1/user/{alice['id']}/tasks/", params={"reference": "a b&c"})
    assert found.status == 200
    assert [t["id"] for t in await found.json()] == [task["id"]]
    for user, reference in ((bob, "a b&c"), (alice, "other")):
        found = await client.get(f"/api/v1/user/{user['id']}/tasks/", params={"reference": reference})
        assert (found.status, await found.json()) == (200, [])
    missing = await client.get("/api/v1/user/999999/tasks/", params={"reference": "x"})
    assert missing.status == 404
    # With the other filters, created_by among them (a plain string, not an enum like type and
    # status: it was read as one, and answered 500). Found from outside (schemathesis).
    for params, expected in (
        ([("reference", "a b&c"), ("created_by", "shop")], []),
        ([("reference", "a b&c"), ("created_by", "shop"), ("created_by", "other")], []),
        ([("reference", "a b&c"), ("type", "write-off"), ("status", "pending"), ("status", "done")], [task["id"]]),
        ([("reference", "a b&c"), ("type", "hold")], []),
    ):
        found = await client.get(f"/api/v1/user/{alice['id']}/tasks/", params=params)
        assert found.status == 200, (params, await found.text())
        assert [t["id"] for t in await found.json()] == expected, params


async def test_tasks_by_reference_and_the_token_that_posted_them(make_client) -> None:  # type: ignore[no-untyped-def]
    token = "reference-filter-token-0123456789"
    client = await make_client(api_token=token)
    auth = {"Authorization": f"Bearer {token}"}
    response = await client.post("/api/v1/user/", json={"username": "carol", "balance": 100}, headers=auth)
    user = await response.json()
    response = await client.post(
        f"/api/v1/user/{user['id']}/amount/",
        json={"type": "write-off", "amount": 1, "reference": "r-1"},
        headers=auth,
    )
    task = await response.json()
    for created_by, expected in (("API_TOKEN", [task["id"]]), ("someone-else", [])):
        found = await client.get(
            f"/api/v1/user/{user['id']}/tasks", params={"reference": "r-1", "created_by": created_by}
        )
        assert found.status == 200, await found.text()
        assert [t["id"] for t in await found.json()] == expected, created_by


async def test_reference_and_metadata_are_part_of_the_idempotency_fingerprint(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 100)
    path = f"/api/v1/user/{alice['id']}/amount/"
    body = {"type": "write-off", "amount": 1, "reference": "k1", "metadata": {"a": "1"}}
    status, first = await post(client, path, body, **{"Idempotency-Key": "key-1"})
    assert status == 202
    status, again = await post(client, path, body, **{"Idempotency-Key": "key-1"})
    assert (status, again) == (202, first)
    for changed in ({**body, "reference": "k2"}, {**body, "metadata": {"a": "2"}}):
        status, answer = await post(client, path, changed, **{"Idempotency-Key": "key-1"})
        assert status == 422 and answer["error"]["code"] == "idempotency_key_reused"
    # A taken reference under a new key: 409, and the key is not used up (nothing stored).
    before = _count(sql)
    status, answer = await post(client, path, body, **{"Idempotency-Key": "key-2"})
    assert status == 409 and answer["error"]["details"]["task_id"] == first["id"]
    assert _count(sql) == before
    sql.execute("SELECT count(*) FROM idempotency_keys WHERE key = 'key-2'")
    assert sql.fetchone()[0] == 0


BAD = [
    ({"reference": ""}, "reference"),
    ({"reference": "x" * 129}, "reference"),
    ({"reference": "café"}, "reference"),
    ({"reference": "tab\there"}, "reference"),
    ({"reference": 12}, "reference"),
    ({"reference": None}, "reference"),
    ({"metadata": []}, "metadata"),
    ({"metadata": "x"}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {"k": None}}, "metadata"),
    ({"metadata": {"": "v"}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"metadata": {f"k{n}": "v" for n in range(21)}}, "metadata"),
    ({"metadata": {f"k{n}": "v" * 300 for n in range(15)}}, "metadata"),
    ({"metadata": {"k": "nul\u0000"}}, "metadata"),
    ({"metadata": {"k": {"nested": "no"}}}, "metadata"),
]


@pytest.mark.parametrize(("extra", "field"), BAD)
async def test_bad_reference_or_metadata_is_400_and_stores_nothing(
    client: TestClient, sql, extra: dict[str, Any], field: str
) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 100)
    before = _count(sql)
    for path, body in [
        (f"/api/v1/user/{alice['id']}/amount/", {"type": "replenishment", "amount": 1}),
        (f"/api/v1/user/{alice['id']}/holds/", {"amount": 1}),
        ("/api/v1/hold/1/void/", {}),
    ]:
        status, answer = await post(client, path, {**body, **extra})
        assert status == 400, (path, answer)
        assert answer["error"]["code"] == "validation_failed"
        assert field in answer["error"]["details"]["fields"]
    assert _count(sql) == before


async def test_largest_metadata_fits_and_round_trips(client: TestClient) -> None:
    alice = await create_user(client, "alice", 100)
    # 20 keys of 64 characters, values making it just under 4 KiB as JSON, with characters that
    # JSON escapes.
    meta = {f"{n:02d}" + "k" * 62: '"\\\n' + "é" * 20 for n in range(20)}
    status, task = await post(
        client, f"/api/v1/user/{alice['id']}/amount/?wait=5", {"type": "replenishment", "amount": 1, "metadata": meta}
    )
    assert status == 200, task
    assert task["metadata"] == meta
