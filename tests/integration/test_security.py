"""The optional API token, the request limits, slow clients, and error bodies that never leak
internals, all through real HTTP against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from .. import pg
from ..helpers import create_user

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASK = {"type": "replenishment", "amount": 5}


def _count(sql, table: str) -> int:  # type: ignore[no-untyped-def]
    sql.execute(f"SELECT count(*) FROM {table}")
    return int(sql.fetchone()[0])


def _assert_error(body: Any, code: str) -> None:
    assert set(body) == {"error"} and body["error"]["code"] == code, body


# -- the token -----------------------------------------------------------------------------------


@pytest.fixture
async def guarded(make_client) -> TestClient:  # type: ignore[no-untyped-def]
    return await make_client(api_token=TOKEN)


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        ({"Authorization": "Bearer wrong-token-0123456789"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "invalid_token"),
        ({"Authorization": f"Basic {TOKEN}"}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": TOKEN}, None),
        ({"Authorization": "Bearer ключ-не-тот-0123456789"}, "invalid_token"),
    ],
)
async def test_state_changes_need_the_token(
    guarded: TestClient, sql, headers: dict[str, str], error: str | None
) -> None:  # type: ignore[no-untyped-def]
    user = await create_user_with_token(guarded, "holder", 10)
    for method, path, body in [
        ("POST", "/api/v1/user/", {"username": "intruder", "balance": 1}),
        ("POST", f"/api/v1/user/{user['id']}/amount/", TASK),
        ("DELETE", f"/api/v1/user/{user['id']}", None),
        ("PUT", "/api/v1/user/", {}),
        ("PATCH", f"/api/v1/task/{1}", {}),
    ]:
        response = await guarded.request(method, path, json=body, headers=headers)
        assert response.status == 401, (method, path, response.status)
        _assert_error(await response.json(), "unauthorized")
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="message_broker"')
        assert ('error="invalid_token"' in challenge) == (error == "invalid_token")
    assert (_count(sql, "users"), _count(sql, "tasks")) == (1, 0)


async def create_user_with_token(client: TestClient, username: str, balance: int) -> dict[str, Any]:
    response = await client.post("/api/v1/user/", json={"username": username, "balance": balance}, headers=AUTH)
    assert response.status == 201, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def test_the_right_token_passes_and_reads_stay_open_by_default(guarded: TestClient) -> None:
    user = await create_user_with_token(guarded, "holder", 10)
    response = await guarded.post(f"/api/v1/user/{user['id']}/amount/", json=TASK, headers=AUTH)
    assert response.status == 202
    lowercase = {"authorization": f"bearer   {TOKEN}  "}
    assert (await guarded.post(f"/api/v1/user/{user['id']}/amount/", json=TASK, headers=lowercase)).status == 202
    for path in [f"/api/v1/user/{user['id']}", "/api/v1/user/", f"/api/v1/user/{user['id']}/tasks", "/health"]:
        assert (await guarded.get(path)).status == 200, path


async def test_reads_can_be_closed_too(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(api_token=TOKEN, api_token_protect_reads=True)
    user = await create_user_with_token(client, "holder", 10)
    for path in [f"/api/v1/user/{user['id']}", "/api/v1/user/", f"/api/v1/user/{user['id']}/tasks", "/api/v1/task/1"]:
        response = await client.get(path)
        assert response.status == 401, path
        _assert_error(await response.json(), "unauthorized")
        assert (await client.get(path, headers=AUTH)).status in (200, 404)
    # Probes stay open for load balancers.
    assert (await client.get("/health")).status == 200
    assert (await client.get("/ready")).status in (200, 503)


async def test_no_token_configured_means_open(client: TestClient) -> None:
    assert (await client.post("/api/v1/user/", json={"username": "free", "balance": 0})).status == 201


# -- request limits ------------------------------------------------------------------------------


async def test_long_header_is_431_json(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "limits", 0)
    response = await client.post(f"/api/v1/user/{user['id']}/amount/", json=TASK, headers={"X-Padding": "x" * 9_000})
    assert response.status == 431
    _assert_error(await response.json(), "headers_too_large")
    assert _count(sql, "tasks") == 0


async def test_too_many_headers_is_431_json(client: TestClient) -> None:
    response = await client.get("/api/v1/user/", headers={f"X-H{i}": "v" for i in range(80)})
    assert response.status == 431
    _assert_error(await response.json(), "headers_too_large")


async def test_long_request_line_is_414_json(client: TestClient) -> None:
    response = await client.get("/api/v1/user/?after=" + "1" * 9_000)
    assert response.status == 414
    _assert_error(await response.json(), "uri_too_long")


async def test_absurd_header_is_refused_by_the_parser_and_changes_nothing(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    """Past twice the limit aiohttp's parser refuses the request before it is one (400 through the
    TestServer; `serve` answers a JSON 431, tests/integration/test_bad_http.py)."""
    user = await create_user(client, "limits", 0)
    status, _ = await _raw_request(
        client,
        f"POST /api/v1/user/{user['id']}/amount/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Padding: {'x' * 40_000}\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
    )
    assert status.split()[1] == b"400", status
    assert _count(sql, "tasks") == 0
    assert (await client.get("/health")).status == 200


async def _raw_request(client: TestClient, data: bytes, read_timeout: float = 10.0) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


async def test_slow_body_gets_408_and_the_connection_closed(make_client, sql) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(request_body_timeout=0.5)
    user = await create_user(client, "slow", 0)
    body = json.dumps(TASK).encode()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            f"POST /api/v1/user/{user['id']}/amount/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        await writer.drain()
        # The rest never comes; the server answers and hangs up (read() returns at EOF).
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    _assert_error(json.loads(payload), "request_timeout")
    assert _count(sql, "tasks") == 0


async def test_client_that_never_finishes_its_headers_is_disconnected(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(keepalive_timeout=0.5)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(b"GET /api/v1/user/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the server, nothing answered
    finally:
        writer.close()


# -- no internals in error bodies ----------------------------------------------------------------


async def test_unexpected_database_error_is_a_bare_500(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "victim", 1)
    sql.execute("ALTER TABLE tasks RENAME TO tasks_renamed")  # every task query now fails
    for response in [
        await client.get("/api/v1/task/1"),
        await client.post(f"/api/v1/user/{user['id']}/amount/", json=TASK),
    ]:
        assert response.status == 500
        text = await response.text()
        _assert_error(json.loads(text), "internal_error")
        for leak in ("tasks", "relation", "SELECT", "INSERT", "Traceback", "psycopg2", "File ", ".py"):
            assert leak not in text, (leak, text)


async def test_database_unavailable_says_so_without_details(
    make_client, sql, database_url: str, pg_admin_dsn: str
) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(pool_acquire_timeout=0.3, pool_min_size=0)
    user = await create_user(client, "victim", 1)
    with pg.refusing_connections(pg_admin_dsn, database_url, sql) as dbname:
        response = await client.get(f"/api/v1/user/{user['id']}")
        text = await response.text()
    assert response.status == 503 and response.headers["Retry-After"]
    _assert_error(json.loads(text), "database_unavailable")
    for leak in ("FATAL", "connection", "socket", "5432", "psycopg2", "Traceback", dbname):
        assert leak not in text, (leak, text)
