"""Balances at a point in time and statements (JSON and CSV) over real HTTP and PostgreSQL: the
state after every task finished by an instant, windows that tile, formula-safe CSV, one index
probe for a balance whatever the history's length, and every class of bad input."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count, pairwise
from typing import Any

import psycopg2
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from message_broker.db.queries import query

from ..helpers import create_user, eventually, lock_waiters, post_task, store_task_by_hand, wait_processed

_TICK = timedelta(microseconds=1)


async def post_wait(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path + "?wait=10", json=body)
    assert response.status == 200, await response.text()
    return await response.json()  # type: ignore[no-any-return]


async def balance_at(client: TestClient, user_id: str, at: datetime | str) -> tuple[int, Any]:
    value = at.isoformat() if isinstance(at, datetime) else at
    response = await client.get(f"/api/v1/user/{user_id}/balance", params={"at": value})
    return response.status, await response.json()


async def statement(client: TestClient, user_id: str, start: datetime, end: datetime | None = None) -> dict[str, Any]:
    params = {"from": start.isoformat(), **({"to": end.isoformat()} if end else {})}
    response = await client.get(f"/api/v1/user/{user_id}/statement", params=params)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()  # type: ignore[no-any-return]


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_balance_at_each_instant_of_a_history(client: TestClient) -> None:
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 0)
    a = alice["id"]
    tasks = [
        await post_wait(client, f"/api/v1/user/{a}/amount/", {"type": "replenishment", "amount": 50}),
        await post_wait(client, f"/api/v1/user/{a}/holds/", {"amount": 30}),
        await post_wait(client, f"/api/v1/user/{a}/transfer/", {"to": bob["id"], "amount": 20}),
        await post_wait(client, f"/api/v1/user/{a}/amount/", {"type": "write-off", "amount": 1000}),
    ]
    expected = [(150, 0), (150, 30), (130, 30), (130, 30)]
    for task, (balance, held) in zip(tasks, expected, strict=True):
        status, body = await balance_at(client, a, task["processed_at"])
        assert status == 200
        assert body == {
            "user_id": a,
            "at": instant(task["processed_at"]).isoformat(),
            "balance": balance,
            "held": held,
            "available": balance - held,
            "last_task_id": task["id"],
        }
        # Just before it: the state the task found.
        status, before = await balance_at(client, a, instant(task["processed_at"]) - _TICK)
        assert status == 200 and before["last_task_id"] != task["id"]
    # Bob's transfer-in is in his history at the same instant as Alice's transfer.
    status, body = await balance_at(client, bob["id"], tasks[2]["processed_at"])
    assert (status, body["balance"], body["held"]) == (200, 20, 0)
    # An offset other than Z, and an unencoded "+" (a space once decoded).
    local = instant(tasks[0]["processed_at"]).astimezone(instant("2026-01-01T00:00:00+05:30").tzinfo)
    status, body = await balance_at(client, a, local)
    assert (status, body["balance"], body["last_task_id"]) == (200, 150, tasks[0]["id"])
    assert body["at"] == instant(tasks[0]["processed_at"]).isoformat()  # answered in UTC
    raw = local.isoformat()
    assert "+" in raw
    response = await client.get(f"/api/v1/user/{a}/balance?at={raw}")
    assert response.status == 200 and (await response.json())["last_task_id"] == tasks[0]["id"]


async def test_balance_at_the_opening_and_before_the_user_existed(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 77)
    sql.execute("SELECT created_at FROM users WHERE id = %s", (int(alice["id"]),))
    created_at = sql.fetchone()[0]
    status, body = await balance_at(client, alice["id"], created_at)
    assert status == 200
    assert (body["balance"], body["held"], body["available"], body["last_task_id"]) == (77, 0, 77, None)
    status, body = await balance_at(client, alice["id"], created_at - _TICK)
    assert status == 404
    assert body["error"]["code"] == "user_not_found"
    assert instant(body["error"]["details"]["created_at"]) == created_at
    status, body = await balance_at(client, "999999", created_at)
    assert status == 404 and body["error"]["code"] == "user_not_found"


@pytest.mark.parametrize(
    "at",
    [
        None,
        "",
        "yesterday",
        "2026-11-30",
        "2026-11-30T23:59:59",  # no offset
        "2026-11-30T23:59:59+0100",
        "2026-02-30T00:00:00Z",
        "2026-11-30T24:00:00Z",
        "2026-11-30T23:59:59+24:00",
        "2026-11-30T23:59:59.1234567890Z",
        "１９９９-11-30T23:59:59Z",  # noqa: RUF001 - other scripts' digits
        "9999-12-31T23:59:59Z",  # the future
        "9999-12-31T23:59:59.999999Z",  # the last instant Python holds
        "0001-01-01T00:00:00+01:00",  # before the first instant Python holds
        "2186-10-18T07:50:46.602252+21:26",  # an offset PostgreSQL would refuse (found by schemathesis)
    ],
)
async def test_bad_or_future_at_is_400(client: TestClient, at: str | None) -> None:
    alice = await create_user(client, "alice", 1)
    params = {} if at is None else {"at": at}
    response = await client.get(f"/api/v1/user/{alice['id']}/balance", params=params)
    body = await response.json()
    assert response.status == 400, body
    assert body["error"]["code"] == "validation_failed" and "at" in body["error"]["details"]["fields"]


async def test_balance_at_is_one_index_probe_whatever_the_history(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 0)
    user_id = int(alice["id"])
    # 200,000 finished replenishments of 1, one per millisecond, written by hand.
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, created_at, processed_at)"
        " SELECT %s, 'replenishment', 1, 'done', n, n, t, t"
        " FROM generate_series(1, 200000) AS n, LATERAL (SELECT now() - (200001 - n) * interval '1 ms' AS t) AS c",
        (user_id,),
    )
    sql.execute("UPDATE users SET balance = 200000, created_at = now() - interval '1 day' WHERE id = %s", (user_id,))
    sql.execute("ANALYZE tasks")
    sql.execute("SELECT processed_at FROM tasks WHERE user_id = %s AND balance_after = 123456", (user_id,))
    at = sql.fetchone()[0]
    sql.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query("state_before"),
        {"user_id": user_id, "before": at + _TICK},
    )
    plan = sql.fetchone()[0][0]
    text = json.dumps(plan)
    assert '"Index Name": "tasks_history"' in text and '"Scan Direction": "Backward"' in text, text
    # A few pages of each index, not a scan: far below the thousands the history fills.
    assert plan["Plan"]["Shared Hit Blocks"] + plan["Plan"].get("Shared Read Blocks", 0) < 30, text
    status, body = await balance_at(client, alice["id"], at)
    assert (status, body["balance"]) == (200, 123456)


@contextlib.contextmanager
def apply_under_way(database_url: str, user_id: int, amount: int, balance: int) -> Iterator[datetime]:
    """A replenishment stored and applied as the service applies one (the user's row locked,
    finish_batches stamps the instant), held before its commit; yields its instant, commits on exit."""
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (user_id,))
        task_id = store_task_by_hand(cur, user_id, "replenishment", amount)["id"]
        after = balance + amount
        cur.execute(
            "SELECT finish_batches(%s::bigint[], %s::bigint[], '{done}', '{NULL}', %s::bigint[], %s::bigint[],"
            " %s::bigint[], %s::bigint[], '{0}')",
            ([task_id], [user_id], [after], [after], [user_id], [after]),
        )
        cur.execute("SELECT processed_at FROM tasks WHERE id = %s", (task_id,))
        yield cur.fetchone()[0]
        conn.commit()


async def test_a_balance_or_statement_up_to_an_instant_an_apply_under_way_stamped_waits_for_its_commit(
    client: TestClient, sql, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    """What is read up to an instant never changes: an apply stamps its instant a moment before it
    commits, so a read of that instant waits for the commit instead of answering without it."""
    alice = await create_user(client, "alice", 100)
    user_id = int(alice["id"])
    start = datetime.now(UTC) - timedelta(hours=1)
    with apply_under_way(database_url, user_id, 25, 100) as stamped:
        reading = asyncio.ensure_future(balance_at(client, alice["id"], stamped))
        listing = asyncio.ensure_future(statement(client, alice["id"], start))
        # The test's only statements that can wait for a lock are the two reads.
        await eventually(lambda: lock_waiters(sql) == 2, what="both reads wait for the apply's commit")
        assert not (reading.done() or listing.done())
    status, body = await reading
    assert (status, body["balance"], body["available"]) == (200, 125, 125)
    assert (await balance_at(client, alice["id"], stamped))[1] == body  # and so it stays
    listed = await listing
    assert ([e["amount"] for e in listed["entries"]], listed["closing"]["balance"]) == ([25], 125)


async def test_a_balance_at_an_instant_before_a_finished_task_takes_no_lock(
    client: TestClient, sql, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 100)
    sql.execute("UPDATE users SET created_at = created_at - interval '1 hour' WHERE id = %s", (int(alice["id"]),))
    finished = await wait_processed(client, (await post_task(client, alice["id"], "write-off", 10))["id"])
    before_it = datetime.fromisoformat(finished["processed_at"]) - timedelta(microseconds=1)
    with apply_under_way(database_url, int(alice["id"]), 25, 90):
        # The user's applies take turns: one under way stamps after the write-off, so after the instant.
        status, body = await balance_at(client, alice["id"], before_it)
        assert (status, body["balance"]) == (200, 100)


async def test_a_read_of_any_instant_after_the_users_last_finished_task_waits_for_its_apply_under_way(
    client: TestClient, sql, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    """However old the instant: an apply's commit can come long after its stamp (a synchronous
    standby away, a stalled disk), and nothing tells a reader how early the stamp was."""
    alice = await create_user(client, "alice", 100)
    sql.execute("UPDATE users SET created_at = created_at - interval '1 hour' WHERE id = %s", (int(alice["id"]),))
    long_ago = datetime.now(UTC) - timedelta(minutes=30)
    with apply_under_way(database_url, int(alice["id"]), 25, 100):
        reading = asyncio.ensure_future(balance_at(client, alice["id"], long_ago))
        listing = asyncio.ensure_future(statement(client, alice["id"], long_ago - timedelta(minutes=1), long_ago))
        await eventually(lambda: lock_waiters(sql) == 2, what="both reads wait for the apply's commit")
    assert (await reading)[1]["balance"] == 100
    assert (await listing)["closing"]["balance"] == 100


def _rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


async def test_statement_json_and_csv(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 0)
    a = alice["id"]
    sql.execute("SELECT created_at FROM users WHERE id = %s", (int(a),))
    start = sql.fetchone()[0]
    before = await post_wait(client, f"/api/v1/user/{a}/amount/", {"type": "replenishment", "amount": 5})
    first = await post_wait(
        client, f"/api/v1/user/{a}/amount/", {"type": "write-off", "amount": 10, "reference": "=HYPERLINK(1)"}
    )
    hold = await post_wait(client, f"/api/v1/user/{a}/holds/", {"amount": 40, "reference": "-minus"})
    await post_wait(client, f"/api/v1/hold/{hold['id']}/capture/", {"amount": 15, "reference": "@at"})
    await post_wait(client, f"/api/v1/user/{a}/transfer/", {"to": bob["id"], "amount": 7, "reference": "+plus"})
    await post_wait(client, f"/api/v1/user/{a}/amount/", {"type": "write-off", "amount": 10**6, "reference": "ok"})
    last = await post_wait(client, f"/api/v1/user/{a}/amount/", {"type": "replenishment", "amount": 3})
    window_start, window_end = instant(first["processed_at"]), instant(last["processed_at"])  # [first, last)
    body = await statement(client, a, window_start, window_end)
    assert (body["user_id"], instant(body["from"]), instant(body["to"])) == (a, window_start, window_end)
    assert body["opening"] == {"balance": 105, "held": 0, "available": 105}
    assert [e["type"] for e in body["entries"]] == ["write-off", "hold", "capture", "transfer", "write-off"]
    assert [e["status"] for e in body["entries"]] == ["done"] * 4 + ["cancelled"]
    assert body["closing"] == {"balance": 73, "held": 0, "available": 73}
    assert body["totals"] == {"credits": 0, "debits": 32, "done": 4, "cancelled": 1}
    assert body["entries"][0] == await (await client.get(f"/api/v1/task/{first['id']}")).json()
    # The whole history from the user's creation to now.
    whole = await statement(client, a, start)
    assert whole["opening"]["balance"] == 100 and whole["entries"][0]["id"] == before["id"]
    assert whole["closing"] == {"balance": 76, "held": 0, "available": 76}
    # CSV, by Accept or by ?format=csv.
    params = {"from": window_start.isoformat(), "to": window_end.isoformat()}
    by_accept = await client.get(f"/api/v1/user/{a}/statement", params=params, headers={"Accept": "text/csv"})
    by_format = await client.get(f"/api/v1/user/{a}/statement", params={**params, "format": "csv"})
    text = await by_accept.text()
    assert by_accept.status == by_format.status == 200 and text == await by_format.text()
    assert by_accept.headers["Content-Type"] == "text/csv; charset=utf-8"
    stamp = window_start.strftime("%Y%m%dT%H%M%SZ") + "-" + window_end.strftime("%Y%m%dT%H%M%SZ")
    assert by_accept.headers["Content-Disposition"] == f'attachment; filename="user-{a}-{stamp}.csv"'
    rows = _rows(text)
    assert rows[0] == [
        "id", "time", "type", "status", "reason", "amount", "change", "balance_after", "available_after",
        "counterparty_id", "reference", "created_by",
    ]  # fmt: skip
    assert rows[1] == ["", window_start.isoformat(), "opening", "", "", "", "", "105", "105", "", "", ""]
    assert [r[0] for r in rows[2:-1]] == [e["id"] for e in body["entries"]]
    assert [r[6] for r in rows[2:-1]] == ["-10", "0", "-15", "-7", "0"]
    assert [r[10] for r in rows[2:-1]] == ["'=HYPERLINK(1)", "'-minus", "'@at", "'+plus", "ok"]
    assert rows[4][2:10] == ["capture", "done", "", "15", "-15", "80", "80", ""]
    assert rows[5][9] == bob["id"]
    assert rows[-1] == ["", window_end.isoformat(), "closing", "", "", "", "", "73", "73", "", "", ""]
    assert text.endswith("\r\n")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "from"),
        ({"from": "nope"}, "from"),
        ({"from": "2026-11-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, "to"),
        ({"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, "to"),
        ({"from": "2025-01-01T00:00:00Z", "to": "2026-01-03T00:00:00Z"}, "to"),  # 367 days
        ({"from": "2020-01-01T00:00:00Z"}, "from"),  # to = now: too long
        ({"from": "2026-11-01T00:00:00Z", "to": "9999-01-01T00:00:00Z"}, "to"),  # the future
        ({"from": "2026-11-01T00:00:00Z", "format": "xlsx"}, "format"),
        ({"from": "2026-11-01T00:00:00Z", "extra": "1"}, "extra"),
    ],
)
async def test_bad_statement_query_is_400(client: TestClient, params: dict[str, str], field: str) -> None:
    alice = await create_user(client, "alice", 1)
    response = await client.get(f"/api/v1/user/{alice['id']}/statement", params=params)
    body = await response.json()
    assert response.status == 400, body
    details = body["error"]["details"]
    # A query parameter the route does not know is named as such (http/routes.py).
    named = details["unknown"] if field == "extra" else details["fields"]
    assert body["error"]["code"] == "validation_failed" and field in named, body


async def test_statement_of_an_unknown_user_is_404(client: TestClient) -> None:
    response = await client.get("/api/v1/user/999999/statement", params={"from": "2026-11-01T00:00:00Z"})
    assert response.status == 404 and (await response.json())["error"]["code"] == "user_not_found"


async def test_statement_of_a_window_before_the_user_existed_is_404(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    """Like balance?at: no balance to tell before the user existed. A window that starts earlier
    and ends later opens with the user's opening balance."""
    alice = await create_user(client, "alice", 100)
    sql.execute("SELECT created_at FROM users WHERE id = %s", (int(alice["id"]),))
    created_at = sql.fetchone()[0]
    start = created_at - timedelta(days=30)
    body = await (
        await client.get(
            f"/api/v1/user/{alice['id']}/statement", params={"from": start.isoformat(), "to": created_at.isoformat()}
        )
    ).json()
    assert body["error"]["code"] == "user_not_found", body
    assert instant(body["error"]["details"]["created_at"]) == created_at
    spanning = await statement(client, alice["id"], start, created_at + _TICK)
    assert spanning["opening"] == spanning["closing"] == {"balance": 100, "held": 0, "available": 100}


async def test_a_long_statement_streams_in_pages(client: TestClient, sql) -> None:  # type: ignore[no-untyped-def]
    alice = await create_user(client, "alice", 0)
    user_id = int(alice["id"])
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, created_at, processed_at)"
        " SELECT %s, 'replenishment', 1, 'done', n, n, now(), now() - (5001 - n) * interval '1 ms'"
        " FROM generate_series(1, 5000) AS n",
        (user_id,),
    )
    sql.execute("UPDATE users SET balance = 5000, created_at = now() - interval '1 day' WHERE id = %s", (user_id,))
    sql.execute("SELECT now() - interval '2 days'")
    body = await statement(client, alice["id"], sql.fetchone()[0])
    assert [e["balance_after"] for e in body["entries"]] == list(range(1, 5001))
    assert body["totals"] == {"credits": 5000, "debits": 0, "done": 5000, "cancelled": 0}
    assert body["closing"]["balance"] == 5000


_names = count()


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Operations over three users: (kind, user index, amount or hold index / recipient)."""
    ops = []
    for _ in range(draw(st.integers(min_value=1, max_value=10))):
        kind = draw(st.sampled_from(["replenishment", "write-off", "transfer", "hold", "capture", "void"]))
        ops.append((kind, draw(st.integers(0, 2)), draw(st.integers(1, 60))))
    return ops


@settings(
    max_examples=8,
    deadline=None,
    phases=[Phase.generate],
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_windows_tile_and_explain_their_closing(client: TestClient, sql, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    n = next(_names)
    users = [await create_user(client, f"h{n}-{k}", data.draw(st.integers(0, 100))) for k in range(3)]
    holds: dict[int, list[str]] = {0: [], 1: [], 2: []}
    times = []
    for kind, k, x in data.draw(histories()):
        me = users[k]["id"]
        if kind in ("replenishment", "write-off"):
            task = await post_wait(client, f"/api/v1/user/{me}/amount/", {"type": kind, "amount": x})
        elif kind == "transfer":
            task = await post_wait(
                client, f"/api/v1/user/{me}/transfer/", {"to": users[(k + 1) % 3]["id"], "amount": x}
            )
        elif kind == "hold":
            task = await post_wait(client, f"/api/v1/user/{me}/holds/", {"amount": x})
            holds[k].append(task["id"])
        elif holds[k]:
            hold = holds[k][x % len(holds[k])]
            body = {"amount": x} if kind == "capture" else {}
            task = await post_wait(client, f"/api/v1/hold/{hold}/{kind}/", body)
        else:
            continue
        times.append(instant(task["processed_at"]))
    for user in users:
        sql.execute("SELECT created_at, clock_timestamp() FROM users WHERE id = %s", (int(user["id"]),))
        created_at, now = sql.fetchone()
        candidates = sorted({created_at, now, *times, *(t + _TICK for t in times), *(t - _TICK for t in times)})
        candidates = [c for c in candidates if created_at <= c <= now]
        cuts = sorted(set(data.draw(st.lists(st.sampled_from(candidates), min_size=2, max_size=6))))
        if len(cuts) < 2:
            continue
        windows = [await statement(client, user["id"], a, b) for a, b in pairwise(cuts)]
        for window in windows:
            opening, closing, totals = window["opening"], window["closing"], window["totals"]
            assert opening["balance"] + totals["credits"] - totals["debits"] == closing["balance"], window
            assert totals["done"] + totals["cancelled"] == len(window["entries"])
            # The opening is the balance just before `from`, the closing the balance just before `to`.
            for state, at in ((opening, instant(window["from"])), (closing, instant(window["to"]))):
                if at - _TICK >= created_at:
                    status, body = await balance_at(client, user["id"], at - _TICK)
                    assert status == 200 and {k: body[k] for k in state} == state, (window, body)
        for earlier, later in pairwise(windows):
            assert earlier["closing"] == later["opening"]
        whole = await statement(client, user["id"], cuts[0], cuts[-1])
        assert [e["id"] for w in windows for e in w["entries"]] == [e["id"] for e in whole["entries"]]
        if cuts[-1] == now:
            current = await (await client.get(f"/api/v1/user/{user['id']}")).json()
            assert windows[-1]["closing"] == {k: current[k] for k in ("balance", "held", "available")}


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("text/csv", "text/csv; charset=utf-8"),
        ("text/csv, */*;q=0.1", "text/csv; charset=utf-8"),
        ("application/json;q=0.5, text/csv", "text/csv; charset=utf-8"),
        ("text/csv;q=0", "application/json"),
        ("text/csv;q=0.5, application/json", "application/json"),
        ("application/json, text/csv", "application/json"),
        ("*/*", "application/json"),
        ("", "application/json"),
    ],
)
async def test_the_statement_format_follows_accept_by_quality(
    client: TestClient, accept: str, content_type: str
) -> None:
    user = await create_user(client, "accepting", 5)
    since = {"from": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}
    response = await client.get(f"/api/v1/user/{user['id']}/statement", params=since, headers={"Accept": accept})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == content_type


async def test_digits_below_the_microsecond_never_move_a_bound_across_a_task(client: TestClient) -> None:
    """A task finished at P: a window from P + 500 ns leaves it out (from is included, and P is
    before it), one to P + 500 ns takes it in (to is excluded, and P is before it), and the balance
    at P + 500 ns has it."""
    user = await create_user(client, "fine", 100)
    task = await wait_processed(client, (await post_task(client, user["id"], "write-off", 10))["id"])
    at = instant(task["processed_at"]).astimezone(UTC)
    late = at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "500Z"  # P + 500 ns
    early = (at - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    path = f"/api/v1/user/{user['id']}/statement"
    after = await (await client.get(path, params={"from": late})).json()
    assert [e["id"] for e in after["entries"]] == []
    upto = await (await client.get(path, params={"from": early, "to": late})).json()
    assert [e["id"] for e in upto["entries"]] == [task["id"]]
    response = await client.get(f"/api/v1/user/{user['id']}/balance", params={"at": late})
    assert (await response.json())["balance"] == 90
