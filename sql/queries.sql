-- Named queries, loaded once by message_broker.db.queries. Each starts with "-- name: <name>"
-- and uses psycopg2's %(param)s placeholders: every value is a bound parameter, never text.
-- A list parameter arrives as one array literal (db/driver.py array_literal): cast it.

-- ============================================================================================
-- Users
-- ============================================================================================

-- name: create_user
INSERT INTO users (username, balance)
VALUES (%(username)s, %(balance)s)
RETURNING id, username, balance, held;

-- name: get_user
SELECT id, username, balance, held FROM users WHERE id = %(user_id)s;

-- name: list_users
-- Keyset paging: O(limit) per page however deep, and a stable order while users are added.
SELECT id, username, balance, held FROM users
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: find_user_by_username
SELECT id, username, balance, held FROM users WHERE username = %(username)s;

-- name: find_users_by_username_prefix
-- Usernames that start with a prefix, in byte order, a page at a time after a username: a range
-- scan of users_by_username_c (migration 0005), however many users there are. The prefix arrives
-- as a LIKE pattern with its wildcards escaped.
SELECT id, username, balance, held FROM users
WHERE username COLLATE "C" LIKE %(pattern)s
  AND username COLLATE "C" > %(after)s
ORDER BY username COLLATE "C"
LIMIT %(limit)s;

-- ============================================================================================
-- Tasks
-- ============================================================================================

-- name: insert_tasks
-- Many requests' tasks in one statement and one commit: the function insert_tasks (migration 0012,
-- where its rules are), kept on the server so that each connection plans it once. Each row comes
-- back with its input position (ord) and the pid of the server process that stored it.
SELECT *
FROM insert_tasks(%(user_ids)s::bigint[], %(types)s::text[], %(amounts)s::bigint[], %(counterparty_ids)s::bigint[],
                  %(hold_ids)s::bigint[], %(expires_in)s::bigint[], %(created_by)s::text[], %(references)s::text[],
                  %(metadata)s::text[]);

-- name: tasks_by_reference
-- The tasks that hold some (user, reference) pairs, through tasks_reference_per_user.
SELECT r.user_id, r.reference, t.id
FROM unnest(%(user_ids)s::bigint[], %(references)s::text[]) AS r (user_id, reference)
JOIN tasks AS t ON t.user_id = r.user_id AND t.reference = r.reference;

-- name: find_user_task_by_reference
-- GET /api/v1/user/<id>/tasks/?reference=: at most one task, through tasks_reference_per_user.
SELECT id, user_id, type, amount, status, reason, balance_after, available_after, counterparty_id,
       transfer_id, hold_id, expires_at, created_at, processed_at, created_by, reference, metadata
FROM tasks
WHERE user_id = %(user_id)s AND reference = %(reference)s;

-- name: holds_named
-- The user and amount of each hold that captures and voids name (they name their hold, not their
-- user), for insert_tasks.
SELECT id, user_id, amount FROM tasks WHERE id = ANY(%(hold_ids)s::bigint[]) AND type = 'hold';

-- name: get_task
SELECT id, user_id, type, amount, status, reason, balance_after, available_after, counterparty_id,
       transfer_id, hold_id, expires_at, created_at, processed_at, created_by, reference, metadata
FROM tasks WHERE id = %(task_id)s;

-- name: get_tasks
-- Several tasks at once: the reads of requests that began waiting (?wait) in the same moment, and
-- their re-check after the LISTEN connection came back (notifications sent meanwhile are lost).
SELECT id, user_id, type, amount, status, reason, balance_after, available_after, counterparty_id,
       transfer_id, hold_id, expires_at, created_at, processed_at, created_by, reference, metadata
FROM tasks WHERE id = ANY(%(task_ids)s::bigint[]);

-- name: list_user_tasks
-- A page of a user's tasks, id ascending, through the index tasks_by_user. The filters
-- (http/schemas.py TaskListQuerySchema) are arrays, NULL when not asked for: one line each, here
-- and in list_user_tasks_newest_first.
SELECT id, user_id, type, amount, status, reason, balance_after, available_after, counterparty_id,
       transfer_id, hold_id, expires_at, created_at, processed_at, created_by, reference, metadata
FROM tasks
WHERE user_id = %(user_id)s AND id > %(after)s
  AND (%(type)s::text[] IS NULL OR type = ANY(%(type)s::text[]))
  AND (%(status)s::text[] IS NULL OR status = ANY(%(status)s::text[]))
  AND (%(created_by)s::text[] IS NULL OR created_by = ANY(%(created_by)s::text[]))
ORDER BY id
LIMIT %(limit)s;

-- name: list_user_tasks_newest_first
SELECT id, user_id, type, amount, status, reason, balance_after, available_after, counterparty_id,
       transfer_id, hold_id, expires_at, created_at, processed_at, created_by, reference, metadata
FROM tasks
WHERE user_id = %(user_id)s AND id < %(before)s
  AND (%(type)s::text[] IS NULL OR type = ANY(%(type)s::text[]))
  AND (%(status)s::text[] IS NULL OR status = ANY(%(status)s::text[]))
  AND (%(created_by)s::text[] IS NULL OR created_by = ANY(%(created_by)s::text[]))
ORDER BY id DESC
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

-- name: count_pending
-- For the metrics scrape and the console: the partial index makes this cheap, and a short limit
-- keeps a scrape from ever weighing on the database.
SET LOCAL statement_timeout = 500;
SELECT count(*) AS pending FROM tasks WHERE status = 'pending';

-- name: probe
SELECT 1;

-- name: writable
-- /ready's check: a database that answers but takes no writes (a standby behind an endpoint that
-- should reach the primary, or default_transaction_read_only, which managed databases set when
-- their disk fills) answers every write 503, so it is not ready.
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off' AS writable;

-- name: transaction_limits
-- The service's limits and time zone for one transaction (is_local = true: like SET LOCAL, gone at
-- COMMIT or ROLLBACK), sent by the driver before the first statement of every transaction. Nothing
-- is set for the session: through PgBouncer in transaction pooling the next transaction may run on
-- another server connection, and this one may serve another client. The values are rendered once
-- (db/options.py), from integers.
SELECT set_config('statement_timeout', %(statement_timeout)s, true),
       set_config('idle_in_transaction_session_timeout', %(idle_in_transaction_session_timeout)s, true),
       set_config('lock_timeout', '0', true),
       set_config('TimeZone', 'UTC', true);

-- name: notify_probe
-- The listener's probe, sent through the pool (db/listener.py): heard on the LISTEN connection
-- only if that connection really listens on the database the pool writes to.
SELECT pg_notify(%(channel)s, %(payload)s);

-- ============================================================================================
-- Applying tasks
-- ============================================================================================

-- name: lock_and_read_pending
-- Lock several users (and their pending transfers' recipients) in id order, then read each one's
-- account and oldest pending tasks (a NULL id if none): the function lock_and_read_pending
-- (migration 0012, where the locking rules are).
SELECT * FROM lock_and_read_pending(%(user_ids)s::bigint[], %(limit)s);

-- name: lock_recipients
-- The accounts of the recipients of a batch's transfers. lock_and_read_pending locked those it
-- saw; a transfer stored since may name one it did not: SKIP LOCKED takes that row only if it is
-- free (never waiting out of order), and the sender's batch stops before a transfer whose
-- recipient is missing here. Rows this transaction has locked already are never skipped.
SELECT id, balance, held FROM users
WHERE id = ANY(%(user_ids)s::bigint[])
ORDER BY id
FOR NO KEY UPDATE SKIP LOCKED;

-- name: holds_of
-- The holds a batch's captures, voids and releases name. Only the holds' users' transactions
-- change them, and those users are locked.
SELECT id, user_id, amount, expires_at, status FROM holds WHERE id = ANY(%(hold_ids)s::bigint[]);

-- name: finish_batches
-- One transaction's outcomes and the accounts' new balances: the function finish_batches
-- (migration 0012). It is sent with the COMMIT (and record_batch_effects, applied_tasks) in one
-- message, so it checks its own work: if fewer rows than it was given were still pending, it raises
-- (apply_lost_race, migration 0011), which aborts the transaction before its COMMIT. (What transfers
-- and holds add goes through record_batch_effects, only when there is some: statement triggers
-- fire even for an INSERT of no rows.)
SELECT finish_batches(%(ids)s::bigint[], %(task_users)s::bigint[], %(statuses)s::text[], %(reasons)s::text[],
                      %(balances_after)s::bigint[], %(availables_after)s::bigint[], %(account_ids)s::bigint[],
                      %(balances)s::bigint[], %(helds)s::bigint[]);

-- name: record_batch_effects
-- What a batch's transfers and holds write besides outcomes, in the same transaction, right after
-- finish_batches in the same message: the recipients' transfer-in entries (stamped with
-- finish_batches' instant, read from a transfer it finished), new holds and resolved ones. Checked
-- like finish_batches.
WITH instant AS MATERIALIZED (
    SELECT processed_at AS at FROM tasks WHERE id = (%(in_transfers)s::bigint[])[1]
), transfer_in AS (
    -- Ids drawn in the order the credits were applied, so a recipient's entries of one batch read
    -- in id order as they were applied.
    -- A transfer-in is the other half of its transfer: it names the client that posted the transfer.
    INSERT INTO tasks (id, user_id, type, amount, status, balance_after, available_after, counterparty_id,
                       transfer_id, created_at, processed_at, finish_batch, created_by)
    OVERRIDING SYSTEM VALUE
    SELECT nextval(pg_get_serial_sequence('tasks', 'id')), c.user_id, 'transfer-in', c.amount, 'done',
           c.balance_after, c.available_after, c.sender_id, c.transfer_id, (SELECT at FROM instant),
           (SELECT at FROM instant), pg_current_xact_id()::text::bigint,
           (SELECT s.created_by FROM tasks AS s WHERE s.id = c.transfer_id)
    FROM (SELECT *
          FROM unnest(%(in_users)s::bigint[], %(in_amounts)s::bigint[], %(in_senders)s::bigint[],
                      %(in_transfers)s::bigint[], %(in_balances)s::bigint[], %(in_availables)s::bigint[])
               WITH ORDINALITY AS c (user_id, amount, sender_id, transfer_id, balance_after, available_after, ord)
          ORDER BY c.ord) AS c
    RETURNING id
), new_hold AS (
    -- Holds created by this batch, in their state at its end (a hold can be created and resolved
    -- in one batch; one statement cannot update a row it inserts).
    INSERT INTO holds (id, user_id, amount, expires_at, status, captured_amount, resolved_by)
    SELECT *
    FROM unnest(%(new_hold_ids)s::bigint[], %(new_hold_users)s::bigint[], %(new_hold_amounts)s::bigint[],
                %(new_hold_expiries)s::timestamptz[], %(new_hold_statuses)s::text[],
                %(new_hold_captured)s::bigint[], %(new_hold_resolved_by)s::bigint[])
    RETURNING id
), resolved_hold AS (
    UPDATE holds AS h
       SET status = r.status, captured_amount = r.captured_amount, resolved_by = r.resolved_by
      FROM unnest(%(resolved_hold_ids)s::bigint[], %(resolved_hold_statuses)s::text[],
                  %(resolved_hold_captured)s::bigint[], %(resolved_hold_by)s::bigint[])
           AS r (id, status, captured_amount, resolved_by)
     WHERE h.id = r.id AND h.status = 'active'
    RETURNING h.id
)
SELECT CASE WHEN (SELECT count(*) FROM transfer_in) <> cardinality(%(in_users)s::bigint[])
              OR (SELECT count(*) FROM new_hold) <> cardinality(%(new_hold_ids)s::bigint[])
              OR (SELECT count(*) FROM resolved_hold) <> cardinality(%(resolved_hold_ids)s::bigint[])
            THEN apply_lost_race(format('wrote %%s of %%s transfer-ins, %%s of %%s new holds, resolved %%s of %%s holds',
                                        (SELECT count(*) FROM transfer_in), cardinality(%(in_users)s::bigint[]),
                                        (SELECT count(*) FROM new_hold), cardinality(%(new_hold_ids)s::bigint[]),
                                        (SELECT count(*) FROM resolved_hold),
                                        cardinality(%(resolved_hold_ids)s::bigint[])))
       END AS lost_race;

-- name: applied_tasks
-- Right after the apply transaction's COMMIT, in the same message (psycopg2 hands back the last
-- statement's rows only): the tasks it finished that requests of this process wait for (answered
-- from here, without the notification's trip), and one more, whose processed_at is the
-- transaction's instant (each task's created->processed time, for the metrics).
SELECT id, user_id, type, amount, status, reason, balance_after, available_after, counterparty_id,
       transfer_id, hold_id, expires_at, created_at, processed_at, created_by, reference, metadata
FROM tasks
WHERE id = ANY(%(read_ids)s::bigint[]);

-- name: finish_as_remembered
-- The apply in one round trip, for users whose accounts and pending tasks this process remembers:
-- the function finish_as_remembered (migration 0014) locks them, and writes the outcomes worked out
-- from what is remembered (finish_batches) only if the database holds exactly that. Sent with BEGIN,
-- COMMIT and applied_tasks_as_remembered in one message.
SELECT finish_as_remembered(%(user_ids)s::bigint[], %(remembered_balances)s::bigint[],
                            %(remembered_helds)s::bigint[], %(remembered_ids)s::bigint[],
                            %(remembered_users)s::bigint[], %(remembered_types)s::text[],
                            %(remembered_amounts)s::bigint[], %(ids)s::bigint[], %(task_users)s::bigint[],
                            %(statuses)s::text[], %(reasons)s::text[], %(balances_after)s::bigint[],
                            %(availables_after)s::bigint[], %(account_ids)s::bigint[], %(balances)s::bigint[],
                            %(helds)s::bigint[]);

-- name: applied_tasks_as_remembered
-- applied_tasks after finish_as_remembered: whether it wrote, the users with a task still pending,
-- and the tasks to read back (migration 0014).
SELECT * FROM applied_as_remembered(%(user_ids)s::bigint[], %(read_ids)s::bigint[]);

-- ============================================================================================
-- History: a user's finished tasks in applied order, (processed_at, id) (migration 0008)
-- ============================================================================================

-- name: wait_for_the_users_applies
-- Sent before state_before, in the same message (one implicit transaction): waits until the
-- user's apply under way, if any, has committed. An apply stamps its instant (processed_at) once it
-- holds the user's row, before its commit, which may come much later (a synchronous standby away,
-- a stalled disk); without this, a read of an instant after the stamp could miss a task that a
-- later read of the same instant finds. FOR SHARE waits for that lock (NO KEY UPDATE) and for
-- nothing else (task inserts take KEY SHARE); state_before, the next statement, takes its snapshot
-- once it is granted, and any apply after it stamps a later instant than state_before's clock.
-- Only when the user has finished no task after `until` (NULL: now): applies of a user take turns
-- on its row and stamp after the one before committed, so one under way stamps after every
-- finished task, and past one finished after `until` it cannot change what is read up to `until`.
-- Such a read (most of the past) locks nothing: one probe of tasks_history.
SELECT 1 FROM users
WHERE id = %(user_id)s
  AND NOT EXISTS (SELECT FROM tasks
                  WHERE user_id = %(user_id)s AND status <> 'pending'
                    AND processed_at > coalesce(%(until)s::timestamptz, 'infinity'))
FOR SHARE;

-- name: state_before
-- A user's state after every task it finished before an instant: one backward probe of
-- tasks_history, however long the history (no task: the opening balance). With the user's
-- creation time and the database's clock, to judge the instant.
SELECT u.created_at, clock_timestamp() AS now, u.opening_balance, u.opening_held,
       t.id AS last_task_id, t.balance_after, t.available_after
FROM users AS u
LEFT JOIN LATERAL (
    SELECT id, balance_after, available_after FROM tasks
    WHERE user_id = u.id AND status <> 'pending' AND processed_at < %(before)s
    ORDER BY processed_at DESC, id DESC
    LIMIT 1
) AS t ON true
WHERE u.id = %(user_id)s;

-- name: history_page
-- A page of a user's finished tasks in applied order, after a place (processed_at, id) and
-- before an instant: a range of tasks_history, O(page) however deep.
SELECT id, user_id, type, amount, status, reason, balance_after, available_after, counterparty_id,
       transfer_id, hold_id, expires_at, created_at, processed_at, created_by, reference, metadata
FROM tasks
WHERE user_id = %(user_id)s AND status <> 'pending'
  AND (processed_at, id) > (%(after_at)s, %(after_id)s) AND processed_at < %(before)s
ORDER BY processed_at, id
LIMIT %(limit)s;

-- ============================================================================================
-- The audit (message-broker verify, audit.py): each query streams through a cursor in one
-- REPEATABLE READ snapshot; user_id NULL checks every user, else that one.
-- ============================================================================================

-- name: audit_users
-- Each user's history against its stored state: its opening balance and held plus what its done
-- tasks did (a capture, void or release frees its whole hold, the holds row's amount), its active
-- holds, the first task that recorded a negative available balance, and its first finished task
-- against its created_at (a task applied before the user existed is in no statement: a window
-- that ends by created_at is user_not_found). Only the users that fail
-- a check come back, then one row of totals (users, tasks, and what entered or left the system):
-- a healthy ledger of a million users is one row, not a million through the cursor. Each part is
-- planned on its own (MATERIALIZED): a sequential pass with a hashed aggregate, not a walk of an
-- index in user order.
WITH effects AS MATERIALIZED (
    SELECT user_id, count(*) AS tasks,
           sum(CASE WHEN status <> 'done' THEN 0
                    WHEN type IN ('replenishment', 'transfer-in') THEN amount
                    WHEN type IN ('write-off', 'transfer', 'capture') THEN -amount
                    ELSE 0 END) AS balance_change,
           sum(amount) FILTER (WHERE status = 'done' AND type = 'hold') AS held_added,
           sum(amount) FILTER (WHERE status = 'done' AND type = 'replenishment') AS replenished,
           sum(amount) FILTER (WHERE status = 'done' AND type = 'write-off') AS written_off,
           sum(amount) FILTER (WHERE status = 'done' AND type = 'capture') AS captured,
           count(*) FILTER (WHERE available_after < 0) AS negative_available,
           min(id) FILTER (WHERE available_after < 0) AS first_negative,
           min(processed_at) AS first_processed
    FROM tasks
    WHERE status <> 'pending' AND (%(user_id)s::bigint IS NULL OR user_id = %(user_id)s::bigint)
    GROUP BY user_id
), freed AS MATERIALIZED (
    SELECT t.user_id, sum(h.amount) AS held_freed
    FROM tasks AS t JOIN holds AS h ON h.id = t.hold_id
    WHERE t.status = 'done' AND t.type IN ('capture', 'void', 'release')
      AND (%(user_id)s::bigint IS NULL OR t.user_id = %(user_id)s::bigint)
    GROUP BY t.user_id
), active AS MATERIALIZED (
    SELECT user_id, sum(amount) AS active FROM holds
    WHERE status = 'active' AND (%(user_id)s::bigint IS NULL OR user_id = %(user_id)s::bigint)
    GROUP BY user_id
), checked AS MATERIALIZED (
    SELECT u.id AS user_id, u.balance, u.held, u.opening_balance,
           u.opening_balance + coalesce(e.balance_change, 0) AS expected_balance,
           u.opening_held + coalesce(e.held_added, 0) - coalesce(f.held_freed, 0) AS expected_held,
           coalesce(a.active, 0) AS active_holds, coalesce(e.tasks, 0) AS tasks,
           coalesce(e.replenished, 0) AS replenished,
           coalesce(e.written_off, 0) + coalesce(e.captured, 0) AS removed,
           coalesce(e.negative_available, 0) AS negative_available, e.first_negative,
           u.created_at, e.first_processed
    FROM users AS u
    LEFT JOIN effects AS e ON e.user_id = u.id
    LEFT JOIN freed AS f ON f.user_id = u.id
    LEFT JOIN active AS a ON a.user_id = u.id
    WHERE %(user_id)s::bigint IS NULL OR u.id = %(user_id)s::bigint
)
SELECT false AS totals, user_id, balance, held, expected_balance, expected_held, active_holds,
       negative_available, first_negative, created_at, first_processed, NULL::bigint AS users, tasks,
       NULL::numeric AS openings, NULL::numeric AS replenished, NULL::numeric AS removed
FROM checked
WHERE expected_balance <> balance OR expected_held <> held OR active_holds <> held OR negative_available > 0
   OR first_processed < created_at
UNION ALL
SELECT true, NULL, sum(balance), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, count(*), sum(tasks),
       sum(opening_balance), sum(replenished), sum(removed)
FROM checked;

-- name: audit_transfers
-- Done transfers without exactly one transfer-in of their amount to their recipient, and
-- transfer-ins of no done transfer (for one user: those it sent, and its transfer-ins).
SELECT t.user_id, t.id AS task_id, 'transfer' AS kind, t.amount, t.counterparty_id,
       count(i.id) AS entries, min(i.amount) AS entry_amount, min(i.user_id) AS entry_user
FROM tasks AS t
LEFT JOIN tasks AS i ON i.transfer_id = t.id AND i.type = 'transfer-in'
WHERE t.type = 'transfer' AND t.status = 'done'
  AND (%(user_id)s::bigint IS NULL OR t.user_id = %(user_id)s::bigint)
GROUP BY t.id
HAVING count(i.id) <> 1 OR min(i.amount) <> t.amount OR min(i.user_id) <> t.counterparty_id
UNION ALL
SELECT i.user_id, i.id, 'transfer-in', i.amount, i.counterparty_id, 0, t.amount, t.user_id
FROM tasks AS i
JOIN tasks AS t ON t.id = i.transfer_id
WHERE i.type = 'transfer-in' AND (t.type <> 'transfer' OR t.status <> 'done')
  AND (%(user_id)s::bigint IS NULL OR i.user_id = %(user_id)s::bigint);

-- name: audit_hold_resolutions
-- Holds resolved (a done capture, void or release) more than once.
SELECT user_id, hold_id, count(*) AS resolutions, array_agg(id ORDER BY id) AS task_ids
FROM tasks
WHERE type IN ('capture', 'void', 'release') AND status = 'done'
  AND (%(user_id)s::bigint IS NULL OR user_id = %(user_id)s::bigint)
GROUP BY user_id, hold_id
HAVING count(*) > 1;

-- name: audit_holds
-- Each hold's row (what GET /hold answers and a capture is checked against) against its tasks: its
-- amount against its hold task's; its status, resolved_by and captured_amount against the done
-- capture, void or release that resolved it (the first, when several: audit_hold_resolutions
-- names those), none for an active hold; a done capture or void stored (created_at) at or after
-- the hold's expires_at, which was too late (hold_not_active); and its expires_at against its hold
-- task's, 1 s to 30 days (expires_in) after that was stored. One pass over the holds, each
-- joined to its tasks by key.
WITH resolved AS MATERIALIZED (
    SELECT DISTINCT ON (hold_id) hold_id, id, type, amount, created_at
    FROM tasks
    WHERE type IN ('capture', 'void', 'release') AND status = 'done'
      AND (%(user_id)s::bigint IS NULL OR user_id = %(user_id)s::bigint)
    ORDER BY hold_id, id
), broken AS MATERIALIZED (
    -- Compared as values; only the holds that fail are written out as text, below.
    SELECT h.user_id, h.id, h.amount, h.status, h.resolved_by, h.captured_amount, h.expires_at,
           t.amount AS task_amount, t.created_at AS task_created_at, t.expires_at AS task_expires_at,
           r.id AS resolution, r.created_at AS resolution_created_at,
           CASE r.type WHEN 'capture' THEN 'captured' WHEN 'void' THEN 'voided' WHEN 'release' THEN 'expired'
                       ELSE 'active' END AS expected_status,
           CASE WHEN r.type = 'capture' THEN r.amount END AS expected_captured,
           r.type IN ('capture', 'void') AND r.created_at >= h.expires_at AS late,
           t.expires_at - t.created_at NOT BETWEEN interval '1 second' AND interval '30 days' AS out_of_range
    FROM holds AS h
    JOIN tasks AS t ON t.id = h.id
    LEFT JOIN resolved AS r ON r.hold_id = h.id
    WHERE (%(user_id)s::bigint IS NULL OR h.user_id = %(user_id)s::bigint)
      AND (h.amount <> t.amount
           OR h.status <> CASE r.type WHEN 'capture' THEN 'captured' WHEN 'void' THEN 'voided'
                                      WHEN 'release' THEN 'expired' ELSE 'active' END
           OR h.resolved_by IS DISTINCT FROM r.id
           OR h.captured_amount IS DISTINCT FROM (CASE WHEN r.type = 'capture' THEN r.amount END)
           OR (r.type IN ('capture', 'void') AND r.created_at >= h.expires_at)
           OR h.expires_at IS DISTINCT FROM t.expires_at
           OR t.expires_at - t.created_at NOT BETWEEN interval '1 second' AND interval '30 days')
)
SELECT b.user_id, b.id AS hold_id, f.field, f.expected, f.found
FROM broken AS b
CROSS JOIN LATERAL (VALUES
    (1, 'amount (its hold task''s)', b.task_amount::text, b.amount::text),
    (2, 'status (its resolving task''s)', b.expected_status, b.status),
    (3, 'resolved_by', coalesce(b.resolution::text, 'none'), coalesce(b.resolved_by::text, 'none')),
    (4, 'captured_amount (its capture''s amount)', coalesce(b.expected_captured::text, 'none'),
     coalesce(b.captured_amount::text, 'none')),
    (5, 'resolved by task ' || b.resolution || ' stored before expires_at ' || b.expires_at, 'created_at before it',
     CASE WHEN b.late THEN b.resolution_created_at::text ELSE 'created_at before it' END),
    (6, 'expires_at (its hold task''s)', b.task_expires_at::text, b.expires_at::text),
    (7, 'expires_at - created_at of its hold task', '1 s to 30 days',
     CASE WHEN b.out_of_range THEN (b.task_expires_at - b.task_created_at)::text ELSE '1 s to 30 days' END)
) AS f (ord, field, expected, found)
WHERE f.expected IS DISTINCT FROM f.found
ORDER BY b.user_id, b.id, f.ord;

-- name: audit_history
-- Each finished task's recorded balance_after and available_after against the one before it in
-- applied order, (processed_at, id), the statements' order (the first task against the user's
-- opening balance and held): a done replenishment or transfer-in adds its amount to the balance, a
-- done write-off, transfer or capture takes it; a done hold moves its amount from available to
-- held, and a done capture, void or release frees its whole hold (the holds row's amount, as
-- audit_users); a cancelled task changes nothing and records the same values again. Since every
-- link is checked, the first task that breaks a user's chain is the first whose recorded values
-- are not its opening plus the finished tasks up to it; the later ones follow from it, so only the
-- first break of each column of each user comes back (none on a healthy ledger), with the value
-- expected there. One walk of the index tasks_history (user_id, processed_at, id), no sort; the
-- window's frame is the row before and the current one (the default frame starts at a partition's
-- first row, so the window kept a whole user's history buffered: twice as slow for a user with a
-- million tasks). Only each user's first task and the links that break are joined to users. The
-- differences are compared in bigint, which cannot overflow on values the tables' constraints allow
-- (balances, availables and amounts are 0..2^63-1); the expected value is worked out in numeric,
-- for the rows that fail only.
WITH walked AS (
    SELECT t.user_id, t.id, t.processed_at, t.balance_after, t.available_after,
           lag(t.balance_after) OVER w AS balance_before,
           lag(t.available_after) OVER w AS available_before,
           CASE WHEN t.status <> 'done' THEN 0
                WHEN t.type IN ('replenishment', 'transfer-in') THEN t.amount
                WHEN t.type IN ('write-off', 'transfer', 'capture') THEN -t.amount
                ELSE 0 END AS balance_change,
           CASE WHEN t.status <> 'done' THEN 0
                WHEN t.type IN ('replenishment', 'transfer-in') THEN t.amount
                WHEN t.type IN ('write-off', 'transfer', 'hold') THEN -t.amount
                -- capture, void, release: the whole hold is freed; a capture charges its own amount.
                ELSE coalesce((SELECT h.amount FROM holds AS h WHERE h.id = t.hold_id), 0)
                     - CASE WHEN t.type = 'capture' THEN t.amount ELSE 0 END
           END AS available_change
    FROM tasks AS t
    WHERE t.status <> 'pending' AND (%(user_id)s::bigint IS NULL OR t.user_id = %(user_id)s::bigint)
    WINDOW w AS (PARTITION BY t.user_id ORDER BY t.processed_at, t.id ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
), suspect AS (
    -- The links that break, and each user's first task (its link is to the opening, below).
    SELECT * FROM walked
    WHERE balance_before IS NULL
       OR balance_after - balance_before IS DISTINCT FROM balance_change
       OR available_after - available_before IS DISTINCT FROM available_change
), broken AS MATERIALIZED (
    SELECT w.user_id, w.id, w.processed_at, w.balance_after, w.available_after,
           coalesce(w.balance_before, u.opening_balance)::numeric + w.balance_change AS expected_balance,
           coalesce(w.available_before, u.opening_balance - u.opening_held)::numeric + w.available_change
               AS expected_available
    FROM suspect AS w
    JOIN users AS u ON u.id = w.user_id
    WHERE w.balance_after - coalesce(w.balance_before, u.opening_balance) IS DISTINCT FROM w.balance_change
       OR w.available_after - coalesce(w.available_before, u.opening_balance - u.opening_held)
          IS DISTINCT FROM w.available_change
)
SELECT DISTINCT ON (b.user_id, f.ord) b.user_id, b.id AS task_id, f.field, f.expected, f.found
FROM broken AS b
CROSS JOIN LATERAL (VALUES (1, 'balance_after', b.expected_balance, b.balance_after),
                           (2, 'available_after', b.expected_available, b.available_after))
    AS f (ord, field, expected, found)
WHERE f.expected IS DISTINCT FROM f.found
ORDER BY b.user_id, f.ord, b.processed_at, b.id;

-- ============================================================================================
-- Holds
-- ============================================================================================

-- name: get_hold
-- A hold is its hold task; the holds row exists once that task was applied.
SELECT t.id, t.user_id, t.amount, t.status AS task_status, t.expires_at,
       h.status, h.captured_amount, h.resolved_by
FROM tasks AS t
LEFT JOIN holds AS h ON h.id = t.id
WHERE t.id = %(hold_id)s AND t.type = 'hold';

-- name: list_user_holds
-- A user's holds, id ascending, optionally only those in some states (hold_statuses NULL: all).
SELECT t.id, t.user_id, t.amount, t.status AS task_status, t.expires_at,
       h.status, h.captured_amount, h.resolved_by
FROM tasks AS t
LEFT JOIN holds AS h ON h.id = t.id
WHERE t.user_id = %(user_id)s AND t.type = 'hold' AND t.id > %(after)s
  AND (%(hold_statuses)s::text[] IS NULL
       OR coalesce(h.status, CASE t.status WHEN 'pending' THEN 'pending' ELSE 'cancelled' END)
          = ANY(%(hold_statuses)s::text[]))
ORDER BY t.id
LIMIT %(limit)s;

-- name: next_hold_deadline
-- Seconds until the earliest deadline of an active hold whose release is not queued yet
-- (negative: passed; NULL: none).
SELECT extract(epoch FROM min(expires_at) - clock_timestamp())::float8 AS seconds
FROM holds
WHERE status = 'active' AND release_id IS NULL;

-- name: release_expired_holds
-- One release task per active hold past its deadline, a batch at a time, each recorded on its hold
-- so that the next batch moves on. SKIP LOCKED leaves alone a hold another process is releasing, or
-- a worker is resolving, right now (its holds row), and one a capture or void is being stored for
-- (the hold's advisory lock, which insert_tasks holds shared until its commit, migration 0017: the
-- release then comes after it in the user's queue; held here until this commit, the insert waits
-- and is stamped after the deadline). The unique index tasks_one_release_per_hold makes the
-- release once per hold whatever happens. The statement trigger wakes the holds' users, whose
-- loops apply the releases in order with their other tasks.
WITH due AS (
    -- Tried only on the rows this takes (a subquery with a locking clause is run as written).
    SELECT h.id, h.user_id, h.amount
    FROM (SELECT id, user_id, amount FROM holds
          WHERE status = 'active' AND release_id IS NULL AND expires_at <= clock_timestamp()
          ORDER BY expires_at
          LIMIT %(limit)s
          FOR NO KEY UPDATE SKIP LOCKED) AS h
    WHERE pg_try_advisory_xact_lock(hold_release_lock(h.id))
), released AS (
    -- The service makes these itself: created_by 'service' (see migration 0009).
    INSERT INTO tasks (user_id, type, amount, hold_id, created_by)
    SELECT user_id, 'release', amount, id, 'service' FROM due
    ON CONFLICT (hold_id) WHERE type = 'release' DO NOTHING
    RETURNING id, hold_id
), recorded_earlier AS (
    -- A hold whose release exists already (the unique index refused it again) is recorded with it.
    -- The statement's snapshot does not see the releases inserted above, only such earlier ones.
    UPDATE holds AS h
       SET release_id = t.id
      FROM due JOIN tasks AS t ON t.hold_id = due.id AND t.type = 'release'
     WHERE h.id = due.id
    RETURNING h.id
), recorded AS (
    -- Each hold is found from its release, never by matching the two CTEs' rows to each other: their
    -- estimate is one row, and a nested loop over both was quadratic (10,000 holds due at once: 0.46
    -- s per 1,000, 3-10 s in all, whenever the statistics of holds were stale).
    UPDATE holds AS h
       SET release_id = r.id
      FROM released AS r
     WHERE h.id = r.hold_id
    RETURNING h.id
)
SELECT id FROM recorded UNION ALL SELECT id FROM recorded_earlier;

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
SELECT t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.available_after,
       t.counterparty_id, t.transfer_id, t.hold_id, t.expires_at, t.created_at, t.processed_at, t.created_by,
       t.reference, t.metadata, b.position
FROM task_batches AS b
JOIN tasks AS t ON t.finish_batch = b.batch_id
WHERE b.position >= %(position)s AND (b.position, t.id) > (%(position)s, %(task_id)s)
ORDER BY b.position, t.id
LIMIT %(limit)s;

-- name: finished_user_tasks_after
-- One user's replay: its tasks finished in transactions from the horizon of the place's batch on
-- (migration 0006), through tasks_finished_by_user; work in proportion to the user's events since
-- then, not to every batch since then.
SELECT t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.available_after,
       t.counterparty_id, t.transfer_id, t.hold_id, t.expires_at, t.created_at, t.processed_at, t.created_by,
       t.reference, t.metadata, b.position
FROM tasks AS t
JOIN task_batches AS b ON b.batch_id = t.finish_batch
WHERE t.user_id = %(user_id)s
  AND t.finish_batch >= coalesce((SELECT horizon FROM task_batches WHERE position = %(position)s), 0)
  AND (b.position, t.id) > (%(position)s, %(task_id)s)
ORDER BY b.position, t.id
LIMIT %(limit)s;

-- name: place_of_task
-- Where a finished task is in the streams, and whether that is further back than they can resume
-- from (its batch is older than the retention, or already purged: no position).
SELECT b.position, b.position IS NULL OR b.finished_at < now() - make_interval(secs => %(retention)s) AS expired
FROM tasks AS t LEFT JOIN task_batches AS b ON b.batch_id = t.finish_batch
WHERE t.id = %(task_id)s AND t.status <> 'pending';

-- name: latest_batch_position
-- Any snapshot that sees position N sees every smaller one (0003), so this is a clean cut.
SELECT coalesce(max(position), 0) AS position FROM task_batches;

-- name: purge_old_task_batches
-- Stream positions older than the retention, a small batch at a time, oldest first. Batches of
-- transactions still running have no position yet and are locked: never touched.
DELETE FROM task_batches
 WHERE batch_id IN (SELECT batch_id FROM task_batches
                     WHERE finished_at < now() - make_interval(secs => %(retention)s) AND position IS NOT NULL
                     ORDER BY finished_at
                     LIMIT %(limit)s
                     FOR UPDATE SKIP LOCKED)
RETURNING batch_id;

-- name: claim_maintenance_run
-- A periodic job's turn: at most one process per interval gets a row back.
INSERT INTO maintenance_runs AS m (job, last_started_at) VALUES (%(job)s, now())
ON CONFLICT (job) DO UPDATE SET last_started_at = now()
 WHERE m.last_started_at <= now() - make_interval(secs => %(interval)s)
RETURNING job;

-- name: table_sizes
-- For /metrics: live rows (the statistics' estimate, no scan) and bytes on disk with indexes and
-- TOAST, of the service's tables.
SELECT c.relname AS name, coalesce(s.n_live_tup, 0) AS rows, pg_total_relation_size(c.oid) AS bytes
FROM pg_class AS c
LEFT JOIN pg_stat_user_tables AS s ON s.relid = c.oid
WHERE c.oid IN (SELECT to_regclass(n) FROM unnest(%(tables)s::text[]) AS n);

-- ============================================================================================
-- Webhooks (migration 0010): endpoints, the deliveries outbox, attempts. The outbox is written at
-- COMMIT of every finishing transaction by the trigger queue_webhook_deliveries.
-- ============================================================================================

-- name: create_webhook_endpoint
-- With its deliveries by status (none yet), as every answer carrying an endpoint has them.
INSERT INTO webhook_endpoints (url, events, description, secret)
VALUES (%(url)s, %(events)s::text[], %(description)s, %(secret)s)
RETURNING id, url, events, description, status, disabled_reason, created_at, updated_at,
          0 AS pending, 0 AS delivered, 0 AS failed;

-- name: list_webhook_endpoints
-- Every endpoint with its deliveries by status (migration 0018).
SELECT e.id, e.url, e.events, e.description, e.status, e.disabled_reason, e.created_at, e.updated_at,
       c.pending, c.delivered, c.failed
FROM webhook_endpoints AS e
CROSS JOIN LATERAL webhook_delivery_counts(e.id) AS c
WHERE %(endpoint_id)s::bigint IS NULL OR e.id = %(endpoint_id)s::bigint
ORDER BY e.id;

-- name: update_webhook_endpoint
-- A PATCH: NULL leaves a field as it is. Disabling by hand says so (disabling a disabled endpoint
-- again keeps why it was: "gone", "failing"); enabling again forgets the failures that may have
-- disabled it. `updated_at` moves only when a field changes: a client replays a disabled endpoint's
-- gap from it (README), so a PATCH that changes nothing must not move it past events of the gap.
-- Answered with its deliveries by status, as GET.
WITH e AS (
    UPDATE webhook_endpoints
       SET url = coalesce(%(url)s, url),
           events = coalesce(%(events)s::text[], events),
           description = coalesce(%(description)s, description),
           status = coalesce(%(status)s, status),
           disabled_reason = CASE coalesce(%(status)s, status)
                                 WHEN 'enabled' THEN NULL
                                 ELSE CASE WHEN %(status)s IS NULL OR status = 'disabled' THEN disabled_reason
                                           ELSE 'manual' END
                             END,
           failing_since = CASE WHEN %(status)s = 'enabled' AND status = 'disabled' THEN NULL ELSE failing_since END,
           updated_at = CASE WHEN (coalesce(%(url)s, url), coalesce(%(events)s::text[], events),
                                   coalesce(%(description)s, description), coalesce(%(status)s, status))
                                  IS DISTINCT FROM (url, events, description, status)
                             THEN now() ELSE updated_at END
     WHERE id = %(endpoint_id)s
    RETURNING id, url, events, description, status, disabled_reason, created_at, updated_at
)
SELECT e.*, c.pending, c.delivered, c.failed
FROM e
CROSS JOIN LATERAL webhook_delivery_counts(e.id) AS c;

-- name: bring_forward_webhook_deliveries
-- An endpoint enabled again: its pending deliveries that wait for a later retry (up to 10 h on the
-- schedule) are due at once, before what finishes from now on (README: "resumes it, pending
-- deliveries first"). Only when it was disabled (locked here, so that the PATCH that enables it
-- decides), and not those due within a lease: one of them may be a claim whose attempt is under way
-- (its next_attempt_at is the lease's end), which must not be sent a second time at once.
UPDATE webhook_deliveries
   SET next_attempt_at = clock_timestamp()
 WHERE endpoint_id = %(endpoint_id)s AND status = 'pending'
   AND next_attempt_at > clock_timestamp() + make_interval(secs => %(lease)s)
   AND EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = %(endpoint_id)s AND status = 'disabled' FOR UPDATE);

-- name: delete_webhook_endpoint
-- Its deliveries (pending ones included) and their attempts go with it (ON DELETE CASCADE).
DELETE FROM webhook_endpoints WHERE id = %(endpoint_id)s RETURNING id;

-- name: rotate_webhook_secret
-- The old key keeps signing beside the new one until previous_secret_expires_at. Answered with
-- its deliveries by status, as GET.
WITH e AS (
    UPDATE webhook_endpoints
       SET previous_secret = secret, secret = %(secret)s,
           previous_secret_expires_at = now() + make_interval(secs => %(overlap)s), updated_at = now()
     WHERE id = %(endpoint_id)s
    RETURNING id, url, events, description, status, disabled_reason, created_at, updated_at
)
SELECT e.*, c.pending, c.delivered, c.failed
FROM e
CROSS JOIN LATERAL webhook_delivery_counts(e.id) AS c;

-- name: wake_webhook_senders
-- Deliveries became due outside the outbox trigger (a retry, a replay, an endpoint enabled).
SELECT pg_notify('webhook_delivery', '');

-- name: claim_webhook_deliveries
-- Due deliveries of enabled endpoints, at most `room` of each (room_ids/room: what this process
-- may still take of the endpoints it holds deliveries of; any other endpoint: per_endpoint),
-- `limit` in all, oldest due first: one slow endpoint's backlog cannot take every slot. SKIP
-- LOCKED: never two processes on one delivery. The claim moves next_attempt_at to the end of a
-- lease (an attempt whose process died is due again then) and counts the attempt, whose number is
-- the claim's fencing token and its number in the log (it only grows: migration 0016); its place
-- in the retry schedule is counted from schedule_from (NULL: a manual retry, one attempt). The task comes as its whole row, so that every column the task
-- serializer reads is there. One round trip: the two statements are one implicit transaction,
-- whose commit need not wait for the disk (a claim lost in a crash only makes the attempt again,
-- at least once, as a lease would).
SET LOCAL synchronous_commit = off;
WITH capacity AS (
    SELECT e.id, coalesce(b.room, %(per_endpoint)s) AS free
      FROM webhook_endpoints AS e
      LEFT JOIN unnest(%(room_ids)s::bigint[], %(room)s::int[]) AS b (id, room) ON b.id = e.id
     WHERE e.status = 'enabled'
), due AS (
    SELECT d.id
      FROM capacity AS c
     CROSS JOIN LATERAL (
        SELECT id FROM webhook_deliveries
         WHERE endpoint_id = c.id AND status = 'pending' AND next_attempt_at <= clock_timestamp()
         ORDER BY next_attempt_at
         LIMIT c.free
         FOR UPDATE SKIP LOCKED
     ) AS d
     WHERE c.free > 0
     LIMIT %(limit)s
), claimed AS (
    UPDATE webhook_deliveries AS d
       SET attempts = d.attempts + 1, next_attempt_at = clock_timestamp() + make_interval(secs => %(lease)s)
      FROM due
     WHERE d.id = due.id
    RETURNING d.id, d.endpoint_id, d.task_id, d.event_type, d.attempts, d.schedule_from
)
SELECT c.id AS delivery_id, c.endpoint_id, c.event_type, c.attempts AS attempt,
       c.attempts - c.schedule_from AS schedule_attempt, e.url, e.secret,
       CASE WHEN e.previous_secret_expires_at > clock_timestamp() THEN e.previous_secret END AS previous_secret,
       t.*
FROM claimed AS c
JOIN webhook_endpoints AS e ON e.id = c.endpoint_id
JOIN tasks AS t ON t.id = c.task_id;

-- name: next_webhook_due
-- Seconds until the next delivery of an enabled endpoint falls due (<= 0: due; NULL: none),
-- leaving out the endpoints this process has every slot of in use (their attempts wake it).
SELECT extract(epoch FROM min(d.next_attempt_at) - clock_timestamp())::float8 AS seconds
FROM webhook_endpoints AS e
CROSS JOIN LATERAL (
    SELECT next_attempt_at FROM webhook_deliveries
     WHERE endpoint_id = e.id AND status = 'pending'
     ORDER BY next_attempt_at LIMIT 1
) AS d
WHERE e.status = 'enabled' AND e.id <> ALL (%(saturated)s::bigint[]);

-- name: release_webhook_deliveries
-- Claimed deliveries this process will not attempt after all (their lease would end before an
-- attempt could, or the process is stopping): due again now, the claim not counted as an attempt.
-- Only where the claim is still the latest (its attempt number); a delivery claimed again since is
-- left to its new holder. The senders are woken: another process may take them at once.
SET LOCAL synchronous_commit = off;
WITH released AS (
    UPDATE webhook_deliveries AS d
       SET attempts = d.attempts - 1, next_attempt_at = clock_timestamp()
      FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS r (id, attempt)
     WHERE d.id = r.id AND d.attempts = r.attempt AND d.status = 'pending'
    RETURNING d.id
)
SELECT pg_notify('webhook_delivery', '') FROM (SELECT FROM released LIMIT 1) AS any_released;

-- name: record_webhook_attempts
-- Many attempts' results in one statement. Only the latest claim of a delivery may record (its
-- attempt number); a result that comes after its lease ended and someone claimed it again is
-- dropped. An endpoint's failing_since starts at its first failure and ends with a success; it
-- is disabled by a 410 Gone, or once every attempt has failed for `disable_after` seconds. Its
-- commit need not wait for the disk either: a result lost in a crash means one more attempt.
-- The endpoints' rows are locked first, in id order, as DELETE of an endpoint does before its
-- deliveries go (cascade): taken the other way round, the two could wait on each other. One round
-- trip: the statements are one implicit transaction, which holds those locks to its end.
SET LOCAL synchronous_commit = off;
SELECT id FROM webhook_endpoints WHERE id = ANY(%(endpoint_ids)s::bigint[]) ORDER BY id FOR NO KEY UPDATE;
WITH result AS (
    SELECT *
    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(outcomes)s::text[], %(retry_in)s::float8[],
                %(attempted_at)s::timestamptz[], %(durations)s::float8[], %(http_statuses)s::int[],
                %(errors)s::text[], %(gone)s::bool[])
         AS r (id, attempt, outcome, retry_in, attempted_at, duration_ms, http_status, error, gone)
), recorded AS (
    UPDATE webhook_deliveries AS d
       SET status = CASE r.outcome WHEN 'retry' THEN 'pending' ELSE r.outcome END,
           next_attempt_at = CASE r.outcome WHEN 'retry'
                                 THEN clock_timestamp() + make_interval(secs => r.retry_in)
                                 ELSE d.next_attempt_at END,
           finished_at = CASE r.outcome WHEN 'retry' THEN NULL ELSE clock_timestamp() END
      FROM result AS r
     WHERE d.id = r.id AND d.attempts = r.attempt AND d.status = 'pending'
    RETURNING d.id, d.endpoint_id
), attempt AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, duration_ms, http_status, error)
    SELECT r.id, r.attempt, r.attempted_at, r.duration_ms, r.http_status, r.error
      FROM result AS r JOIN recorded USING (id)
    ON CONFLICT DO NOTHING
    RETURNING delivery_id
), by_endpoint AS (
    SELECT rec.endpoint_id,
           bool_or(r.outcome = 'delivered') AS succeeded,
           bool_or(r.gone) AS gone,
           min(r.attempted_at) FILTER (WHERE r.outcome <> 'delivered') AS first_failure
      FROM recorded AS rec JOIN result AS r USING (id)
     GROUP BY rec.endpoint_id
), endpoint AS (
    UPDATE webhook_endpoints AS e
       SET failing_since = CASE WHEN x.succeeded THEN NULL ELSE coalesce(e.failing_since, x.first_failure) END,
           status = CASE WHEN x.disable IS NOT NULL THEN 'disabled' ELSE e.status END,
           disabled_reason = coalesce(x.disable, e.disabled_reason),
           updated_at = CASE WHEN x.disable IS NOT NULL THEN now() ELSE e.updated_at END
      FROM (SELECT b.*,
                   CASE WHEN b.gone THEN 'gone'
                        WHEN NOT b.succeeded
                             AND coalesce(w.failing_since, b.first_failure)
                                 <= clock_timestamp() - make_interval(secs => %(disable_after)s)
                        THEN 'failing'
                   END AS disable
              FROM by_endpoint AS b JOIN webhook_endpoints AS w ON w.id = b.endpoint_id) AS x
     WHERE e.id = x.endpoint_id AND e.status = 'enabled'
       -- Only rows that change: a healthy endpoint's row is not rewritten for every delivery.
       AND (x.disable IS NOT NULL OR (x.succeeded AND e.failing_since IS NOT NULL)
            OR (NOT x.succeeded AND e.failing_since IS NULL))
    RETURNING e.id, e.status, e.disabled_reason
)
SELECT (SELECT count(*) FROM recorded) AS recorded,
       (SELECT count(*) FROM attempt) AS attempts,
       (SELECT array_agg(id) FROM endpoint WHERE status = 'disabled') AS disabled;

-- name: list_webhook_deliveries
-- An endpoint's deliveries newest first, below a delivery id (keyset paging), optionally of one
-- status, each with its attempts in order.
SELECT d.id, d.endpoint_id, d.task_id, d.event_type, d.status, d.attempts, d.next_attempt_at, d.created_at,
       d.finished_at,
       coalesce((SELECT json_agg(json_build_object(
                            'attempt', a.attempt, 'attempted_at', a.attempted_at, 'duration_ms', a.duration_ms,
                            'http_status', a.http_status, 'error', a.error) ORDER BY a.attempt)
                   FROM webhook_attempts AS a WHERE a.delivery_id = d.id), '[]') AS attempt_log
FROM webhook_deliveries AS d
WHERE d.endpoint_id = %(endpoint_id)s AND d.id < %(before)s
  AND (%(status)s::text IS NULL OR d.status = %(status)s::text)
ORDER BY d.id DESC
LIMIT %(limit)s;

-- name: retry_webhook_delivery
-- A failed delivery, due again now for one more attempt (schedule_from NULL: no schedule, failed
-- again if it fails), numbered after the ones it had.
UPDATE webhook_deliveries
   SET status = 'pending', next_attempt_at = clock_timestamp(), finished_at = NULL, schedule_from = NULL
 WHERE id = %(delivery_id)s AND endpoint_id = %(endpoint_id)s AND status = 'failed'
RETURNING id;

-- name: webhook_delivery_status
SELECT status FROM webhook_deliveries WHERE id = %(delivery_id)s AND endpoint_id = %(endpoint_id)s;

-- name: replay_webhook_events
-- Every task of the endpoint's event types finished since `since` (through the finished batches,
-- migrations 0003 and 0006: kept for EVENT_RETENTION), queued again with its one delivery row and
-- so its original webhook-id. The retry schedule starts again (schedule_from: the attempts made so
-- far), the attempts count on (migration 0016: the log keeps every attempt, numbered in order).
-- Pending deliveries stay as they are.
WITH endpoint AS (
    SELECT id, events FROM webhook_endpoints WHERE id = %(endpoint_id)s
), queued AS (
    INSERT INTO webhook_deliveries AS d (endpoint_id, task_id, event_type)
    SELECT e.id, t.id, 'task.' || t.status
      FROM endpoint AS e
      JOIN task_batches AS b ON b.finished_at >= %(since)s::timestamptz
      JOIN tasks AS t ON t.finish_batch = b.batch_id
     WHERE t.status <> 'pending' AND ('task.' || t.status) = ANY (e.events)
    ON CONFLICT (endpoint_id, task_id) DO UPDATE
       SET status = 'pending', schedule_from = d.attempts, next_attempt_at = clock_timestamp(), finished_at = NULL
     WHERE d.status <> 'pending'
    RETURNING d.id
)
SELECT (SELECT count(*) FROM endpoint) AS found, (SELECT count(*) FROM queued) AS queued;

-- name: purge_old_webhook_deliveries
-- Delivered and failed deliveries past the retention (their attempts go with them), a small
-- batch at a time, oldest first; SKIP LOCKED leaves alone one a retry is touching.
DELETE FROM webhook_deliveries
 WHERE id IN (SELECT id FROM webhook_deliveries
               WHERE status <> 'pending' AND finished_at < now() - make_interval(secs => %(retention)s)
               ORDER BY finished_at
               LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: pending_webhook_deliveries
-- For /metrics: pending deliveries per endpoint, within a short limit.
SET LOCAL statement_timeout = 500;
SELECT endpoint_id, count(*) AS pending FROM webhook_deliveries WHERE status = 'pending' GROUP BY endpoint_id;

-- ============================================================================================
-- API tokens (db/tokens.py; migration 0009)
-- ============================================================================================

-- name: create_api_token
INSERT INTO api_tokens (name, secret_hash, scopes, expires_at)
VALUES (%(name)s, %(secret_hash)s, %(scopes)s::text[],
        CASE WHEN %(expires_in)s::bigint IS NULL THEN NULL
             ELSE now() + make_interval(secs => %(expires_in)s::bigint) END)
RETURNING id, name, scopes, created_at, expires_at, last_used_at, revoked_at;

-- name: list_api_tokens
SELECT id, name, scopes, created_at, expires_at, last_used_at, revoked_at FROM api_tokens ORDER BY id;

-- name: revoke_api_token
-- Revoking twice keeps the first time. The statement trigger tells every process.
UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())
 WHERE id = %(token_id)s
RETURNING id, name, scopes, created_at, expires_at, last_used_at, revoked_at;

-- name: revoke_api_token_by_name
UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())
 WHERE name = %(name)s
RETURNING id, name, scopes, created_at, expires_at, last_used_at, revoked_at;

-- name: usable_api_tokens
-- What every process keeps in memory: the tokens not revoked, with their expiry (checked in memory
-- against the clock, so an expiry needs no notification), and whether any token row exists at all.
SELECT id, name, secret_hash, scopes, expires_at FROM api_tokens
 WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now());

-- name: api_tokens_exist
SELECT EXISTS (SELECT 1 FROM api_tokens) AS present;

-- name: mark_api_tokens_used
-- last_used_at, at most once a minute per token and process (db/tokens.py), each token's own time
-- of use; never moved back.
UPDATE api_tokens AS t SET last_used_at = greatest(t.last_used_at, u.used_at)
  FROM unnest(%(token_ids)s::bigint[], %(used_at)s::timestamptz[]) AS u (id, used_at)
 WHERE t.id = u.id;

-- ============================================================================================
-- Schema and roles (db/migrate.py, db/roles.py). DDL that names an identifier stays in those
-- modules: identifiers cannot be bound parameters.
-- ============================================================================================

-- name: lock_migrations
-- Held until the end of the migration's transaction: a session lock would stay with whichever
-- server connection a transaction pooler (PgBouncer) lent, and could never be released.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: tables_in_reach
-- Where search_path takes each of the service's table names (NULL: nowhere), the schema new tables
-- go to, and the schemas of this database that hold the service's tables, reached or not: a
-- schema_migrations with a tasks table beside it (other programs keep a schema_migrations of their
-- own too: in a schema without tasks it is not the service's) (migrate.py checks them before it migrates).
SELECT t.name, n.nspname AS schema, current_schema() AS creates_in,
       array(SELECT h.nspname::text FROM pg_class AS m JOIN pg_namespace AS h ON h.oid = m.relnamespace
             WHERE m.relname = 'schema_migrations' AND m.relkind IN ('r', 'p')
               AND EXISTS (SELECT FROM pg_class AS o
                           WHERE o.relnamespace = h.oid AND o.relname = 'tasks' AND o.relkind IN ('r', 'p'))
             ORDER BY 1) AS installed_in,
       current_setting('search_path') AS search_path,
       -- 'replica' or 'local' keeps ordinary triggers from firing (the service's are part of every write).
       current_setting('session_replication_role') AS replication_role
FROM unnest(%(names)s::text[]) AS t (name)
LEFT JOIN pg_class AS c ON c.oid = to_regclass(quote_ident(t.name))
LEFT JOIN pg_namespace AS n ON n.oid = c.relnamespace;

-- name: migrations_table_exists
SELECT to_regclass('schema_migrations') IS NOT NULL AS present;

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: database_exists
SELECT 1 FROM pg_database WHERE datname = %(name)s;

-- name: role_exists
SELECT 1 FROM pg_roles WHERE rolname = %(role)s;

-- name: current_database_and_schema
SELECT current_database() AS db, current_schema() AS schema;
