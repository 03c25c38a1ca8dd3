"""`message-broker verify`: a clean ledger passes; each corruption made by hand (a balance, a held
amount, a deleted transfer-in, a hold resolved twice, ...) is named on a line of its own, and the
command exits 1."""

from __future__ import annotations

import subprocess
import sys

from aiohttp.test_utils import TestClient

from message_broker.audit import verify
from message_broker.db.options import ConnectionOptions

from ..helpers import create_user


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
    await post(f"/api/v1/user/{b}/amount/", {"type": "write-off", "amount": 1})
    return {
        "alice": a,
        "bob": b,
        "transfer": transfer["id"],
        "hold": hold["id"],
        "capture": capture["id"],
        "active": active["id"],
    }


async def run(database_url: str, user_id: int | None = None) -> tuple[list[str], int]:
    lines: list[str] = []
    report = await verify(ConnectionOptions(database_url), user_id, out=lines.append)
    return lines, report.problems


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
