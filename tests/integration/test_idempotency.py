"""Idempotency-Key on POST /api/v1/user/ and POST /api/v1/user/<id>/amount/, through HTTP on a
real PostgreSQL: replays, reuse with another request, bad keys, concurrent retries in one
process and across two server processes, restarts, expiry and the purge."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from message_broker.db.idempotency import purge_expired
from message_broker.http import keys
from message_broker.http.idempotency import fingerprint
from message_broker.worker.housekeeping import PURGE_IDEMPOTENCY_KEYS as PURGE_KEYS
from message_broker.worker.housekeeping import Purge

from ..helpers import create_user, eventually, wait_processed

KEY = "Idempotency-Key"


async def _post(client: TestClient, path: str, body: Any, key: str | None, **kwargs: Any) -> tuple[int, Any, Any]:
    headers = {KEY: key} if key is not None else {}
    response = await client.post(path, json=body, headers=headers, **kwargs)
    return response.status, await response.json(), response.headers


def _count(sql, table: str) -> int:  # type: ignore[no-untyped-def]
    sql.execute(f"SELECT count(*) FROM {table}")
    return int(sql.fetchone()[0])


async def test_retry_with_same_key_and_body_returns_the_first_answer_and_creates_nothing(
    client: TestClient, sql
) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "payer", 100)
    path = f"/api/v1/user/{user['id']}/amount/"
    first_status, first, first_headers = await _post(client, path, {"type": "write-off", "amount": 30}, "k-1")
    assert first_status == 202 and first["status"] == "pending"
    assert "Idempotent-Replayed" not in first_headers
    await wait_processed(client, first["id"])
    # Same request, with the keys in another order and no trailing slash: the same request.
    response = await client.post(
        path.rstrip("/"),
        data='{"amount": 30, "type": "write-off"}',
        headers={KEY: "k-1", "Content-Type": "application/json"},
    )
    assert response.status == 202
    assert await response.json() == first  # the first answer, "pending" as it was then
    assert response.headers["Location"] == first_headers["Location"] == f"/api/v1/task/{first['id']}"
    assert response.headers["Idempotent-Replayed"] == "true"
    assert _count(sql, "tasks") == 1
    sql.execute("SELECT balance FROM users WHERE id = %s", (int(user["id"]),))
    assert sql.fetchone()[0] == 70  # charged once


async def test_metadata_given_empty_is_the_same_request_as_none_given(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    """`"metadata": {}` stores what no metadata stores (the task shows `{}` either way): a retry
    that sends one where the first request sent the other is the same request, replayed, not 422."""
    user = await create_user(client, "payer", 100)
    path = f"/api/v1/user/{user['id']}/amount/"
    for key, first_body, retry_body in [
        ("k-m1", {"type": "write-off", "amount": 30}, {"type": "write-off", "amount": 30, "metadata": {}}),
        ("k-m2", {"type": "write-off", "amount": 5, "metadata": {}}, {"type": "write-off", "amount": 5}),
    ]:
        status, first, _ = await _post(client, path, first_body, key)
        assert status == 202 and first["metadata"] == {}
        status, again, headers = await _post(client, path, retry_body, key)
        assert status == 202, again
        assert (again["id"], headers.get("Idempotent-Replayed")) == (first["id"], "true")
    assert _count(sql, "tasks") == 2


async def test_same_key_with_another_request_is_422_and_changes_nothing(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "payer", 100)
    other = await create_user(client, "other", 100)
    path = f"/api/v1/user/{user['id']}/amount/"
    assert (await _post(client, path, {"type": "write-off", "amount": 30}, "k-2"))[0] == 202
    for request_path, body in [
        (path, {"type": "write-off", "amount": 31}),  # another amount
        (path, {"type": "replenishment", "amount": 30}),  # another type
        (f"/api/v1/user/{other['id']}/amount/", {"type": "write-off", "amount": 30}),  # another user
        ("/api/v1/user/", {"username": "x", "balance": 30}),  # another endpoint
    ]:
        status, body_out, _ = await _post(client, request_path, body, "k-2")
        assert status == 422, body_out
        assert body_out["error"]["code"] == "idempotency_key_reused"
        assert body_out["error"]["details"] == {"idempotency_key": "k-2"}
    assert _count(sql, "tasks") == 1
    assert _count(sql, "users") == 2


async def test_create_user_with_a_key(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    body = {"username": "Keyed", "balance": 5}
    status, first, headers = await _post(client, "/api/v1/user/", body, "user-key")
    assert status == 201 and headers["Location"] == f"/api/v1/user/{first['id']}"
    status, again, headers = await _post(client, "/api/v1/user", body, "user-key")
    assert (status, again, headers["Idempotent-Replayed"]) == (201, first, "true")
    # Without the key (or with another one) it is a second attempt at the same username.
    assert (await _post(client, "/api/v1/user/", body, None))[0] == 409
    assert (await _post(client, "/api/v1/user/", body, "another-key"))[0] == 409
    assert _count(sql, "users") == 1
    assert _count(sql, "idempotency_keys") == 1  # the failed attempt left no key behind


async def test_a_failed_request_does_not_use_up_its_key(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    status, body, _ = await _post(client, "/api/v1/user/987654/amount/", {"type": "write-off", "amount": 1}, "k-3")
    assert (status, body["error"]["code"]) == (404, "user_not_found")
    status, body, _ = await _post(client, "/api/v1/user/", {"username": "late", "balance": -1}, "k-3")
    assert status == 400
    assert _count(sql, "idempotency_keys") == 0
    # The same key now does what it says.
    status, _, _ = await _post(client, "/api/v1/user/", {"username": "late", "balance": 1}, "k-3")
    assert status == 201 and _count(sql, "idempotency_keys") == 1


@pytest.mark.parametrize(
    ("key", "json_error"),
    [
        (b"", True),
        (b" ", True),
        (b"x" * 256, True),
        ("caf\u00e9".encode(), True),
        (b"tab\there", True),
        # aiohttp's HTTP parser itself refuses these (a plain-text 400) before the app sees them.
        (b"\x7f", False),
        (b"nul\x01", False),
    ],
    ids=["empty", "blank", "too-long", "non-ascii", "tab", "del", "control"],
)
async def test_bad_keys_are_400_and_change_nothing(client: TestClient, sql, key: bytes, json_error: bool) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "payer", 100)
    # Raw bytes on a socket: client libraries refuse to send some of these headers at all.
    body = b'{"type": "write-off", "amount": 1}'
    request = (
        f"POST /api/v1/user/{user['id']}/amount/ HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + KEY.encode()
        + b": "
        + key
        + b"\r\n\r\n"
        + body
    )
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", raw[:300]
    if json_error:
        assert json.loads(payload)["error"]["code"] == "invalid_idempotency_key", payload
    assert _count(sql, "tasks") == 0 and _count(sql, "idempotency_keys") == 0


async def test_longest_key_is_accepted_and_two_key_headers_are_not(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    longest = "".join(chr(c) for c in range(0x20, 0x7F)) * 3  # every printable character
    longest = longest[:255]
    status, _, _ = await _post(client, "/api/v1/user/", {"username": "long", "balance": 0}, longest)
    assert status == 201
    response = await client.post(
        "/api/v1/user/", json={"username": "two", "balance": 0}, headers=[(KEY, "a"), (KEY, "b")]
    )
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_idempotency_key"
    assert _count(sql, "users") == 1


async def test_concurrent_retries_in_one_process_create_one_task(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "busy", 1000)
    path = f"/api/v1/user/{user['id']}/amount/"
    results = await asyncio.gather(
        *(_post(client, path, {"type": "write-off", "amount": 7}, "same") for _ in range(20))
    )
    assert {status for status, _, _ in results} == {202}
    assert len({json.dumps(body, sort_keys=True) for _, body, _ in results}) == 1
    assert sum(1 for _, _, headers in results if "Idempotent-Replayed" not in headers) == 1
    assert _count(sql, "tasks") == 1


async def test_concurrent_retries_across_two_server_processes_and_a_restart(start_server, sql) -> None:  # type: ignore[no-untyped-def]
    first, second = await asyncio.gather(start_server(), start_server())
    async with aiohttp.ClientSession() as session:

        async def post(base: str, path: str, body: Any, key: str) -> tuple[int, str, dict[str, str]]:
            async with session.post(base + path, json=body, headers={KEY: key}) as response:
                return response.status, await response.text(), dict(response.headers)

        user_status, user_body, _ = await post(first.url, "/api/v1/user/", {"username": "twice", "balance": 100}, "u")
        assert user_status == 201
        user_id = json.loads(user_body)["id"]
        path = f"/api/v1/user/{user_id}/amount/"
        for round_ in range(5):
            key = f"retry-{round_}"
            body = {"type": "write-off", "amount": 1 + round_}
            # The same request fired at both processes at once, several times each.
            results = await asyncio.gather(*(post(server.url, path, body, key) for server in (first, second) * 4))
            assert {status for status, _, _ in results} == {202}, results
            assert len({text for _, text, _ in results}) == 1  # byte for byte the same answer
            assert sum(1 for *_, headers in results if "Idempotent-Replayed" not in headers) == 1
        assert _count(sql, "tasks") == 5

        # Across a restart: both processes stop, a new one answers a retry from the database.
        stored = results[0][1]
        assert first.stop() == 0 and second.stop() == 0
        third = await start_server()
        status, text, headers = await post(third.url, path, body, "retry-4")
        assert (status, text, headers["Idempotent-Replayed"]) == (202, stored, "true")
        assert _count(sql, "tasks") == 5


async def test_expired_keys_are_taken_over_and_purged(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    # A long purge interval: only the take-over of an expired key can be seen here.
    client = await make_client(idempotency_retention=0.3, idempotency_purge_interval=600)
    user = await create_user(client, "u", 100)
    path = f"/api/v1/user/{user['id']}/amount/"
    _, first, _ = await _post(client, path, {"type": "write-off", "amount": 1}, "old")
    sql.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
    status, again, headers = await _post(client, path, {"type": "write-off", "amount": 2}, "old")
    assert status == 202 and again["id"] != first["id"] and "Idempotent-Replayed" not in headers
    assert _count(sql, "tasks") == 2


async def test_purge_deletes_expired_keys_in_batches_and_keeps_live_ones(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(idempotency_purge_interval=600, idempotency_purge_batch=100)
    housekeeping = client.server.app[keys.HOUSEKEEPING]
    await eventually(lambda: _ran(housekeeping), timeout=5)  # the start-up run, on an empty table
    sql.execute(
        "INSERT INTO idempotency_keys (key, fingerprint, response_status, response_body, expires_at) "
        "SELECT 'expired-' || g, 'f', 201, '{}', now() - interval '1 minute' FROM generate_series(1, 250) g"
    )
    sql.execute(
        "INSERT INTO idempotency_keys (key, fingerprint, response_status, response_body, expires_at) "
        "VALUES ('live', 'f', 201, '{}', now() + interval '1 hour')"
    )
    # One statement deletes one batch at most...
    assert await purge_expired(client.server.app[keys.POOL], 100) == 100
    # ...and a run repeats it until none is left.
    assert await housekeeping.purge_now(_idempotency_purge(client)) == 150
    sql.execute("SELECT key FROM idempotency_keys")
    assert [row[0] for row in sql.fetchall()] == ["live"]


async def _ran(housekeeping) -> bool:  # type: ignore[no-untyped-def]
    return bool(housekeeping.stats[PURGE_KEYS].runs >= 1)


def _idempotency_purge(client) -> Purge:  # type: ignore[no-untyped-def]
    pool = client.server.app[keys.POOL]
    return Purge(PURGE_KEYS, 600, 100, lambda limit: purge_expired(pool, limit))


async def test_background_purge_removes_expired_keys(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(idempotency_retention=0.2, idempotency_purge_interval=0.2)
    assert (await _post(client, "/api/v1/user/", {"username": "short", "balance": 0}, "short-lived"))[0] == 201
    assert _count(sql, "idempotency_keys") == 1

    async def purged() -> bool:
        return _count(sql, "idempotency_keys") == 0

    await eventually(purged, timeout=5)
    # The purge counts what it removed once its DELETE has answered, a moment after the commit.
    housekeeping = client.server.app[keys.HOUSEKEEPING]
    await eventually(lambda: housekeeping.stats[PURGE_KEYS].removed >= 1, timeout=5)


async def test_a_key_is_the_clients_own_and_one_stored_before_clients_were_told_apart_still_replays(
    make_client, sql
) -> None:  # type: ignore[no-untyped-def]
    bootstrap = {"Authorization": "Bearer idempotency-bootstrap-0123456789"}
    client = await make_client(api_token="idempotency-bootstrap-0123456789")
    secrets = {}
    for name in ("shop", "shop-2"):
        response = await client.post("/api/v1/tokens/", json={"name": name, "scopes": ["write"]}, headers=bootstrap)
        secrets[name] = {"Authorization": f"Bearer {(await response.json())['secret']}"}
    user = await (await client.post("/api/v1/user/", json={"username": "u", "balance": 100}, headers=bootstrap)).json()
    path, body = f"/api/v1/user/{user['id']}/amount/", {"type": "write-off", "amount": 30}

    first = await client.post(path, json=body, headers={KEY: "order-1", **secrets["shop"]})
    assert first.status == 202
    again = await client.post(path, json=body, headers={KEY: "order-1", **secrets["shop"]})
    assert (again.status, again.headers["Idempotent-Replayed"]) == (202, "true")
    # Another client, the same key and body: never the first client's task back.
    other = await client.post(path, json=body, headers={KEY: "order-1", **secrets["shop-2"]})
    assert other.status == 422 and (await other.json())["error"]["code"] == "idempotency_key_reused"
    assert _count(sql, "tasks") == 1

    # A key stored as before (its fingerprint without the client) replays for its request.
    sql.execute(
        "UPDATE idempotency_keys SET fingerprint = %s WHERE key = 'order-1'",
        (fingerprint("POST", path, body),),
    )
    legacy = await client.post(path, json=body, headers={KEY: "order-1", **secrets["shop-2"]})
    assert (legacy.status, legacy.headers["Idempotent-Replayed"]) == (202, "true")
    assert (await legacy.json())["id"] == (await first.json())["id"]
    assert _count(sql, "tasks") == 1
