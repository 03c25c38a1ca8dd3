"""Hostile input beyond tests/integration/test_bad_input.py: unknown methods on every route,
usernames built to break queries, compressed and chunked bodies. Each gets a 4xx JSON error
(or, for usernames, is stored verbatim) and changes nothing else."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ..helpers import create_user, wait_processed

JSON = {"Content-Type": "application/json"}


def _state(sql) -> tuple[list[Any], list[Any]]:  # type: ignore[no-untyped-def]
    sql.execute("SELECT id, username, balance FROM users ORDER BY id")
    users = sql.fetchall()
    sql.execute("SELECT id, status FROM tasks ORDER BY id")
    return users, sql.fetchall()


def _assert_error(body: Any, code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body


ROUTES = {
    "/api/v1/user/": {"GET", "HEAD", "POST"},
    "/api/v1/user/{user}": {"GET", "HEAD"},
    "/api/v1/user/{user}/amount/": {"POST"},
    "/api/v1/user/{user}/tasks": {"GET", "HEAD"},
    "/api/v1/task/{task}": {"GET", "HEAD"},
    "/health": {"GET", "HEAD"},
    "/ready": {"GET", "HEAD"},
}
# Methods aiohttp's parser knows; any other token is refused by the parser itself (see below).
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "PURGE"]


async def test_unknown_methods_on_every_route_are_405_json_with_allow(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "target", 10)
    response = await client.post(f"/api/v1/user/{user['id']}/amount/", json={"type": "write-off", "amount": 1})
    task = await wait_processed(client, (await response.json())["id"])
    before = _state(sql)
    for template, allowed in ROUTES.items():
        # API paths work with and without the trailing slash; the probes only without.
        variants = {template.rstrip("/"), template.rstrip("/") + "/"} if template.startswith("/api") else {template}
        for path in variants:
            concrete = path.format(user=user["id"], task=task["id"])
            for method in METHODS:
                if method in allowed:
                    continue
                response = await client.request(method, concrete, data=b'{"amount": 1}', headers=JSON)
                assert response.status == 405, (method, concrete, response.status)
                if method != "HEAD":  # a HEAD answer has no body
                    _assert_error(await response.json(), "method_not_allowed")
                assert set(response.headers["Allow"].replace(" ", "").split(",")) == allowed, (method, concrete)
    assert _state(sql) == before


@pytest.mark.parametrize("method", ["FOO", "BREW", "get", "G\u00c9T"])
async def test_methods_the_parser_does_not_know_are_refused_and_change_nothing(
    client: TestClient, sql, method: str
) -> None:  # type: ignore[no-untyped-def]
    """aiohttp's HTTP parser refuses these itself (no handler or middleware runs) and closes the
    connection; through aiohttp's TestServer the 400 is plain text, `serve` answers it in the JSON
    error shape (tests/integration/test_bad_http.py)."""
    user = await create_user(client, "target", 10)
    before = _state(sql)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            method.encode()
            + f" /api/v1/user/{user['id']}/amount/ HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 38\r\n\r\n"
            '{"type": "replenishment", "amount": 5}'.encode()
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.split(b" ")[1] == b"400", answer[:80]
    assert _state(sql) == before
    assert (await client.get("/health")).status == 200


NAMES = [
    "O'Brien",
    'say "hi"',
    "Robert'); DROP TABLE users;--",
    "back\\slash",
    "%s %(username)s {0}",
    "$1 :name ?",
    "日本語のユーザー",
    "مستخدم",
    "Ελληνικά",
    "🙂👍🏽",
    "e\u0301",  # a combining accent, stored as sent (not normalised)
    "\u202eright-to-left",
    "zero\u200bwidth",
    " padded ",
    "x" * 64,
    "ж" * 64,
    "🙂" * 64,
]


@pytest.mark.parametrize("name", NAMES)
async def test_usernames_are_stored_verbatim(client: TestClient, sql, name: str) -> None:  # type: ignore[no-untyped-def]
    created = await create_user(client, name, 7)
    assert created["username"] == name
    fetched = await (await client.get(f"/api/v1/user/{created['id']}")).json()
    assert fetched["username"] == name
    sql.execute("SELECT username FROM users WHERE id = %s", (int(created["id"]),))
    assert sql.fetchone()[0] == name
    # And it is a value, never SQL: the table is intact and holds exactly this user.
    sql.execute("SELECT count(*) FROM users")
    assert sql.fetchone()[0] == 1
    assert (await client.post("/api/v1/user/", json={"username": name, "balance": 1})).status == 409


@pytest.mark.parametrize(
    "name",
    ["nul\u0000byte", "\u0000", "tab\there", "new\nline", "bell\u0007", "del\u007f", "c1\u0085", "x" * 65, "🙂" * 65],
)
async def test_usernames_that_cannot_be_stored_are_refused_clearly(client: TestClient, sql, name: str) -> None:  # type: ignore[no-untyped-def]
    response = await client.post("/api/v1/user/", data=json.dumps({"username": name, "balance": 1}), headers=JSON)
    assert response.status == 400
    body = await response.json()
    _assert_error(body, "validation_failed")
    assert "username" in body["error"]["details"]["fields"]
    assert _state(sql) == ([], [])


async def test_nul_escape_in_raw_json_is_refused(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    response = await client.post("/api/v1/user/", data=b'{"username": "a\\u0000", "balance": 1}', headers=JSON)
    assert response.status == 400
    assert _state(sql) == ([], [])


async def test_compressed_body_is_limited_after_decompression(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "bomb", 0)
    before = _state(sql)
    padding = b" " * 5_000_000  # whitespace is valid JSON padding: 5 MB that compresses to a few KB
    for encoding, packed in [
        ("gzip", gzip.compress(b'{"type": "replenishment", "amount": 5}' + padding)),
        ("deflate", zlib.compress(b'{"type": "replenishment", "amount": 5}' + padding)),
    ]:
        assert len(packed) < 64 * 1024
        response = await client.post(
            f"/api/v1/user/{user['id']}/amount/", data=packed, headers={**JSON, "Content-Encoding": encoding}
        )
        assert response.status == 413, (encoding, response.status)
        _assert_error(await response.json(), "payload_too_large")
    assert _state(sql) == before


async def test_broken_compressed_body_is_400(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "broken", 0)
    before = _state(sql)
    response = await client.post(
        f"/api/v1/user/{user['id']}/amount/", data=b"not gzip at all", headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert response.status == 400
    _assert_error(await response.json(), "invalid_body")
    assert _state(sql) == before


async def test_chunked_oversized_body_is_413(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "chunky", 0)
    before = _state(sql)

    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"type": "replenishment", "amount": 5, "pad": "'
        for _ in range(100):
            yield b"x" * 10_000
        yield b'"}'

    response = await client.post(f"/api/v1/user/{user['id']}/amount/", data=chunks(), headers=JSON)
    assert response.status == 413
    _assert_error(await response.json(), "payload_too_large")
    assert _state(sql) == before


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "replenishment", "amount": 5}\x00',
        b'\xef\xbb\xbf{"type": "replenishment", "amount": 5}',  # a UTF-8 byte order mark
        b'{"type": "replenishment", "amount": 5} {"type": "write-off", "amount": 5}',
        b'{"type": "replenishment", "amount": 5}' + b"]" * 10,
        b"[" * 100_00 + b"]" * 100_00,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"type": "replen\\u0000ishment", "amount": 5}',
        b'{"type": "replenishment", "amount": 5, "": 1}',
        b'{"type": "replenishment", "amount": -0}',
        b'{"type": "replenishment", "amount": 0x10}',
        b'{"type": "replenishment", "amount": 1_000}',
        b"{'type': 'replenishment', 'amount': 5}",
    ],
)
async def test_more_malformed_bodies_are_400(client: TestClient, sql, body: bytes) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "target", 0)
    before = _state(sql)
    response = await client.post(f"/api/v1/user/{user['id']}/amount/", data=body, headers=JSON)
    assert response.status == 400, (body[:60], response.status)
    assert response.content_type == "application/json"
    assert (await response.json())["error"]["code"] in ("invalid_json", "validation_failed")
    assert _state(sql) == before


async def test_head_on_the_streamed_user_list_sends_no_body(client: TestClient) -> None:
    """A HEAD answer with a body would be read as the start of the next answer on the connection."""
    await create_user(client, "listed", 1)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            b"HEAD /api/v1/user/ HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), first
    assert rest.startswith(b"HTTP/1.1 200"), rest[:80]


# Strings PostgreSQL cannot store (NUL) or UTF-8 cannot encode (an unpaired surrogate), in a key or
# a value, wherever a client can put one. The surrogate comes as a JSON escape or, in a query
# string, percent-encoded NUL; either is a 400 in valid JSON (the answer may echo it, \u-escaped).
UNSTORABLE_BODIES = [b'{"\\ud800": 1}', b'{"description": "a\\u0000b"}', b'{"description": "\\ud800"}']
UNSTORABLE_QUERIES = [
    "/api/v1/user/{user}/tasks?created_by=%00",
    "/api/v1/user/{user}/tasks?created_by=a%00b",
    "/api/v1/user/{user}/tasks?reference=%00",
    "/api/v1/user/?username_prefix=a&after_username=%00",
    "/api/v1/user/?username=%00",
]


async def test_strings_that_cannot_be_stored_are_400_json_everywhere(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    user = await create_user(client, "target", 100)
    hold = await (await client.post(f"/api/v1/user/{user['id']}/holds/", json={"amount": 10})).json()
    # Applied before the endpoint exists: a hold applied after would be a delivery, whose failed
    # attempt (no route to that address) changes the endpoint's row (failing_since) meanwhile.
    await wait_processed(client, hold["id"])
    webhook = await (await client.post("/api/v1/webhooks/", json={"url": "https://93.184.216.34/h"})).json()
    sql.execute("SELECT * FROM webhook_endpoints ORDER BY id")  # the secret too: rotate-secret is among the posts
    webhooks = sql.fetchall()
    before = _state(sql)
    posts = [
        ("POST", "/api/v1/user/"),
        ("POST", f"/api/v1/user/{user['id']}/amount/"),
        ("POST", f"/api/v1/user/{user['id']}/transfer/"),
        ("POST", f"/api/v1/user/{user['id']}/holds/"),
        ("POST", f"/api/v1/hold/{hold['id']}/capture/"),
        ("POST", f"/api/v1/hold/{hold['id']}/void/"),
        ("POST", "/api/v1/webhooks/"),
        ("PATCH", f"/api/v1/webhooks/{webhook['id']}"),
        ("POST", f"/api/v1/webhooks/{webhook['id']}/rotate-secret"),
        ("POST", f"/api/v1/webhooks/{webhook['id']}/replay"),
        ("POST", "/api/v1/tokens/"),
    ]
    for method, path in posts:
        for body in UNSTORABLE_BODIES:
            response = await client.request(method, path, data=body, headers=JSON)
            assert (response.status, response.content_type) == (400, "application/json"), (path, body)
            _assert_error(json.loads(await response.read()), "validation_failed")
    for template in UNSTORABLE_QUERIES:
        response = await client.get(template.format(user=user["id"]))
        assert (response.status, response.content_type) == (400, "application/json"), template
        _assert_error(await response.json(), "validation_failed")
    assert _state(sql) == before
    sql.execute("SELECT * FROM webhook_endpoints ORDER BY id")
    assert sql.fetchall() == webhooks
    sql.execute("SELECT count(*) FROM api_tokens")
    assert sql.fetchone() == (0,)


async def test_a_last_event_id_that_is_not_utf8_is_400_json(client: TestClient) -> None:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nLast-Event-ID: \xff\xfe\r\n\r\n")
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head, answer
    _assert_error(json.loads(body), "invalid_last_event_id")
