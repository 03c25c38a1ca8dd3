-- Named queries of `make bench` (src/message_broker/bench), loaded like sql/queries.sql: the
-- benchmark's set-up and measurements, on its own scratch databases. (Its pgbench scripts, the
-- hand-written SQL baselines, are in bench/pgbench.py.)

-- name: commits
-- Read from the maintenance database, so that these reads are not counted themselves.
SELECT pg_stat_clear_snapshot();
SELECT xact_commit FROM pg_stat_database WHERE datname = %(d)s;

-- name: server_version
SELECT current_setting('server_version') AS v;

-- name: count_users
SELECT count(*) AS n FROM users;

-- name: add_users
INSERT INTO users (username, balance)
SELECT 'user' || g, 1000000 FROM generate_series(%(first)s, %(last)s) AS g;

-- name: vacuum_all
-- Leave autovacuum nothing to do during the next measurement.
VACUUM ANALYZE users;
VACUUM ANALYZE tasks;
VACUUM ANALYZE task_batches;

-- name: count_pending
SELECT count(*) AS n FROM tasks WHERE status = 'pending';

-- name: latency_of_tasks
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
       max(ms) AS max, count(*) AS n
FROM (SELECT extract(epoch FROM processed_at - created_at) * 1000 AS ms
      FROM tasks WHERE id = ANY(%(ids)s::bigint[])) AS l;

-- name: queue_balance_changes
-- A backlog, as if posted while the server was down: replenishments and write-offs round the users.
-- `before`: the id just below its first task.
WITH queued AS (
    INSERT INTO tasks (user_id, type, amount)
    SELECT 1 + g %% %(users)s, CASE WHEN g %% 3 = 0 THEN 'write-off' ELSE 'replenishment' END, 1 + g %% 97
    FROM generate_series(0, %(n)s - 1) AS g
    RETURNING id
)
SELECT min(id) - 1 AS before FROM queued;

-- name: queue_transfers
WITH queued AS (
    INSERT INTO tasks (user_id, type, amount, counterparty_id)
    SELECT 1 + g %% %(users)s, 'transfer', 1 + g %% 97, 1 + (g + 1 + g %% 7) %% %(users)s
    FROM generate_series(0, %(n)s - 1) AS g
    RETURNING id
)
SELECT min(id) - 1 AS before FROM queued;

-- name: queue_holds_due_together
-- Holds stored as the API would, with one deadline a few seconds ahead (so all are applied first).
WITH due AS (SELECT clock_timestamp() + interval '8 seconds' AS at)
INSERT INTO tasks (user_id, type, amount, expires_at)
SELECT 1 + g %% %(users)s, 'hold', 1, due.at FROM generate_series(1, %(n)s) AS g, due
RETURNING expires_at;

-- name: drained
-- How many of the backlog's tasks (after an id) were applied, first to last commit.
SELECT count(*) AS n, extract(epoch FROM max(processed_at) - min(processed_at)) AS span
FROM tasks WHERE id > %(first)s AND type <> 'transfer-in';

-- name: released
SELECT count(*) AS released, extract(epoch FROM max(r.processed_at) - %(due)s) AS seconds
FROM tasks AS r
WHERE r.type = 'release' AND r.status = 'done'
  AND r.hold_id IN (SELECT id FROM tasks WHERE type = 'hold' AND expires_at = %(due)s);

-- name: compact
VACUUM FULL ANALYZE tasks;
VACUUM FULL ANALYZE task_batches;

-- name: relation_sizes
-- tasks and task_batches and each of their indexes (`of`: the table an index belongs to).
SELECT c.relname AS name, coalesce(i.indrelid, c.oid)::regclass::text AS of, pg_relation_size(c.oid) AS bytes,
       (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM task_batches) AS batches
FROM pg_class AS c
LEFT JOIN pg_index AS i ON i.indexrelid = c.oid
WHERE coalesce(i.indrelid, c.oid) IN ('tasks'::regclass, 'task_batches'::regclass);

-- name: server_backends
SELECT count(*) AS n FROM pg_stat_activity WHERE datname = %(d)s AND application_name = 'message_broker';

-- name: server_backend_pids
-- The server processes of PostgreSQL serving the service, for their CPU time (read from /proc when
-- the database runs on this machine).
SELECT pid FROM pg_stat_activity WHERE datname = %(d)s AND application_name = 'message_broker';

-- name: forget_maintenance_turns
DELETE FROM maintenance_runs;

-- name: webhook_deliveries_pending
SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'pending';

-- name: webhook_lag_of_tasks
-- From a task's processed_at to the end of the attempt that delivered it (its receiver's 2xx).
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
       max(ms) AS max, count(*) AS n
FROM (SELECT extract(epoch FROM a.attempted_at - t.processed_at) * 1000 + a.duration_ms AS ms
      FROM tasks AS t
      JOIN webhook_deliveries AS d ON d.task_id = t.id AND d.status = 'delivered'
      JOIN webhook_attempts AS a ON a.delivery_id = d.id AND a.http_status BETWEEN 200 AND 299
      WHERE t.id = ANY(%(ids)s::bigint[])) AS l;

-- name: webhook_last_delivered
-- When the last delivery's receiver answered (epoch seconds).
SELECT extract(epoch FROM max(a.attempted_at + make_interval(secs => a.duration_ms / 1000))) AS at
FROM webhook_attempts AS a;

-- name: forget_api_tokens
-- The tokens phase's tokens, gone once it is over (later runs start without any).
DELETE FROM api_tokens;

-- name: history_user
-- One user with a long history for the statements phase: 1,000,000 finished replenishments of 1,
-- one per millisecond (written straight into tasks: the triggers would send a notification per
-- row, which is not what is measured here).
INSERT INTO users (username, balance, created_at) VALUES ('history', 0, now() - interval '1 day')
RETURNING id, created_at;

-- name: history_tasks
ALTER TABLE tasks DISABLE TRIGGER USER;
INSERT INTO tasks (user_id, type, amount, status, balance_after, available_after, created_at, processed_at,
                   finish_batch)
SELECT %(user_id)s, 'replenishment', 1, 'done', n, n, t, t, -n
FROM generate_series(1, %(n)s) AS n,
     LATERAL (SELECT %(start)s::timestamptz + n * interval '1 ms' AS t) AS c;
ALTER TABLE tasks ENABLE TRIGGER USER;
UPDATE users SET balance = %(n)s WHERE id = %(user_id)s;
