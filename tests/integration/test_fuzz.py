"""Fuzzing: hypothesis draws batches of requests (methods, paths, query strings, headers and
bodies, from nearly valid to garbage) and throws them at every endpoint of a running app over
real HTTP. No answer may be a 5xx; every 4xx is the JSON error shape; and the database afterwards
holds exactly what the accepted requests created (every ledger checked), so rejected requests
changed nothing."""

from __future__ import annotations

import json
import string
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from yarl import URL

from ..helpers import eventually
from ..ledger_check import check_database

MAX = 2**63 - 1
KNOWN_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
numbers = st.one_of(
    st.integers(-5, 100),
    st.integers(1, 100),
    st.integers(MAX - 3, MAX + 3),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(string.digits, min_size=1, max_size=25),
    st.booleans(),
    st.none(),
)
_task_fields = {
    "type": st.sampled_from(["replenishment", "write-off", "replenishment", "write-off", "Write-Off", ""]),
    "amount": numbers,
}
task_bodies = st.fixed_dictionaries(_task_fields) | st.fixed_dictionaries(_task_fields, optional={"x": json_values})
user_bodies = st.fixed_dictionaries(
    {"username": st.text(min_size=1, max_size=70), "balance": numbers},
    optional={"id": json_values},
)


@st.composite
def path_segments(draw: st.DrawFn, known: list[int]) -> str:
    choice = draw(
        st.one_of(
            # An index, not sampled_from(known): the draws must not depend on how many exist.
            st.integers(0, 10**6).map(lambda i: str(known[i % len(known)] if known else 1)),
            st.integers(-3, 10**25).map(str),
            st.sampled_from(
                ["0", "-1", "1.5", "1e3", "abc", "", "..", "%00", "%2F", quote("١٢"), "%201", "9223372036854775808"]
            ),
            st.text(max_size=12).map(lambda s: quote(s, safe="")),
        )
    )
    return str(draw(st.just(choice)))


@st.composite
def fuzz_requests(draw: st.DrawFn, user_ids: list[int], task_ids: list[int]) -> dict[str, Any]:
    """One request. Half are close to valid (the right route and content type, a body of the
    right shape with fuzzed values), so that they get past the first checks; the rest are
    anything."""
    user = draw(path_segments(user_ids))
    task = draw(path_segments(task_ids))
    slash = draw(st.sampled_from(["", "/"]))
    json_type = st.sampled_from(["application/json", "application/json; charset=utf-8"])
    kind = draw(st.sampled_from(["task", "user", "read", "anything"]))
    if kind == "task":
        if user_ids and draw(st.booleans()):
            user = str(user_ids[draw(st.integers(0, 10**6)) % len(user_ids)])
        method, path, content_type = "POST", f"/api/v1/user/{user}/amount{slash}", draw(json_type)
        body = json.dumps(draw(task_bodies)).encode()
    elif kind == "user":
        method, path, content_type = "POST", "/api/v1/user" + slash, draw(json_type)
        body = json.dumps(draw(user_bodies)).encode()
    elif kind == "read":
        method, content_type, body = draw(st.sampled_from(["GET", "HEAD"])), None, None
        path = draw(
            st.sampled_from(
                [
                    "/api/v1/user" + slash,
                    f"/api/v1/user/{user}{slash}",
                    f"/api/v1/user/{user}/tasks{slash}",
                    f"/api/v1/task/{task}{slash}",
                    "/health",
                    "/ready",
                    "/metrics",
                    "/api/v1/openapi.json",
                ]
            )
        )
    else:
        method = draw(st.sampled_from(KNOWN_METHODS))
        path = draw(
            st.sampled_from(
                [
                    "/api/v1/user" + slash,
                    f"/api/v1/user/{user}{slash}",
                    f"/api/v1/user/{user}/amount{slash}",
                    f"/api/v1/user/{user}/tasks{slash}",
                    f"/api/v1/task/{task}{slash}",
                    "/health",
                    "/ready",
                    f"/api/v1/{user}",
                    # lstrip: "//x" would be a scheme-relative URL, not a path
                    "/" + quote(draw(st.text(max_size=15)), safe="/").lstrip("/"),
                ]
            )
        )
        content_type = draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/json; charset=latin-1",
                    "text/plain",
                    "multipart/form-data; boundary=x",
                    None,
                ]
            )
        )
        body = draw(
            st.one_of(
                st.none(),
                task_bodies.map(lambda b: json.dumps(b).encode()),
                user_bodies.map(lambda b: json.dumps(b).encode()),
                json_values.map(lambda b: json.dumps(b).encode()),
                st.binary(max_size=200),
                st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
            )
        )
    query = draw(
        st.dictionaries(
            st.sampled_from(["limit", "after", "wait", "x", ""]) | st.text(max_size=5),
            st.text(string.digits, max_size=4) | st.text(max_size=12),
            max_size=3,
        )
    )
    if query:
        path += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query.items())
    headers = {"Content-Type": content_type} if content_type else {}
    headers.update(
        draw(
            st.dictionaries(
                st.sampled_from(["X-Fuzz", "Accept", "Authorization", "Idempotency-Key", "Last-Event-ID"]),
                st.text(string.printable.strip(), max_size=40),
                max_size=2,
            )
        )
    )
    return {"method": method, "path": path, "body": body, "headers": headers}


class World:
    """What the accepted requests created, as the test saw it."""

    def __init__(self) -> None:
        self.initial: dict[int, int] = {}
        self.tasks: list[int] = []
        self.answers: dict[int, int] = {}


@pytest.fixture
def world() -> World:
    # Function-scoped fixtures are made once per test, not per hypothesis example: the world
    # carries over from one batch to the next, as the database does.
    return World()


async def _pending(sql) -> bool:  # type: ignore[no-untyped-def]
    sql.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
    return sql.fetchone()[0] == 0


@settings(
    max_examples=12,
    deadline=None,
    # Generate only: a failure names the request that caused it, shrinking batches of live
    # requests takes minutes, and a replayed example would meet a database that has moved on.
    phases=[Phase.generate],
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
async def test_fuzzed_requests_never_5xx_and_change_only_what_they_were_accepted_for(
    client: TestClient, sql, world: World, data: st.DataObject
) -> None:  # type: ignore[no-untyped-def]
    if not world.initial:
        for n in range(3):
            response = await client.post("/api/v1/user/", json={"username": f"seed{n}", "balance": 50})
            world.initial[int((await response.json())["id"])] = 50
    batch = data.draw(st.lists(fuzz_requests(list(world.initial), world.tasks), min_size=30, max_size=30))
    for request in batch:
        response = await client.request(
            request["method"], URL(request["path"], encoded=True), data=request["body"], headers=request["headers"]
        )
        text = await response.text()
        world.answers[response.status] = world.answers.get(response.status, 0) + 1
        assert response.status < 500, (request, response.status, text[:300])
        if response.status >= 400 and request["method"] != "HEAD":
            assert response.content_type == "application/json", (request, response.status, text[:300])
            body = json.loads(text)
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
            assert "Traceback" not in text and "psycopg2" not in text
        elif request["method"] == "POST" and 200 <= response.status < 300:
            # 201 a user, 202 a task, 200 a task with ?wait; a replay (Idempotency-Key) repeats one.
            created = json.loads(text)
            if "username" in created:
                world.initial.setdefault(int(created["id"]), created["balance"])
            elif int(created["id"]) not in world.tasks:
                world.tasks.append(int(created["id"]))
    await eventually(lambda: _pending(sql), timeout=10)
    check_database(sql, world.initial, acknowledged=world.tasks)
    sql.execute("SELECT count(*) FROM tasks")
    assert sql.fetchone()[0] == len(world.tasks), "a request that was not answered 202 stored a task"
