"""`message-broker verify`: a clean ledger passes; each corruption made by hand (a balance, a held
amount, a deleted transfer-in, a hold resolved twice, ...) is named on a line of its own, and the
command exits 1."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import psycopg2.extensions
import pytest
from aiohttp.test_utils import TestClient

from message_broker.audit import verify
from message_broker.db.options import ConnectionOptions

from ..faults.harness import FaultProxy
from ..helpers import create_user, eventually


async def history(client: TestClient) -> dict[str, str]:
    """Alice (100) sends Bob 30, holds 20 and captures 5 of it, holds 10 (active); Bob writes off 1."""
    alice, bob = await create_user(client, "alice", 100), await create_user(client, "bob", 0)
    a, b = alice["id"], bob["id"]

    async def post(path: str, body: dict[str, object]) -> dict[str, str]:
        response = await client.post(path + "?wait=10", json=body)
        assert response.status == 200, await response.text()
        task = await response.json()
        assert task["status"] == "done", task
        return task  # type: ignore[no-any-return]

    transfer = await post(f"/api/v1/user/{a}/transfer/", {"to": b, "amount": 30})
    hold = await post(f"/api/v1/user/{a}/holds/", {"amount": 20})
    capture = await post(f"/api/v1/hold/{hold['id']}/capture/", {"amount": 5})
    active = await post(f"/api/v1/user/{a}/holds/", {"amount": 10})
    write_off = await post(f"/api/v1/user/{b}/amount/", {"type": "write-off", "amount": 1})
    return {
        "alice": a,
        "bob": b,
        "transfer": transfer["id"],
        "hold": hold["id"],
        "capture": capture["id"],
        "active": active["id"],
        "write-off": write_off["id"],
    }


async def run(database_url: str, user_id: int | None = None) -> tuple[list[str], int]:
    lines: list[str] = []
    report = await verify(ConnectionOptions(database_url), user_id, out=lines.append)
    return lines, report.problems


def chain(user: int, task: int, field: str, expected: int, found: int) -> str:
    """The line of a history that breaks at `task` (audit_history)."""
    what = f"task {task} {field} (opening + finished tasks up to it, in applied order)"
    return f"user {user}: {what}: expected {expected}, found {found}"


async def test_a_clean_ledger_verifies(client: TestClient, database_url: str) -> None:
    await history(client)
    lines, problems = await run(database_url)
    assert problems == 0, lines
    assert len(lines) == 1 and lines[0].startswith("verify: 2 users, 6 finished tasks checked")
    assert lines[0].endswith("no problems")


async def test_each_corruption_is_named(client: TestClient, database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    ids = await history(client)
    a, b = int(ids["alice"]), int(ids["bob"])
    sql.execute("UPDATE users SET balance = balance + 7 WHERE id = %s", (b,))
    sql.execute("UPDATE users SET held = held - 4 WHERE id = %s", (a,))
    sql.execute("DELETE FROM tasks WHERE transfer_id = %s AND type = 'transfer-in'", (int(ids["transfer"]),))
    lines, problems = await run(database_url)
    summary = lines.pop()
    assert summary.endswith(f"{problems} problems")
    assert set(lines) == {
        # Bob: opening 0 + (transfer-in deleted) - 1 = -1, stored 29 + 7.
        f"user {b}: balance (opening + done tasks): expected -1, found 36",
        f"user {a}: held (opening + done holds - resolved holds): expected 10, found 6",
        f"user {a}: held (sum of active holds): expected 10, found 6",
        f"user {a}: transfer {ids['transfer']} transfer-in entries: expected 1, found 0",
        # Bob's write-off no longer follows from his opening 0 (the transfer-in before it is gone).
        chain(b, int(ids["write-off"]), "balance_after", -1, 29),
        chain(b, int(ids["write-off"]), "available_after", -1, 29),
        "user *: money conserved (sum of balances = openings + replenishments - write-offs - captures): "
        "expected 94, found 101",
    }, lines
    # --user: only that user's lines, no conservation (transfers move money between users).
    lines, problems = await run(database_url, a)
    assert lines[:-1] == [
        f"user {a}: held (opening + done holds - resolved holds): expected 10, found 6",
        f"user {a}: held (sum of active holds): expected 10, found 6",
        f"user {a}: transfer {ids['transfer']} transfer-in entries: expected 1, found 0",
    ]
    assert problems == 3 and lines[-1].startswith("verify: 1 user, ")


async def test_double_resolutions_and_negative_availables_are_named(client: TestClient, database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    ids = await history(client)
    a = int(ids["alice"])
    # A second, done capture of the captured hold, written by hand (balance adjusted to match).
    sql.execute(
        "INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, hold_id, processed_at)"
        " VALUES (%s, 'capture', 1, 'done', 64, 54, %s, now()) RETURNING id",
        (a, int(ids["hold"])),
    )
    second = sql.fetchone()[0]
    sql.execute("UPDATE users SET balance = balance - 1, held = held + 20 WHERE id = %s", (a,))
    sql.execute("ALTER TABLE tasks DROP CONSTRAINT tasks_available_after_check")
    sql.execute("UPDATE tasks SET available_after = -3 WHERE id = %s", (int(ids["capture"]),))
    lines, _ = await run(database_url, a)
    assert (
        f"user {a}: hold {ids['hold']} resolved by tasks {ids['capture']}, {second}: expected at most 1, found 2"
        in lines
    )
    what = f"tasks with a negative available_after (the first: task {ids['capture']})"
    assert f"user {a}: {what}: expected 0, found 1" in lines


async def test_a_hold_row_unlike_its_tasks_and_a_task_before_its_user_are_named(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, sql
) -> None:
    """Tampered by hand with every sum still true, these passed ('no problems'): a captured hold's
    captured_amount (what GET /hold shows), its deadline moved before its capture was stored (the
    capture was then too late; and no longer its hold task's), and a user's created_at moved after
    its first task (that task is in no statement: a window ending by created_at is user_not_found)."""
    ids = await history(client)
    a, b, hold, capture = int(ids["alice"]), int(ids["bob"]), int(ids["hold"]), int(ids["capture"])
    sql.execute("UPDATE holds SET captured_amount = 4 WHERE id = %s", (hold,))
    sql.execute("SELECT created_at - interval '1 ms' FROM tasks WHERE id = %s", (capture,))
    deadline = sql.fetchone()[0]
    sql.execute("UPDATE holds SET expires_at = %s WHERE id = %s", (deadline, hold))
    sql.execute("SELECT created_at FROM tasks WHERE id = %s", (capture,))
    stored = sql.fetchone()[0]
    sql.execute("UPDATE users SET created_at = now() WHERE id = %s RETURNING created_at", (b,))
    created = sql.fetchone()[0]
    sql.execute("SELECT min(processed_at) FROM tasks WHERE user_id = %s", (b,))
    first = sql.fetchone()[0]
    sql.execute(
        "SELECT %s::timestamptz::text, %s::timestamptz::text, expires_at::text FROM tasks WHERE id = %s",
        (deadline, stored, hold),
    )
    deadline_text, stored_text, task_deadline = sql.fetchone()
    lines, problems = await run(database_url)
    assert sorted(lines[:-1]) == sorted(
        [
            f"user {a}: hold {hold} captured_amount (its capture's amount): expected 5, found 4",
            f"user {a}: hold {hold} resolved by task {capture} stored before expires_at {deadline_text}: "
            f"expected created_at before it, found {stored_text}",
            f"user {a}: hold {hold} expires_at (its hold task's): expected {task_deadline}, found {deadline_text}",
            f"user {b}: first finished task's processed_at (at or after the user's created_at): "
            f"expected >= {created.isoformat()}, found {first.isoformat()}",
        ]
    ), lines
    assert problems == 4


async def test_unknown_user_is_a_problem(database_url: str) -> None:
    lines, problems = await run(database_url, 424242)
    assert problems == 1 and lines[0] == "user 424242: exists: expected a user, found none"


def test_the_command_exits_1_on_problems_and_0_without(database_url: str, sql) -> None:  # type: ignore[no-untyped-def]
    env = {"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    clean = subprocess.run(
        [sys.executable, "-m", "message_broker", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.strip().endswith("no problems")
    sql.execute("INSERT INTO users (username, balance) VALUES ('carol', 5) RETURNING id")
    carol = sql.fetchone()[0]
    sql.execute("UPDATE users SET balance = 6 WHERE id = %s", (carol,))
    broken = subprocess.run(
        [sys.executable, "-m", "message_broker", "verify", "--user", str(carol)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert broken.returncode == 1, broken.stderr
    assert broken.stdout.splitlines()[0] == f"user {carol}: balance (opening + done tasks): expected 5, found 6"
    bad = subprocess.run(
        [sys.executable, "-m", "message_broker", "verify", "--user", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "not a user id" in bad.stderr


# Each finished task's recorded balance_after and available_after against the one before it in
# applied order (audit_history): the tampered ledgers below kept every per-user sum and the
# conservation total true, and passed before.


async def every_kind_of_task(client: TestClient, *, release: bool = True) -> dict[str, int]:
    """Alice (opening 1000): +500, -100, a cancelled write-off of 5000, a transfer of 200 to Bob,
    a hold of 300 and a capture of 120 of it, a hold of 50 voided, a hold of 70 released at its
    deadline (unless `release` is False), -80; Bob (opening 0) writes off 20 of the 200 he got.
    Each applied before the next is posted, so applied order is posting order."""
    alice, bob = await create_user(client, "alice", 1000), await create_user(client, "bob", 0)
    a, b = alice["id"], bob["id"]

    async def post(path: str, body: dict[str, object], status: str = "done") -> int:
        response = await client.post(path + "?wait=10", json=body)
        assert response.status == 200, await response.text()
        task = await response.json()
        assert task["status"] == status, task
        return int(task["id"])

    ids = {"alice": int(a), "bob": int(b)}
    ids["replenishment"] = await post(f"/api/v1/user/{a}/amount/", {"type": "replenishment", "amount": 500})
    ids["write-off"] = await post(f"/api/v1/user/{a}/amount/", {"type": "write-off", "amount": 100})
    ids["cancelled"] = await post(f"/api/v1/user/{a}/amount/", {"type": "write-off", "amount": 5000}, "cancelled")
    ids["transfer"] = await post(f"/api/v1/user/{a}/transfer/", {"to": b, "amount": 200})
    ids["hold"] = await post(f"/api/v1/user/{a}/holds/", {"amount": 300, "expires_in": 600})
    ids["capture"] = await post(f"/api/v1/hold/{ids['hold']}/capture/", {"amount": 120})
    ids["voided"] = await post(f"/api/v1/user/{a}/holds/", {"amount": 50, "expires_in": 600})
    ids["void"] = await post(f"/api/v1/hold/{ids['voided']}/void/", {})
    if release:
        ids["expiring"] = await post(f"/api/v1/user/{a}/holds/", {"amount": 70, "expires_in": 1})

        async def released() -> str | None:
            found = await (await client.get(f"/api/v1/hold/{ids['expiring']}")).json()
            return found["resolved_by"] if found["status"] == "expired" else None  # type: ignore[no-any-return]

        ids["release"] = int(await eventually(released, timeout=10))
    ids["last"] = await post(f"/api/v1/user/{a}/amount/", {"type": "write-off", "amount": 80})
    ids["bob-write-off"] = await post(f"/api/v1/user/{b}/amount/", {"type": "write-off", "amount": 20})
    return ids


async def test_a_history_of_every_kind_of_task_follows_and_each_task_is_checked(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, sql
) -> None:
    ids = await every_kind_of_task(client)
    sql.execute("SELECT id FROM tasks WHERE transfer_id = %s", (ids["transfer"],))
    ids["transfer-in"] = sql.fetchone()[0]
    sql.execute(
        "SELECT id, user_id, type, status, balance_after, available_after FROM tasks ORDER BY user_id, processed_at, id"
    )
    recorded = sql.fetchall()
    # What the rules give (ledger.py): a partial capture charges 120 and frees the whole hold of 300.
    assert [(kind, status, balance, available) for _, _, kind, status, balance, available in recorded] == [
        ("replenishment", "done", 1500, 1500),
        ("write-off", "done", 1400, 1400),
        ("write-off", "cancelled", 1400, 1400),
        ("transfer", "done", 1200, 1200),
        ("hold", "done", 1200, 900),
        ("capture", "done", 1080, 1080),
        ("hold", "done", 1080, 1030),
        ("void", "done", 1080, 1080),
        ("hold", "done", 1080, 1010),
        ("release", "done", 1080, 1080),
        ("write-off", "done", 1000, 1000),
        ("transfer-in", "done", 200, 200),
        ("write-off", "done", 180, 180),
    ]
    lines, problems = await run(database_url)
    assert problems == 0 and lines[0].startswith("verify: 2 users, 13 finished tasks checked"), lines
    # Every task is checked, whatever its kind: one recorded value off by one is named, with its task.
    # (A balance_after raised, an available_after lowered: the constraints of tasks still hold.)
    for task_id, user_id, kind, _, balance, available in recorded:
        for field, value, changed in (
            ("balance_after", balance, balance + 1),
            ("available_after", available, available - 1),
        ):
            sql.execute(f"UPDATE tasks SET {field} = %s WHERE id = %s", (changed, task_id))
            lines, problems = await run(database_url, user_id)
            assert lines[:-1] == [chain(user_id, task_id, field, value, changed)], (kind, field, lines)
            sql.execute(f"UPDATE tasks SET {field} = %s WHERE id = %s", (value, task_id))
    assert (await run(database_url))[1] == 0


TAMPERS = {
    # One task's balance_after raised by 1000 mid-history: the next task no longer follows either,
    # but only the first break is named.
    "balance_after raised": (
        ["UPDATE tasks SET balance_after = balance_after + 1000 WHERE id = {write-off}"],
        [("write-off", "balance_after", 1400, 2400)],
    ),
    # A replenishment's amount +100 and the user's balance +100: the sums agree, the chain does not.
    "replenishment raised with the balance": (
        [
            "UPDATE tasks SET amount = amount + 100 WHERE id = {replenishment}",
            "UPDATE users SET balance = balance + 100 WHERE id = {alice}",
        ],
        [("replenishment", "balance_after", 1600, 1500), ("replenishment", "available_after", 1600, 1500)],
    ),
    "write-off turned into a replenishment": (
        [
            "UPDATE tasks SET type = 'replenishment' WHERE id = {write-off}",
            "UPDATE users SET balance = balance + 200 WHERE id = {alice}",
        ],
        [("write-off", "balance_after", 1600, 1400), ("write-off", "available_after", 1600, 1400)],
    ),
    # Deleted: the task after it does not follow from the one before it.
    "done write-off deleted": (
        [
            "DELETE FROM tasks WHERE id = {write-off}",
            "UPDATE users SET balance = balance + 100 WHERE id = {alice}",
        ],
        [("cancelled", "balance_after", 1500, 1400), ("cancelled", "available_after", 1500, 1400)],
    ),
    "opening balance raised with the balance": (
        ["UPDATE users SET opening_balance = opening_balance + 50, balance = balance + 50 WHERE id = {alice}"],
        [("replenishment", "balance_after", 1550, 1500), ("replenishment", "available_after", 1550, 1500)],
    ),
    # Applied order changed: the write-off now comes first, from the opening 1000.
    "two tasks' processed_at swapped": (
        [
            "UPDATE tasks AS t SET processed_at = o.processed_at FROM tasks AS o"
            " WHERE (t.id, o.id) IN (({replenishment}, {write-off}), ({write-off}, {replenishment}))"
        ],
        [("write-off", "balance_after", 900, 1400), ("write-off", "available_after", 900, 1400)],
    ),
    "cancelled task's balance_after changed": (
        ["UPDATE tasks SET balance_after = balance_after + 7 WHERE id = {cancelled}"],
        [("cancelled", "balance_after", 1400, 1407)],
    ),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_a_tampered_history_is_named_at_its_first_break(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, sql, tamper: str
) -> None:
    ids = await every_kind_of_task(client, release=False)
    statements, breaks = TAMPERS[tamper]
    for statement in statements:
        sql.execute(statement.format_map(ids))
    a = ids["alice"]
    expected = [chain(a, ids[task], field, want, found) for task, field, want, found in breaks]
    lines, problems = await run(database_url)
    assert lines[:-1] == expected and problems == len(expected), lines
    lines, problems = await run(database_url, a)
    assert lines[:-1] == expected and problems == len(expected), lines
    assert (await run(database_url, ids["bob"]))[1] == 0
    # The command says the same and exits 1.
    command = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "message_broker",
        "verify",
        env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(command.communicate(), timeout=60)
    assert command.returncode == 1, stderr.decode()
    assert stdout.decode().splitlines()[:-1] == expected


async def test_a_verify_whose_path_goes_silent_does_not_keep_its_snapshot(  # type: ignore[no-untyped-def]
    client: TestClient, database_url: str, sql
) -> None:
    """The path to the server dies while verify reads (bytes swallowed, nothing closed: the server
    never hears of it). Its REPEATABLE READ transaction holds a snapshot, and with it back every
    VACUUM of the ledger's tables; the server must end it by itself (the idle-in-transaction limit),
    not when TCP keepalives give up, hours later."""
    user = await create_user(client, "carol", 10)
    sql.execute("UPDATE users SET balance = balance + 1 WHERE id = %s", (int(user["id"]),))  # a problem to print
    params = psycopg2.extensions.parse_dsn(database_url)
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    proxy = FaultProxy(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}")
    await proxy.start()
    options = ConnectionOptions(
        psycopg2.extensions.make_dsn(database_url, host="127.0.0.1", port=proxy.port),
        idle_in_transaction_timeout_ms=1000,
        application_name="mb_verify_silent",
    )
    try:
        # The first problem printed: the path dies there, inside the snapshot.
        running = asyncio.create_task(verify(options, out=lambda line: proxy.stall()))

        def snapshots() -> int:
            sql.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mb_verify_silent'")
            return int(sql.fetchone()[0])

        await eventually(lambda: proxy.stalled, what="verify to print its first problem")
        assert snapshots() == 1
        await eventually(lambda: snapshots() == 0, timeout=5, what="the server to end the silent snapshot")
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    finally:
        await proxy.close()
