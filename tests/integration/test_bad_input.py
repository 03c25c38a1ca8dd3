"""Every class of bad request gets a 4xx JSON error in the one error shape and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ..helpers import create_user

JSON = {"Content-Type": "application/json"}
BIG = 2**63

# (name, body bytes, expected status, expected error code) for POST .../amount/
TASK_BODIES: list[tuple[str, bytes, int, str]] = [
    ("empty body", b"", 400, "invalid_json"),
    ("whitespace body", b"   ", 400, "invalid_json"),
    ("malformed", b'{"type": "replenishment", "amount": 5', 400, "invalid_json"),
    ("invalid utf-8", b'{"type": "replenishment\xff", "amount": 5}', 400, "invalid_json"),
    ("duplicate keys", b'{"type": "replenishment", "amount": 5, "amount": 500}', 400, "invalid_json"),
    ("NaN", b'{"type": "replenishment", "amount": NaN}', 400, "invalid_json"),
    ("Infinity", b'{"type": "replenishment", "amount": Infinity}', 400, "invalid_json"),
    ("thousands of digits", b'{"type": "replenishment", "amount": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("array body", b'[{"type": "replenishment", "amount": 5}]', 400, "invalid_json"),
    ("string body", b'"replenishment"', 400, "invalid_json"),
    ("number body", b"5", 400, "invalid_json"),
    ("null body", b"null", 400, "invalid_json"),
    ("float amount", b'{"type": "replenishment", "amount": 5.0}', 400, "validation_failed"),
    ("fractional amount", b'{"type": "replenishment", "amount": 5.5}', 400, "validation_failed"),
    ("exponent amount", b'{"type": "replenishment", "amount": 5e2}', 400, "validation_failed"),
    ("string amount", b'{"type": "replenishment", "amount": "5"}', 400, "validation_failed"),
    ("boolean amount", b'{"type": "replenishment", "amount": true}', 400, "validation_failed"),
    ("null amount", b'{"type": "replenishment", "amount": null}', 400, "validation_failed"),
    ("zero amount", b'{"type": "replenishment", "amount": 0}', 400, "validation_failed"),
    ("negative amount", b'{"type": "write-off", "amount": -5}', 400, "validation_failed"),
    ("amount past bigint", json.dumps({"type": "replenishment", "amount": BIG}).encode(), 400, "validation_failed"),
    ("missing amount", b'{"type": "replenishment"}', 400, "validation_failed"),
    ("missing type", b'{"amount": 5}', 400, "validation_failed"),
    ("unknown type", b'{"type": "withdrawal", "amount": 5}', 400, "validation_failed"),
    ("type in wrong case", b'{"type": "Replenishment", "amount": 5}', 400, "validation_failed"),
    ("type not a string", b'{"type": 1, "amount": 5}', 400, "validation_failed"),
    ("unknown field", b'{"type": "replenishment", "amount": 5, "user_id": 1}', 400, "validation_failed"),
    ("empty object", b"{}", 400, "validation_failed"),
]


async def _snapshot(client: TestClient) -> Any:
    return await (await client.get("/api/v1/user/")).json()


@pytest.fixture
async def victim(client: TestClient) -> dict[str, Any]:
    return await create_user(client, "victim", 100)


def _assert_error_shape(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in json.dumps(body) and "psycopg2" not in json.dumps(body)


@pytest.mark.parametrize(("name", "body", "status", "code"), TASK_BODIES, ids=[t[0] for t in TASK_BODIES])
async def test_bad_task_bodies(
    client: TestClient, sql, victim: dict[str, Any], name: str, body: bytes, status: int, code: str
) -> None:  # type: ignore[no-untyped-def]
    response = await client.post(f"/api/v1/user/{victim['id']}/amount/", data=body, headers=JSON)
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    _assert_error_shape(await response.json(), code)
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 0


USER_BODIES: list[tuple[str, Any]] = [
    ("empty username", {"username": "", "balance": 1}),
    ("blank username", {"username": "   ", "balance": 1}),
    ("65 characters", {"username": "x" * 65, "balance": 1}),
    ("NUL byte", {"username": "a\u0000b", "balance": 1}),
    ("control character", {"username": "a\u0007b", "balance": 1}),
    ("lone surrogate", {"username": "a\ud800b", "balance": 1}),
    ("username not a string", {"username": 5, "balance": 1}),
    ("negative balance", {"username": "n", "balance": -1}),
    ("float balance", {"username": "n", "balance": 1.5}),
    ("string balance", {"username": "n", "balance": "1"}),
    ("boolean balance", {"username": "n", "balance": False}),
    ("balance past bigint", {"username": "n", "balance": BIG}),
    ("missing balance", {"username": "n"}),
    ("extra field", {"username": "n", "balance": 1, "id": "7"}),
]


@pytest.mark.parametrize(("name", "body"), USER_BODIES, ids=[u[0] for u in USER_BODIES])
async def test_bad_user_bodies(client: TestClient, victim: dict[str, Any], name: str, body: Any) -> None:
    before = await _snapshot(client)
    response = await client.post("/api/v1/user/", data=json.dumps(body), headers=JSON)
    assert response.status == 400, await response.text()
    _assert_error_shape(await response.json(), "validation_failed")
    assert await _snapshot(client) == before


async def test_username_of_64_characters_and_any_script_is_fine(client: TestClient) -> None:
    assert (await client.post("/api/v1/user/", json={"username": "ж" * 64, "balance": 0})).status == 201


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("application/json; charset=latin-1", 415)],
)
async def test_wrong_content_type(client: TestClient, victim: dict[str, Any], content_type: str, status: int) -> None:
    body = b'{"type": "replenishment", "amount": 5}'
    response = await client.post(
        f"/api/v1/user/{victim['id']}/amount/", data=body, headers={"Content-Type": content_type}
    )
    assert response.status == status
    _assert_error_shape(await response.json(), "unsupported_media_type")


async def test_missing_content_type(client: TestClient, victim: dict[str, Any]) -> None:
    response = await client.post(f"/api/v1/user/{victim['id']}/amount/", data=b'{"type": "replenishment"}')
    assert response.status == 415


async def test_json_with_utf8_charset_is_fine(client: TestClient, victim: dict[str, Any]) -> None:
    response = await client.post(
        f"/api/v1/user/{victim['id']}/amount/",
        data=b'{"type": "replenishment", "amount": 5}',
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert response.status == 202


async def test_oversized_body_is_413(client: TestClient, victim: dict[str, Any], sql) -> None:  # type: ignore[no-untyped-def]
    body = b'{"type": "replenishment", "amount": 5, "pad": "' + b"x" * 200_000 + b'"}'
    response = await client.post(f"/api/v1/user/{victim['id']}/amount/", data=body, headers=JSON)
    assert response.status == 413
    _assert_error_shape(await response.json(), "payload_too_large")
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == 0


@pytest.mark.parametrize(
    "user_id", ["abc", "-1", "0", "1.5", "9223372036854775808", "99999999999999999999999", "%20", "١٢", "1e3"]
)
async def test_bad_ids(client: TestClient, user_id: str) -> None:
    for response in [
        await client.get(f"/api/v1/user/{user_id}"),
        await client.get(f"/api/v1/user/{user_id}/tasks"),
        await client.get(f"/api/v1/task/{user_id}"),
        await client.post(f"/api/v1/user/{user_id}/amount/", json={"type": "replenishment", "amount": 1}),
    ]:
        assert response.status == 400, (user_id, response.status)
        _assert_error_shape(await response.json(), "invalid_id")


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "after=x",
        "after=-1",
        "limit=1&limit=2",
        "lmit=5",
        "after=99999999999999999999",
    ],
)
async def test_bad_paging(client: TestClient, query: str) -> None:
    response = await client.get(f"/api/v1/user/?{query}")
    assert response.status == 400, query
    _assert_error_shape(await response.json(), "validation_failed")


async def test_unknown_method_is_405_with_allow(client: TestClient, victim: dict[str, Any]) -> None:
    response = await client.delete(f"/api/v1/user/{victim['id']}")
    assert response.status == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    _assert_error_shape(await response.json(), "method_not_allowed")
    response = await client.put("/api/v1/user/", json={})
    assert response.status == 405
    assert "POST" in response.headers["Allow"]


async def test_unknown_path_is_json_404(client: TestClient) -> None:
    response = await client.get("/api/v2/nothing")
    assert response.status == 404
    _assert_error_shape(await response.json(), "not_found")
