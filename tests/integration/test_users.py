from aiohttp.test_utils import TestClient

from ..helpers import create_user


async def test_create_and_get_user(client: TestClient) -> None:
    response = await client.post("/api/v1/user/", json={"username": "User5", "balance": 500})
    assert response.status == 201
    user = await response.json()
    assert user == {"id": user["id"], "username": "User5", "balance": 500, "held": 0, "available": 500}
    assert user["id"].isdigit()
    assert response.headers["Location"] == f"/api/v1/user/{user['id']}"
    for path in (f"/api/v1/user/{user['id']}", f"/api/v1/user/{user['id']}/"):
        got = await client.get(path)
        assert got.status == 200
        assert await got.json() == user


async def test_trailing_slash_is_optional_on_create(client: TestClient) -> None:
    response = await client.post("/api/v1/user", json={"username": "no-slash", "balance": 0})
    assert response.status == 201


async def test_duplicate_username_is_409_and_changes_nothing(client: TestClient) -> None:
    await create_user(client, "dup", 1)
    response = await client.post("/api/v1/user/", json={"username": "dup", "balance": 99})
    assert response.status == 409
    body = await response.json()
    assert body["error"]["code"] == "username_taken"
    users = await (await client.get("/api/v1/user/")).json()
    assert [(u["username"], u["balance"]) for u in users] == [("dup", 1)]


async def test_unknown_user_is_404(client: TestClient) -> None:
    response = await client.get("/api/v1/user/999999")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "user_not_found"


async def test_list_users_is_id_ascending_and_pages(client: TestClient) -> None:
    created = [await create_user(client, f"user{i}", i) for i in range(7)]
    everyone = await (await client.get("/api/v1/user/")).json()
    assert everyone == created
    seen, after = [], "0"
    while True:
        response = await client.get("/api/v1/user", params={"limit": "3", "after": after})
        assert response.status == 200
        page = await response.json()
        if not page:
            break
        assert len(page) <= 3
        seen += page
        after = page[-1]["id"]
    assert seen == created


async def test_list_users_empty(client: TestClient) -> None:
    response = await client.get("/api/v1/user/")
    assert response.status == 200
    assert await response.json() == []


async def test_list_users_streams_more_than_one_page(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    sql.execute("INSERT INTO users (username, balance) SELECT 'bulk' || g, g FROM generate_series(1, 2500) g")
    users = await (await client.get("/api/v1/user/")).json()
    assert len(users) == 2500
    assert [int(u["id"]) for u in users] == sorted(int(u["id"]) for u in users)
    assert users[-1]["balance"] == 2500


async def test_usernames_are_stored_verbatim(client: TestClient) -> None:
    for name in ["Robert'); DROP TABLE users;--", 'quote " and \\ backslash', "Łódź 東京 🙂", "  spaced  "]:
        user = await create_user(client, name, 1)
        got = await (await client.get(f"/api/v1/user/{user['id']}")).json()
        assert got["username"] == name


async def test_users_are_found_by_username_prefix_a_page_at_a_time(client: TestClient) -> None:
    for name in ["alice", "alina", "albert", "bob", "al_x", "al%y", "Alfred", "alina2"]:
        await create_user(client, name, 1)

    async def find(query: str) -> list[str]:
        response = await client.get(f"/api/v1/user/?{query}")
        assert response.status == 200, await response.text()
        return [user["username"] for user in await response.json()]

    assert await find("username_prefix=al") == ["al%y", "al_x", "albert", "alice", "alina", "alina2"]
    assert await find("username_prefix=al&limit=2") == ["al%y", "al_x"]
    assert await find("username_prefix=al&limit=2&after_username=al_x") == ["albert", "alice"]
    assert await find("username_prefix=al&limit=2&after_username=alice") == ["alina", "alina2"]
    assert await find("username_prefix=al&limit=2&after_username=alina2") == []
    # The prefix is text, not a pattern: % and _ match themselves only.
    assert await find("username_prefix=al%25") == ["al%y"]
    assert await find("username_prefix=al_") == ["al_x"]
    assert await find("username_prefix=Al") == ["Alfred"]
    assert await find("username_prefix=zz") == []


async def test_a_bad_username_search_is_400(client: TestClient) -> None:
    for query in ["username_prefix=", "username_prefix=" + "a" * 65, "after_username=x", "username_prefix=a&after=3"]:
        response = await client.get(f"/api/v1/user/?{query}")
        assert response.status == 400, query
        assert (await response.json())["error"]["code"] == "validation_failed"


async def test_the_username_search_is_an_index_range_scan(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    await create_user(client, "someone", 1)
    # As with many users: the planner must have an index that serves both the range and the order.
    sql.execute("SET enable_seqscan = off")
    sql.execute("SET enable_bitmapscan = off")
    sql.execute(
        "EXPLAIN SELECT id FROM users WHERE username COLLATE \"C\" LIKE 'al%' AND username COLLATE \"C\" > ''"
        ' ORDER BY username COLLATE "C" LIMIT 20'
    )
    plan = "\n".join(row[0] for row in sql.fetchall())
    assert "Index Scan using users_by_username_c" in plan and ">= 'al'" in plan, plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan
