"""The hot statements run as functions whose plans each server connection keeps (migration 0012).
A kept plan is made from the statistics of its moment; these must stay driven by their arrays
whatever the tables hold later, or one apply would read every pending task (the first try did,
once a plan made when one task was pending met thousands)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2.extensions
import pytest

from .. import pg

_PENDING_LATER = 20_000


@pytest.fixture
def stale_statistics(database_url: str) -> Iterator[psycopg2.extensions.cursor]:
    """A session whose kept plans were made when there were three users and no task, and the
    statistics said so (and still do: autovacuum off): then 20,000 users come, and 20,000 tasks of
    theirs become pending."""
    conn = pg.admin_connection(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (username, balance) SELECT 'u' || g, 1000 FROM generate_series(1, 3) AS g")
        for table in ("users", "tasks"):
            cur.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            cur.execute(f"ANALYZE {table}")
        for _ in range(3):  # the plans are made at the first call and kept
            _apply_one(cur, user_id=1)
            _apply_one_as_remembered(cur, user_id=2)
        cur.execute(
            "INSERT INTO users (username, balance) SELECT 'v' || g, 1000 FROM generate_series(1, %s) AS g",
            (_PENDING_LATER,),
        )
        cur.execute("INSERT INTO tasks (user_id, type, amount) SELECT id, 'replenishment', 1 FROM users WHERE id > 3")
        yield cur
    conn.close()


def _fetches(cur: psycopg2.extensions.cursor) -> dict[str, tuple[int, int]]:
    """Rows read so far in this transaction, by table: (sequentially, index entries read in all of
    its indexes)."""
    cur.execute(
        "SELECT t.relname, t.seq_tup_read, sum(pg_stat_get_xact_tuples_returned(i.indexrelid))::bigint "
        "FROM pg_stat_xact_user_tables AS t JOIN pg_index AS i ON i.indrelid = t.relid "
        "WHERE t.relname IN ('tasks', 'users') GROUP BY t.relname, t.seq_tup_read"
    )
    return {name: (seq, idx) for name, seq, idx in cur.fetchall()}


def _apply_one(cur: psycopg2.extensions.cursor, user_id: int) -> dict[str, tuple[int, int]]:
    """Store one task for `user_id` and apply it as the service does; the rows that took."""
    cur.execute("BEGIN")
    before = _fetches(cur)
    cur.execute(
        "SELECT id FROM insert_tasks(%s::bigint[], '{replenishment}', '{5}', NULL, NULL, NULL, NULL, NULL, NULL)",
        ([user_id],),
    )
    (task_id,) = cur.fetchone()
    cur.execute("SELECT balance, id FROM lock_and_read_pending(%s::bigint[], 500)", ([user_id],))
    rows = cur.fetchall()
    assert [row[1] for row in rows] == [task_id]
    balance = rows[0][0] + 5
    cur.execute(
        "SELECT finish_batches(%s::bigint[], %s::bigint[], '{done}', '{NULL}', %s::bigint[], %s::bigint[], "
        "%s::bigint[], %s::bigint[], '{0}')",
        ([task_id], [user_id], [balance], [balance], [user_id], [balance]),
    )
    after = _fetches(cur)
    cur.execute("COMMIT")
    return {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in after}


def _apply_one_as_remembered(cur: psycopg2.extensions.cursor, user_id: int) -> dict[str, tuple[int, int]]:
    """Store one task for `user_id` and apply it from what is remembered (migration 0014)."""
    cur.execute("SELECT balance FROM users WHERE id = %s", (user_id,))
    (balance,) = cur.fetchone()
    cur.execute(
        "SELECT id FROM insert_tasks(%s::bigint[], '{replenishment}', '{5}', NULL, NULL, NULL, NULL, NULL, NULL)",
        ([user_id],),
    )
    (task_id,) = cur.fetchone()
    cur.execute("BEGIN")
    before = _fetches(cur)
    after_balance = balance + 5
    cur.execute(
        "SELECT finish_as_remembered(%s::bigint[], %s::bigint[], '{0}', %s::bigint[], %s::bigint[],"
        " '{replenishment}', '{5}', %s::bigint[], %s::bigint[], '{done}', '{NULL}', %s::bigint[], %s::bigint[],"
        " %s::bigint[], %s::bigint[], '{0}')",
        (
            [user_id],
            [balance],
            [task_id],
            [user_id],
            [task_id],
            [user_id],
            [after_balance],
            [after_balance],
            [user_id],
            [after_balance],
        ),
    )
    assert cur.fetchone() == (True,)
    after = _fetches(cur)
    cur.execute("COMMIT")
    return {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in after}


def test_an_apply_reads_only_its_own_rows_after_the_statistics_went_stale(stale_statistics) -> None:  # type: ignore[no-untyped-def]
    cur = stale_statistics
    cur.execute("SELECT count(*) FROM tasks WHERE status = 'pending'")
    assert cur.fetchone()[0] == _PENDING_LATER
    read = _apply_one(cur, user_id=1)
    # users: the insert's check and foreign key, the lock, the read, the update; tasks: the read of
    # the pending ones and the update. A plan that scanned users or pending tasks would read 20,000.
    assert read["tasks"][0] == 0 and read["users"][0] == 0, read
    assert read["tasks"][1] <= 5 and read["users"][1] <= 8, read


def test_an_apply_from_memory_reads_only_its_own_rows_after_the_statistics_went_stale(stale_statistics) -> None:  # type: ignore[no-untyped-def]
    read = _apply_one_as_remembered(stale_statistics, user_id=2)
    # users: the lock, the check, the update; tasks: the remembered one, the pending ones up to it,
    # the update. A plan that scanned users or pending tasks would read 20,000.
    assert read["tasks"][0] == 0 and read["users"][0] == 0, read
    assert read["tasks"][1] <= 5 and read["users"][1] <= 8, read
