"""What an integrator meets on day one (issue 23): counters that count keyed requests, answers
that say what to do, exact username lookup, history filters, Link headers, one rule for unknown
query parameters, GET /, the API's description open under API_TOKEN_PROTECT_READS, HTTP metrics."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from message_broker.http.openapi import DOCS_PATH, SPEC_PATH

from ..helpers import create_user, eventually, post_task, scrape, value, wait_processed

TOKEN = "a-long-enough-test-token-0123456789"


async def _hold(client: TestClient, user_id: str, amount: int) -> str:
    response = await client.post(f"/api/v1/user/{user_id}/holds/?wait=5", json={"amount": amount})
    assert response.status == 200, await response.text()
    return str((await response.json())["id"])


async def _accepted(client: TestClient) -> tuple[dict[str, float], int]:
    """accepted_total by type from /metrics, and the sum of /api/v1/stats' accepted series."""
    samples = await scrape(client)
    by_type = {
        dict(labels)["type"]: count
        for (name, labels), count in samples.items()
        if name == "message_broker_tasks_accepted_total"
    }
    stats = await (await client.get("/api/v1/stats")).json()
    return {t: c for t, c in by_type.items() if c}, sum(stats["series"]["accepted"])


async def test_every_stored_task_counts_once_whatever_the_path_and_a_replay_counts_nothing(
    client: TestClient,
) -> None:
    payer = await create_user(client, "payer", 1000)
    payee = await create_user(client, "payee", 0)
    hold_id = await _hold(client, payer["id"], 10)  # 1 hold, unkeyed
    other_hold = await _hold(client, payer["id"], 10)  # 1 more
    keyed: list[tuple[str, dict[str, Any] | None]] = [
        (f"/api/v1/user/{payer['id']}/amount/", {"type": "replenishment", "amount": 5}),
        (f"/api/v1/user/{payer['id']}/transfer/", {"to": payee["id"], "amount": 5}),
        (f"/api/v1/user/{payer['id']}/holds/", {"amount": 5}),
        (f"/api/v1/hold/{hold_id}/capture/", {"amount": 5}),
        (f"/api/v1/hold/{other_hold}/void/", None),
    ]
    for n, (path, body) in enumerate(keyed):
        headers = {"Idempotency-Key": f"day-one-{n}"}
        first = await client.post(path, json=body, headers=headers)
        assert first.status == 202, await first.text()
        for _ in range(2):  # retries: the same answer, nothing stored, nothing counted
            again = await client.post(path, json=body, headers=headers)
            assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
            assert (await again.json())["id"] == (await first.json())["id"]
        await wait_processed(client, (await first.json())["id"])
    unkeyed = await post_task(client, payer["id"], "write-off", 1)
    await wait_processed(client, unkeyed["id"])

    expected = {"hold": 3, "replenishment": 1, "transfer": 1, "capture": 1, "void": 1, "write-off": 1}
    by_type, series = await _accepted(client)
    assert by_type == expected
    assert series == sum(expected.values())


async def test_username_taken_names_the_existing_user(client: TestClient) -> None:
    user = await create_user(client, "Taken", 1)
    for headers in ({}, {"Idempotency-Key": "taken-1"}):
        response = await client.post("/api/v1/user/", json={"username": "Taken", "balance": 0}, headers=headers)
        assert response.status == 409
        error = (await response.json())["error"]
        assert error["code"] == "username_taken" and error["details"] == {"id": user["id"]}


async def test_messages_say_what_to_send(client: TestClient) -> None:
    user = await create_user(client, "messages", 10)
    cases = [
        (f"/api/v1/user/{user['id']}/transfer/", {"to": 3, "amount": 1}, "to", "must be a string of digits"),
        (f"/api/v1/user/{user['id']}/amount/", {"type": "write-off", "amount": "5"}, "amount", "JSON integer"),
        (f"/api/v1/user/{user['id']}/amount/", {"type": "write-off", "amount": 5.0}, "amount", "JSON integer"),
        (f"/api/v1/user/{user['id']}/holds/", {"amount": 1, "expires_in": "9"}, "expires_in", "JSON integer"),
        ("/api/v1/user/", {"username": "x", "balance": True}, "balance", "JSON integer"),
        # Digits, but past 2^63-1: the range is what is wrong, not the form.
        (
            f"/api/v1/user/{user['id']}/transfer/",
            {"to": "9223372036854775808", "amount": 1},
            "to",
            "must be between 1 and 9223372036854775807",
        ),
        (f"/api/v1/user/{user['id']}/transfer/", {"to": "1" * 30, "amount": 1}, "to", "must be between 1 and"),
    ]
    for path, body, field, words in cases:
        response = await client.post(path, json=body)
        assert response.status == 400, (path, body)
        error = (await response.json())["error"]
        assert error["code"] == "validation_failed"
        assert words in error["details"]["fields"][field][0], error
    response = await client.get(f"/api/v1/user/{user['id']}/tasks?after=9223372036854775808")
    assert response.status == 400
    fields = (await response.json())["error"]["details"]["fields"]
    assert fields == {"after": ["must be between 0 and 9223372036854775807"]}
    listed = await (await client.get(f"/api/v1/user/{user['id']}/tasks")).json()
    assert listed == []  # nothing stored


async def test_a_task_that_is_not_a_hold_is_called_what_it_is(client: TestClient) -> None:
    user = await create_user(client, "not-a-hold", 10)
    task = await post_task(client, user["id"], "replenishment", 1)
    for method, path in (
        ("POST", f"/api/v1/hold/{task['id']}/capture/"),
        ("POST", f"/api/v1/hold/{task['id']}/void/"),
        ("GET", f"/api/v1/hold/{task['id']}"),
    ):
        response = await client.request(method, path)
        assert response.status == 404
        error = (await response.json())["error"]
        assert error["code"] == "hold_not_found"
        assert error["message"] == f"task {task['id']} is a replenishment, not a hold"
    response = await client.post("/api/v1/hold/999999/void/")
    assert (await response.json())["error"]["message"] == "hold 999999 does not exist"


async def test_exact_username_lookup(client: TestClient) -> None:
    five = await create_user(client, "User5", 1)
    await create_user(client, "User50", 1)
    found = await (await client.get("/api/v1/user/?username=User5")).json()
    assert [user["id"] for user in found] == [five["id"]]
    assert await (await client.get("/api/v1/user/?username=User")).json() == []
    assert await (await client.get("/api/v1/user/?username=user5")).json() == []  # exact: case counts
    for bad in ("?username=", "?username=User5&limit=5", "?username=User5&username_prefix=U", "?username=U&after=1"):
        response = await client.get("/api/v1/user/" + bad)
        assert response.status == 400 and (await response.json())["error"]["code"] == "validation_failed", bad


async def test_history_filters_by_type_and_status_with_paging(client: TestClient) -> None:
    user = await create_user(client, "filtered", 100)
    ids = {}
    for name, kind, amount in (
        ("r1", "replenishment", 5),
        ("w1", "write-off", 500),  # cancelled
        ("w2", "write-off", 5),
        ("r2", "replenishment", 5),
        ("w3", "write-off", 1),
    ):
        ids[name] = (await post_task(client, user["id"], kind, amount))["id"]
        await wait_processed(client, ids[name])

    async def listed(query: str) -> list[str]:
        response = await client.get(f"/api/v1/user/{user['id']}/tasks?{query}")
        assert response.status == 200, await response.text()
        return [task["id"] for task in await response.json()]

    assert await listed("type=write-off") == [ids["w1"], ids["w2"], ids["w3"]]
    assert await listed("type=write-off&status=done") == [ids["w2"], ids["w3"]]
    assert await listed("status=cancelled") == [ids["w1"]]
    assert await listed("type=write-off&type=replenishment&status=done") == [ids[n] for n in ("r1", "w2", "r2", "w3")]
    assert await listed("type=write-off&status=done&limit=1") == [ids["w2"]]
    assert await listed(f"type=write-off&status=done&limit=1&after={ids['w2']}") == [ids["w3"]]
    assert await listed("type=write-off&order=desc&limit=2") == [ids["w3"], ids["w2"]]
    assert await listed(f"type=replenishment&order=desc&before={ids['r2']}") == [ids["r1"]]
    assert await listed("type=hold") == []
    for bad in ("type=nonsense", "status=done&status=weird", "type=", "limit=2&limit=3"):
        response = await client.get(f"/api/v1/user/{user['id']}/tasks?{bad}")
        assert response.status == 400 and (await response.json())["error"]["code"] == "validation_failed", bad
    response = await client.get("/api/v1/user/999999/tasks?type=write-off")
    assert response.status == 404


async def _follow(client: TestClient, url: str) -> tuple[list[str], int]:
    """Every item of a paged list by following Link rel=next; and how many pages it took."""
    seen: list[str] = []
    pages = 0
    while url:
        response = await client.get(url)
        assert response.status == 200, await response.text()
        pages += 1
        items = await response.json()
        seen += [item["id"] for item in items]
        link = response.headers.get("Link")
        url = ""
        if link is not None:
            target, rel = link.split(";", 1)
            assert rel.strip() == 'rel="next"' and target.startswith("<") and target.endswith(">")
            url = target[1:-1]
        assert pages < 50
    return seen, pages


async def test_every_paged_list_links_to_its_next_page(client: TestClient) -> None:
    users = [await create_user(client, f"Pager{n}", 100) for n in range(5)]
    first = users[0]["id"]
    tasks = [(await post_task(client, first, "write-off", 1))["id"] for _ in range(5)]
    holds = [await _hold(client, first, 1) for _ in range(3)]
    await wait_processed(client, tasks[-1])
    all_users = [user["id"] for user in users]
    own = tasks + holds

    assert await _follow(client, "/api/v1/user/?limit=2") == (all_users, 3)
    assert await _follow(client, "/api/v1/user/?username_prefix=Pager&limit=2") == (all_users, 3)
    assert await _follow(client, f"/api/v1/user/{first}/tasks?limit=3") == (own, 3)
    assert await _follow(client, f"/api/v1/user/{first}/tasks?order=desc&limit=3") == (own[::-1], 3)
    assert await _follow(client, f"/api/v1/user/{first}/tasks?type=write-off&limit=2") == (tasks, 3)
    assert await _follow(client, f"/api/v1/user/{first}/holds?limit=2") == (holds, 2)
    # Exactly full last page: one more (empty) request, then no Link.
    assert await _follow(client, "/api/v1/user/?limit=5") == (all_users, 2)
    response = await client.get(f"/api/v1/user/{first}/tasks?limit=100")
    assert "Link" not in response.headers


async def test_unknown_query_parameters_are_400_on_every_route(client: TestClient) -> None:
    user = await create_user(client, "queried", 10)
    task = await post_task(client, user["id"], "write-off", 1)
    hold = await _hold(client, user["id"], 1)
    ids = {"user_id": user["id"], "task_id": task["id"], "hold_id": hold, "name": "dashboard.js", "token_id": "1"}
    ids |= {"webhook_id": "1", "delivery_id": "1"}
    checked = 0
    for route in client.server.app.router.routes():
        resource = route.resource
        if (
            route.method == "HEAD"
            or resource is None
            or ("/assets" in resource.canonical and "{" not in (resource.canonical))
        ):
            continue
        path = resource.canonical.format(**ids)
        if path.endswith("events") or path.endswith("events/"):
            continue  # streams: checked below without reading them
        response = await client.request(route.method, path + "?nonsense=1", json={} if route.method == "POST" else None)
        assert response.status == 400, (route.method, path, response.status)
        error = (await response.json())["error"]
        assert error["code"] == "validation_failed" and error["details"] == {"unknown": ["nonsense"]}
        checked += 1
    assert checked >= 30
    response = await client.get(f"/api/v1/user/{user['id']}/events?nonsense=1")
    assert response.status == 400
    # Nothing was stored by the refused posts.
    listed = await (await client.get(f"/api/v1/user/{user['id']}/tasks")).json()
    assert [t["id"] for t in listed] == [task["id"], hold]


async def test_root_says_where_things_are_and_sends_a_browser_to_the_console(client: TestClient) -> None:
    response = await client.get("/")
    assert response.status == 200
    where = await response.json()
    for name in ("console", "docs", "openapi", "users"):
        assert (await client.get(where[name])).status == 200, name
    response = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml"}, allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "/console/"


async def test_the_api_description_stays_open_when_reads_are_protected(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(api_token=TOKEN, api_token_protect_reads=True)
    assert (await client.get("/api/v1/user/")).status == 401
    for path in (SPEC_PATH, DOCS_PATH, DOCS_PATH + "/", "/"):
        assert (await client.get(path)).status == 200, path
    page = await (await client.get(DOCS_PATH)).text()
    asset = page.split('src="', 1)[1].split('"', 1)[0]
    assert (await client.get(asset)).status == 200
    assert (await client.post(SPEC_PATH)).status == 405 or (await client.post(SPEC_PATH)).status == 401


async def test_openapi_has_a_bearer_scheme_and_the_limits_answers(client: TestClient) -> None:
    spec = await (await client.get(SPEC_PATH)).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert spec["security"] == [{"bearerAuth": []}]
    post = spec["paths"]["/api/v1/user/{user_id}/amount/"]["post"]
    assert {"401", "403", "408", "413", "414", "431"} <= set(post["responses"])
    assert post["responses"]["401"]["headers"]["WWW-Authenticate"]
    health = spec["paths"]["/health"]["get"]
    assert health["security"] == [] and "401" not in health["responses"]
    assert {"414", "431"} <= set(health["responses"])


async def test_http_metrics_by_route_template_method_and_status(client: TestClient) -> None:
    user = await create_user(client, "http-metered", 10)
    for _ in range(3):
        assert (await client.get(f"/api/v1/user/{user['id']}")).status == 200
    assert (await client.get("/api/v1/user/999999")).status == 404
    assert (await client.get("/no/such/path")).status == 404
    assert (await client.delete(f"/api/v1/user/{user['id']}")).status == 405

    async def counted() -> Any:
        found = await scrape(client)
        name = "message_broker_http_requests_total"
        route = "/api/v1/user/{user_id}"
        if value(found, name, 0, route=route, method="GET", status="200") == 3:
            return found
        return None

    found = await eventually(counted, what="three GETs counted")
    name = "message_broker_http_requests_total"
    assert value(found, name, route="/api/v1/user/{user_id}", method="GET", status="404") == 1
    assert value(found, name, route="unmatched", method="DELETE", status="405") == 1  # the router's own answer
    assert value(found, name, route="/api/v1/user", method="POST", status="201") == 1
    assert value(found, name, route="unmatched", method="GET", status="404") == 1
    duration = "message_broker_http_request_duration_seconds_count"
    assert value(found, duration, route="/api/v1/user/{user_id}") == 4
    # No label carries an id or a raw path.
    labels = {v for (_, pairs), _ in found.items() for _, v in pairs}
    assert not any(user["id"] in label.split("/") for label in labels)
    assert "/no/such/path" not in labels


@pytest.mark.parametrize("limit", ["1001", "0"])
async def test_the_largest_limit_is_1000(client: TestClient, limit: str) -> None:
    response = await client.get(f"/api/v1/user/?limit={limit}")
    assert response.status == 400
    assert (await client.get("/api/v1/user/?limit=1000")).status == 200


async def test_a_release_at_a_holds_deadline_counts_as_stored(client: TestClient) -> None:
    user = await create_user(client, "released", 10)
    response = await client.post(f"/api/v1/user/{user['id']}/holds/?wait=5", json={"amount": 3, "expires_in": 1})
    assert response.status == 200
    hold_id = (await response.json())["id"]

    async def expired() -> bool:
        return (await (await client.get(f"/api/v1/hold/{hold_id}")).json())["status"] == "expired"

    await eventually(expired, timeout=15, what="the hold released at its deadline")
    by_type, series = await _accepted(client)
    assert by_type == {"hold": 1, "release": 1}
    assert series == 2
