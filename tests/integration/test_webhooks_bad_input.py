"""Bad webhook requests get a clear 4xx in the one error shape and change nothing: private hosts,
other schemes, credentials in the URL, unknown events, over-long URLs, unknown ids. Management
needs the token whenever one is set, even when reads are open."""

from __future__ import annotations

from typing import Any

import psycopg2.extensions
import pytest
from aiohttp.test_utils import TestClient

from ..conftest import MakeClient

TOKEN = "webhook-admin-token-0123456789"

# (name, url, expected code) with private addresses refused (the default).
URLS: list[tuple[str, str, str]] = [
    ("loopback", "http://127.0.0.1:8080/hook", "webhook_url_not_allowed"),
    ("loopback by name", "http://localhost/hook", "webhook_url_not_allowed"),
    ("loopback, IPv6", "http://[::1]/hook", "webhook_url_not_allowed"),
    ("IPv4-mapped loopback", "http://[::ffff:127.0.0.1]/hook", "webhook_url_not_allowed"),
    ("loopback as one number", "http://2130706433/hook", "webhook_url_not_allowed"),
    ("private 10/8", "https://10.1.2.3/hook", "webhook_url_not_allowed"),
    ("private 192.168/16", "https://192.168.0.10/hook", "webhook_url_not_allowed"),
    ("link-local (cloud metadata)", "http://169.254.169.254/latest/meta-data", "webhook_url_not_allowed"),
    ("multicast", "http://224.0.0.1/hook", "webhook_url_not_allowed"),
    ("reserved", "http://240.0.0.1/hook", "webhook_url_not_allowed"),
    ("unspecified", "http://0.0.0.0/hook", "webhook_url_not_allowed"),
    ("shared address space", "http://100.64.0.1/hook", "webhook_url_not_allowed"),
    ("6to4 of a loopback address", "http://[2002:7f00:1::]/hook", "webhook_url_not_allowed"),
    ("6to4 of a private address", "http://[2002:c0a8:101::]/hook", "webhook_url_not_allowed"),
    ("site-local IPv6", "http://[fec0::1]/hook", "webhook_url_not_allowed"),
    ("IPv6 documentation range", "http://[3fff::1]/hook", "webhook_url_not_allowed"),
    ("file", "file:///etc/passwd", "invalid_webhook_url"),
    ("ftp", "ftp://example.com/hook", "invalid_webhook_url"),
    ("javascript", "javascript:alert(1)", "invalid_webhook_url"),
    ("no scheme", "example.com/hook", "invalid_webhook_url"),
    ("no host", "https:///hook", "invalid_webhook_url"),
    ("credentials", "https://user:secret@example.com/hook", "invalid_webhook_url"),
    ("empty label", "https://a..example.com/hook", "invalid_webhook_url"),
    ("bracketed name", "https://[v1.fe]/hook", "invalid_webhook_url"),
    ("user only", "https://user@example.com/hook", "invalid_webhook_url"),
    ("10,000 characters", "https://example.com/" + "a" * 9980, "invalid_webhook_url"),
    ("2,049 characters", "https://example.com/" + "a" * 2029, "invalid_webhook_url"),
    ("spaces", "https://example.com/a hook", "invalid_webhook_url"),
    ("control character", "https://example.com/\x01", "invalid_webhook_url"),
    ("NUL, which no string stored may hold", "https://example.com/\x00", "validation_failed"),
    ("an unpaired surrogate, likewise", "https://\ud800.com/", "validation_failed"),
    ("bad port", "https://example.com:99999/hook", "invalid_webhook_url"),
    ("empty", "", "invalid_webhook_url"),
    ("a name that does not resolve", "https://no-such-host.invalid/hook", "invalid_webhook_url"),
    ("a host that is not valid punycode", "https://xn--zz.example/hook", "invalid_webhook_url"),
    ("brackets and a trailing @, which yarl cannot split", "http://a@b[]c@", "invalid_webhook_url"),
    # Public addresses, but aiohttp connects only to four decimal numbers: every delivery would fail.
    ("a public address as one number", "http://16843009/hook", "invalid_webhook_url"),
    ("a public address with leading zeros", "http://001.001.001.001/hook", "invalid_webhook_url"),
]

BODIES: list[tuple[str, Any]] = [
    ("unknown event", {"url": "https://example.com/h", "events": ["task.created"]}),
    ("no events", {"url": "https://example.com/h", "events": []}),
    ("events not a list", {"url": "https://example.com/h", "events": "task.done"}),
    ("event not a string", {"url": "https://example.com/h", "events": [1]}),
    ("url not a string", {"url": 5}),
    ("url missing", {"events": ["task.done"]}),
    ("description too long", {"url": "https://example.com/h", "description": "x" * 1001}),
    ("unknown field", {"url": "https://example.com/h", "secret": "whsec_mine"}),
]


async def _nothing_registered(client: TestClient, sql: psycopg2.extensions.cursor) -> None:
    sql.execute("SELECT count(*) FROM webhook_endpoints")
    assert sql.fetchone() == (0,)
    response = await client.get("/api/v1/webhooks/")
    assert response.status == 200 and await response.json() == []


def _error(body: Any, code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body


@pytest.mark.parametrize(("name", "url", "code"), URLS, ids=[u[0] for u in URLS])
async def test_a_bad_url_is_refused(
    client: TestClient, sql: psycopg2.extensions.cursor, name: str, url: str, code: str
) -> None:
    response = await client.post("/api/v1/webhooks/", json={"url": url})
    assert response.status == 400, await response.text()
    _error(await response.json(), code)
    await _nothing_registered(client, sql)


@pytest.mark.parametrize(("name", "body"), BODIES, ids=[b[0] for b in BODIES])
async def test_a_bad_body_is_refused(client: TestClient, sql: psycopg2.extensions.cursor, name: str, body: Any) -> None:
    response = await client.post("/api/v1/webhooks/", json=body)
    assert response.status == 400, await response.text()
    _error(await response.json(), "validation_failed")
    await _nothing_registered(client, sql)


async def test_a_patch_to_a_private_url_changes_nothing(make_client: MakeClient) -> None:
    open_client = await make_client(webhook_allow_private=True)
    response = await open_client.post("/api/v1/webhooks/", json={"url": "http://127.0.0.1:9/h"})
    hook = await response.json()
    strict = await make_client()
    for patch, code in (
        ({"url": "http://10.0.0.1/"}, "webhook_url_not_allowed"),
        ({"url": "ftp://example.com/"}, "invalid_webhook_url"),
        ({"events": ["task.pending"]}, "validation_failed"),
        ({"status": "paused"}, "validation_failed"),
    ):
        response = await strict.patch(f"/api/v1/webhooks/{hook['id']}", json=patch)
        assert response.status == 400, patch
        _error(await response.json(), code)
    after = await (await strict.get(f"/api/v1/webhooks/{hook['id']}")).json()
    assert {k: after[k] for k in ("url", "events", "status")} == {k: hook[k] for k in ("url", "events", "status")}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/webhooks/9999", None),
        ("PATCH", "/api/v1/webhooks/9999", {"description": "x"}),
        ("DELETE", "/api/v1/webhooks/9999", None),
        ("POST", "/api/v1/webhooks/9999/rotate-secret", None),
        ("GET", "/api/v1/webhooks/9999/deliveries/", None),
        ("POST", "/api/v1/webhooks/9999/deliveries/1/retry", None),
        ("POST", "/api/v1/webhooks/9999/replay", {"since": "2026-01-01T00:00:00Z"}),
    ],
)
async def test_an_unknown_webhook_id_is_404(client: TestClient, method: str, path: str, body: Any) -> None:
    response = await client.request(method, path, json=body)
    assert response.status == 404, await response.text()
    body = await response.json()
    _error(body, "webhook_not_found")
    assert body["error"]["details"] == {"webhook_id": "9999"}


@pytest.mark.parametrize(
    "path", ["/api/v1/webhooks/0", "/api/v1/webhooks/abc", "/api/v1/webhooks/1/deliveries/x/retry"]
)
async def test_a_malformed_id_is_400(client: TestClient, path: str) -> None:
    method = "POST" if path.endswith("retry") else "GET"
    response = await client.request(method, path)
    assert response.status == 400
    _error(await response.json(), "invalid_id")


@pytest.mark.parametrize(
    "query", ["?status=lost", "?limit=0", "?limit=1001", "?before=-1", "?other=1", "?status=failed&status=pending"]
)
async def test_a_bad_delivery_log_query_is_400(make_client: MakeClient, query: str) -> None:
    client = await make_client(webhook_allow_private=True)
    hook = await (await client.post("/api/v1/webhooks/", json={"url": "http://127.0.0.1:9/h"})).json()
    response = await client.get(f"/api/v1/webhooks/{hook['id']}/deliveries/{query}")
    assert response.status == 400
    _error(await response.json(), "validation_failed")


@pytest.mark.parametrize("body", [{"x": 1}, {"metadata": {"a": "b"}}, {"reference": "r"}, []])
async def test_rotate_secret_and_retry_take_no_fields(
    make_client: MakeClient, sql: psycopg2.extensions.cursor, body: Any
) -> None:
    client = await make_client(webhook_allow_private=True)
    hook = await (await client.post("/api/v1/webhooks/", json={"url": "http://127.0.0.1:9/h"})).json()
    sql.execute("SELECT * FROM webhook_endpoints")
    before = sql.fetchall()
    for path in (f"/api/v1/webhooks/{hook['id']}/rotate-secret", f"/api/v1/webhooks/{hook['id']}/deliveries/1/retry"):
        response = await client.post(path, json=body)
        assert response.status == 400, (path, await response.text())
        _error(await response.json(), "validation_failed" if body != [] else "invalid_json")
    sql.execute("SELECT * FROM webhook_endpoints")
    assert sql.fetchall() == before  # the secret not rotated
    assert (await client.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret", json={})).status == 200


# A future instant replays nothing: a client's mistake (a local time written as UTC, say), not a
# 202 with nothing queued.
@pytest.mark.parametrize("since", ["yesterday", "2026-01-01T00:00:00", 5, None, "2999-01-01T00:00:00Z"])
async def test_a_bad_replay_is_400(make_client: MakeClient, since: Any) -> None:
    client = await make_client(webhook_allow_private=True)
    hook = await (await client.post("/api/v1/webhooks/", json={"url": "http://127.0.0.1:9/h"})).json()
    response = await client.post(f"/api/v1/webhooks/{hook['id']}/replay", json={"since": since})
    assert response.status == 400
    _error(await response.json(), "validation_failed")


async def test_management_needs_the_token_even_when_reads_are_open(
    make_client: MakeClient, sql: psycopg2.extensions.cursor
) -> None:
    client = await make_client(api_token=TOKEN, webhook_allow_private=True)
    assert (await client.get("/api/v1/user/")).status == 200  # reads are open...
    for method, path in (
        ("GET", "/api/v1/webhooks/"),  # ...but not these
        ("GET", "/api/v1/webhooks/1"),
        ("GET", "/api/v1/webhooks/1/deliveries/"),
        ("POST", "/api/v1/webhooks/"),
        ("PATCH", "/api/v1/webhooks/1"),
        ("DELETE", "/api/v1/webhooks/1"),
        ("POST", "/api/v1/webhooks/1/rotate-secret"),
    ):
        response = await client.request(method, path, json={"url": "http://127.0.0.1:9/h"})
        assert response.status == 401, (method, path)
        _error(await response.json(), "unauthorized")
    sql.execute("SELECT count(*) FROM webhook_endpoints")
    assert sql.fetchone() == (0,)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = await client.post("/api/v1/webhooks/", json={"url": "http://127.0.0.1:9/h"}, headers=auth)
    assert response.status == 201
    assert (await client.get("/api/v1/webhooks/", headers=auth)).status == 200


async def test_a_patch_that_changes_nothing_keeps_updated_at_and_the_reason(
    make_client: MakeClient, sql: psycopg2.extensions.cursor
) -> None:
    """The README tells a client to replay a disabled endpoint's gap from its `updated_at`: a PATCH
    that changes nothing (`{}`, or disabling it again) must not move that instant later, which
    would leave the events in between out of the replay, nor replace why it was disabled."""
    client = await make_client(webhook_allow_private=True)
    hook = await (await client.post("/api/v1/webhooks/", json={"url": "http://127.0.0.1:9/h"})).json()
    path = f"/api/v1/webhooks/{hook['id']}"
    disabled = await (await client.patch(path, json={"status": "disabled"})).json()
    assert disabled["status"] == "disabled" and disabled["disabled_reason"] == "manual"
    for patch in ({}, {"status": "disabled"}, {"url": hook["url"], "events": hook["events"], "description": ""}):
        response = await client.patch(path, json=patch)
        assert response.status == 200, await response.text()
        assert (await response.json())["updated_at"] == disabled["updated_at"], patch
    # Disabled by a 410 (the sender's doing), then disabled again by hand: still "gone".
    sql.execute("UPDATE webhook_endpoints SET disabled_reason = 'gone' WHERE id = %s", (int(hook["id"]),))
    again = await (await client.patch(path, json={"status": "disabled"})).json()
    assert again["disabled_reason"] == "gone" and again["updated_at"] == disabled["updated_at"]
    # A real change still moves it.
    changed = await (await client.patch(path, json={"description": "now"})).json()
    assert changed["updated_at"] > disabled["updated_at"] and changed["disabled_reason"] == "gone"
    enabled = await (await client.patch(path, json={"status": "enabled"})).json()
    assert enabled["status"] == "enabled" and enabled["disabled_reason"] is None
