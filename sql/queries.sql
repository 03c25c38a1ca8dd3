-- Named queries, loaded once by message_broker.db.queries. Each starts with "-- name: <name>"
-- and uses psycopg2's %(param)s placeholders: every value is a bound parameter, never text.

-- name: create_user
INSERT INTO users (username, balance)
VALUES (%(username)s, %(balance)s)
RETURNING id, username, balance;

-- name: get_user
SELECT id, username, balance FROM users WHERE id = %(user_id)s;

-- name: list_users
-- Keyset paging: O(limit) per page however deep, and a stable order while users are added.
SELECT id, username, balance FROM users
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: user_exists
SELECT EXISTS (SELECT 1 FROM users WHERE id = %(user_id)s);

-- name: enqueue_task
-- One task (the Idempotency-Key path, inside its transaction; and the batch's fallback). The
-- statement trigger fires NOTIFY task_created; an unknown user fails the foreign key.
INSERT INTO tasks (user_id, type, amount)
VALUES (%(user_id)s, %(type)s, %(amount)s)
RETURNING id, user_id, type, amount, status, reason, balance_after, created_at, processed_at;

-- name: get_task
SELECT id, user_id, type, amount, status, reason, balance_after, created_at, processed_at
FROM tasks WHERE id = %(task_id)s;

-- name: list_user_tasks
SELECT id, user_id, type, amount, status, reason, balance_after, created_at, processed_at
FROM tasks
WHERE user_id = %(user_id)s AND id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: users_with_pending_tasks
-- The start-up scan and the safety sweep: which users have work waiting. Skip-scan friendly
-- loose index walk over the partial index, so it stays cheap with many pending rows.
WITH RECURSIVE pending_users AS (
    (SELECT user_id FROM tasks WHERE status = 'pending' ORDER BY user_id LIMIT 1)
    UNION ALL
    SELECT (SELECT t.user_id FROM tasks AS t
             WHERE t.status = 'pending' AND t.user_id > p.user_id
             ORDER BY t.user_id LIMIT 1)
    FROM pending_users AS p
    WHERE p.user_id IS NOT NULL
)
SELECT user_id FROM pending_users WHERE user_id IS NOT NULL;

-- name: probe
SELECT 1;

-- ============================================================================================
-- Task lifecycle for clients: idempotency keys, finished-task positions for event streams.
-- ============================================================================================

-- name: claim_idempotency_key
-- Claims the key for this transaction. A concurrent claim of the same key waits here until the
-- first transaction commits (then finds the key taken) or rolls back (then claims it). An
-- expired key that the purge has not reached yet is taken over. No row back = already taken.
INSERT INTO idempotency_keys (key, fingerprint, expires_at)
VALUES (%(key)s, %(fingerprint)s, now() + make_interval(secs => %(retention)s))
ON CONFLICT (key) DO UPDATE
   SET fingerprint = EXCLUDED.fingerprint, created_at = now(), expires_at = EXCLUDED.expires_at,
       response_status = NULL, response_body = NULL, location = NULL
 WHERE idempotency_keys.expires_at <= now()
RETURNING key;

-- name: get_idempotency_key
SELECT fingerprint, response_status, response_body, location
FROM idempotency_keys WHERE key = %(key)s;

-- name: record_idempotent_response
UPDATE idempotency_keys
   SET response_status = %(status)s, response_body = %(body)s, location = %(location)s
 WHERE key = %(key)s;

-- name: purge_expired_idempotency_keys
-- A small batch at a time; SKIP LOCKED leaves alone a key a request is claiming right now.
DELETE FROM idempotency_keys
 WHERE key IN (SELECT key FROM idempotency_keys
                WHERE expires_at <= now()
                ORDER BY expires_at
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED)
RETURNING key;

-- name: finished_tasks_after
-- Replay for event streams: finished tasks after a place (batch position, task id), in commit
-- order (see migration 0003). Walks task_batches by position, then each batch's tasks.
SELECT t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.created_at,
       t.processed_at, b.position
FROM task_batches AS b
JOIN tasks AS t ON t.finish_batch = b.batch_id
WHERE b.position >= %(position)s AND (b.position, t.id) > (%(position)s, %(task_id)s)
ORDER BY b.position, t.id
LIMIT %(limit)s;

-- name: finished_user_tasks_after
SELECT t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.created_at,
       t.processed_at, b.position
FROM task_batches AS b
JOIN tasks AS t ON t.finish_batch = b.batch_id
WHERE b.position >= %(position)s AND (b.position, t.id) > (%(position)s, %(task_id)s)
  AND t.user_id = %(user_id)s
ORDER BY b.position, t.id
LIMIT %(limit)s;

-- name: place_of_task
SELECT b.position
FROM tasks AS t JOIN task_batches AS b ON b.batch_id = t.finish_batch
WHERE t.id = %(task_id)s;

-- name: latest_batch_position
-- Any snapshot that sees position N sees every smaller one (0003), so this is a clean cut.
SELECT coalesce(max(position), 0) AS position FROM task_batches;

-- name: finished_tasks_among
-- Waiters re-check after the LISTEN connection was re-established: notifications may be lost.
SELECT id, user_id, type, amount, status, reason, balance_after, created_at, processed_at
FROM tasks
WHERE id = ANY(%(ids)s::bigint[]) AND status <> 'pending';

-- ---------------------------------------------------------------------------------------------
-- Performance (issue 4): fewer round trips per batch, many tasks per statement.

-- name: lock_and_read_pending
-- Several users' batches in one transaction. Two statements in one round trip. The first locks
-- the users' rows, in id order so that two transactions can never wait on each other; the lock
-- serialises every worker (in any process) on a user until commit, and NO KEY UPDATE does not
-- conflict with the KEY SHARE lock that concurrent task inserts take through the foreign key.
-- The second takes a new snapshot once the locks are granted, so it sees every batch another
-- worker committed before: each user's balance with its oldest pending tasks (a NULL id if none).
SELECT 1 FROM users WHERE id = ANY(%(user_ids)s::bigint[]) ORDER BY id FOR NO KEY UPDATE;
SELECT u.id AS user_id, u.balance, t.id, t.type, t.amount
FROM users AS u
LEFT JOIN LATERAL (
    SELECT id, type, amount FROM tasks
    WHERE user_id = u.id AND status = 'pending'
    ORDER BY id
    LIMIT %(limit)s
) AS t ON true
WHERE u.id = ANY(%(user_ids)s::bigint[])
ORDER BY u.id, t.id;

-- name: finish_batches
-- Writes several users' outcomes and new balances in one statement. Counting the rows that were
-- still pending lets the caller roll back if anything but this worker touched them.
WITH outcome AS (
    SELECT *
    FROM unnest(%(ids)s::bigint[], %(task_users)s::bigint[], %(statuses)s::text[], %(reasons)s::text[],
                %(balances_after)s::bigint[])
         AS o (id, user_id, status, reason, balance_after)
), finished AS (
    UPDATE tasks AS t
       SET status = o.status, reason = o.reason, balance_after = o.balance_after,
           processed_at = clock_timestamp(),
           -- This transaction is the batch; migration 0003 numbers it at COMMIT.
           finish_batch = pg_current_xact_id()::text::bigint
      FROM outcome AS o
     WHERE t.id = o.id AND t.user_id = o.user_id AND t.status = 'pending'
    RETURNING extract(epoch FROM t.processed_at - t.created_at)::float8 AS seconds
), balance AS (
    UPDATE users AS u
       SET balance = b.balance, updated_at = now()
      FROM unnest(%(user_ids)s::bigint[], %(balances)s::bigint[]) AS b (id, balance)
     WHERE u.id = b.id
    RETURNING u.id
)
-- ...and each task's time from created_at to processed_at, for the metrics.
SELECT (SELECT count(*) FROM finished) AS finished, (SELECT count(*) FROM balance) AS users,
       (SELECT array_agg(seconds) FROM finished) AS latencies;

-- name: enqueue_tasks
-- Many requests' tasks in one statement and one commit. Tasks of unknown users are left out
-- (their requests get 404, nothing is stored) instead of failing the statement for the others.
-- Ids are drawn in input order and returned with each row's input position, so every request
-- gets its own row back; the statement trigger NOTIFYs each touched user once.
WITH numbered AS (
    SELECT i.ord, i.user_id, i.type, i.amount, nextval(pg_get_serial_sequence('tasks', 'id')) AS id
    FROM (
        SELECT *
        FROM unnest(%(user_ids)s::bigint[], %(types)s::text[], %(amounts)s::bigint[]) WITH ORDINALITY
             AS i (user_id, type, amount, ord)
        WHERE EXISTS (SELECT 1 FROM users AS u WHERE u.id = i.user_id)
        ORDER BY i.ord
    ) AS i
), inserted AS (
    INSERT INTO tasks (id, user_id, type, amount)
    OVERRIDING SYSTEM VALUE
    SELECT id, user_id, type, amount FROM numbered ORDER BY id
    RETURNING id, user_id, type, amount, status, reason, balance_after, created_at, processed_at
)
SELECT n.ord, t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.created_at, t.processed_at
FROM inserted AS t JOIN numbered AS n USING (id)
ORDER BY n.ord;

-- name: count_pending
-- For the metrics scrape: the partial index makes this cheap, and a short limit keeps a scrape
-- from ever weighing on the database.
SET LOCAL statement_timeout = 500;
SELECT count(*) AS pending FROM tasks WHERE status = 'pending';
