-- The statements every task goes through (its insert, and the apply transaction's lock and read and
-- its writes) as functions, so that each server connection parses and plans them once.
--
-- psycopg2 (under aiopg) speaks the simple query protocol only: a statement sent as text is parsed,
-- analysed and planned on every call, and for these statements that cost about as much as running
-- them. PL/pgSQL keeps each statement's plan for the life of the server connection, which also
-- holds behind PgBouncer in transaction pooling, where SQL-level PREPARE does not.
--
-- A kept plan is made once, from the statistics and table sizes of that moment, and then runs
-- however the tables change (until ANALYZE or DDL invalidates it). So each statement here is
-- written so that every plan PostgreSQL could choose for it is driven by its arrays: each row is
-- found by a lookup with its key (a LATERAL subquery with OFFSET 0, which the planner may not
-- flatten into a join it could turn round) or by its table's primary key with the array of ids, and
-- predicates on pending tasks are written so that no partial index can be read whole. A first try without this (2026-12-06, reverted) kept a plan made
-- when the statistics said one task was pending: it scanned every pending task for each apply once
-- thousands were (README, Performance, "Tried and dropped"). plan_cache_mode = force_generic_plan:
-- left to choose, the plan cache compares each call's custom plan (which knows the arrays' length)
-- with a generic one and keeps planning anew. enable_seqscan = off: a table that is small when a plan
-- is made must not be planned as a sequential scan that it then keeps when the table is large.
--
-- What the statements do is unchanged (sql/queries.sql held them as text until now and now calls
-- these). A function is VOLATILE (the default): each statement in it takes a fresh snapshot in READ
-- COMMITTED, as a statement of its own did.

-- Many requests' tasks in one statement and one commit. Tasks whose user (or recipient) does not
-- exist are left out (their requests get 404, nothing is stored) instead of failing the statement
-- for the others; so are tasks whose reference their user has already used (409: the caller looks
-- the first one up with tasks_by_reference). Ids are drawn in input order and returned with each
-- row's input position, so every request gets its own row back; the statement trigger NOTIFYs each
-- touched user once. A hold's deadline counts from the moment it is stored. Returned with the
-- server process that stored them: its commit sends the NOTIFY, which carries its pid (the client's
-- own idea of the pid is PgBouncer's behind a pooler).
CREATE FUNCTION insert_tasks(
    new_user_ids bigint[], new_types text[], new_amounts bigint[], new_counterparty_ids bigint[],
    new_hold_ids bigint[], new_expiry_seconds bigint[], new_creators text[], new_references text[],
    new_metadata text[]
) RETURNS TABLE (
    ord bigint, id bigint, user_id bigint, type text, amount bigint, status text, reason text,
    balance_after bigint, available_after bigint, counterparty_id bigint, transfer_id bigint, hold_id bigint,
    expires_at timestamptz, created_at timestamptz, processed_at timestamptz, created_by text, reference text,
    metadata jsonb, backend_pid integer
) LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH numbered AS (
        SELECT i.ord, i.user_id, i.type, i.amount, i.counterparty_id, i.hold_id, i.expires_in, i.created_by,
               i.reference, i.metadata::jsonb AS metadata,
               nextval('tasks_id_seq'::regclass) AS id, clock_timestamp() AS created_at
        FROM (
            -- The last six arrays are NULL (no values) when no task of the batch has any.
            SELECT i.*
            FROM unnest(new_user_ids, new_types, new_amounts, new_counterparty_ids, new_hold_ids,
                        new_expiry_seconds, new_creators, new_references, new_metadata)
                 WITH ORDINALITY AS i (user_id, type, amount, counterparty_id, hold_id, expires_in, created_by,
                                       reference, metadata, ord)
            CROSS JOIN LATERAL (SELECT 1 FROM users AS u WHERE u.id = i.user_id OFFSET 0) AS known_user
            LEFT JOIN LATERAL (SELECT u.id FROM users AS u WHERE u.id = i.counterparty_id OFFSET 0) AS recipient
                ON true
            WHERE i.counterparty_id IS NULL OR recipient.id IS NOT NULL
            ORDER BY i.ord
        ) AS i
    ), inserted AS (
        INSERT INTO tasks AS t (id, user_id, type, amount, counterparty_id, hold_id, expires_at, created_at,
                                created_by, reference, metadata)
        OVERRIDING SYSTEM VALUE
        SELECT n.id, n.user_id, n.type, n.amount, n.counterparty_id, n.hold_id,
               n.created_at + make_interval(secs => n.expires_in), n.created_at, n.created_by, n.reference,
               n.metadata
        FROM numbered AS n ORDER BY n.id
        ON CONFLICT (user_id, reference) WHERE reference IS NOT NULL DO NOTHING
        RETURNING t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.available_after,
                  t.counterparty_id, t.transfer_id, t.hold_id, t.expires_at, t.created_at, t.processed_at,
                  t.created_by, t.reference, t.metadata
    )
    SELECT n.ord, t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.available_after,
           t.counterparty_id, t.transfer_id, t.hold_id, t.expires_at, t.created_at, t.processed_at,
           t.created_by, t.reference, t.metadata, pg_backend_pid()
    FROM inserted AS t JOIN numbered AS n USING (id)
    ORDER BY n.ord;
END;
$$;

-- Several users' batches in one transaction: lock, then read.
--
-- The first statement locks the rows of the users and of the recipients of their pending transfers
-- (a partial index holds only pending transfers: free when there are none), all in id order, so
-- that two transactions can never wait on each other (two transfers in opposite directions
-- included). The lock serialises every worker (in any process) on a user until commit, and NO KEY
-- UPDATE does not conflict with the KEY SHARE lock that concurrent task inserts take through the
-- foreign keys. Each row is locked by its own lookup, in the order of the sorted ids.
--
-- The second takes a new snapshot once the locks are granted, so it sees every batch another worker
-- committed before: each user's account with its oldest pending tasks (a NULL id if none).
-- Recipients (lock_recipients) and holds (holds_of) are read after it, only for batches that have
-- transfers or name holds: each adds a join this common case does without.
CREATE FUNCTION lock_and_read_pending(locked_user_ids bigint[], batch_size integer)
RETURNS TABLE (
    user_id bigint, balance bigint, held bigint, id bigint, type text, amount bigint, counterparty_id bigint,
    hold_id bigint, created_at timestamptz, expires_at timestamptz
) LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1
    FROM (SELECT DISTINCT l.id
          FROM unnest(locked_user_ids
                      || ARRAY(SELECT p.counterparty_id
                               FROM unnest(locked_user_ids) AS s (id)
                               CROSS JOIN LATERAL (
                                   SELECT counterparty_id FROM tasks
                                   WHERE user_id = s.id AND status = 'pending' AND type = 'transfer'
                                   OFFSET 0
                               ) AS p)) AS l (id)
          ORDER BY l.id
          OFFSET 0) AS l
    CROSS JOIN LATERAL (SELECT 1 FROM users AS u WHERE u.id = l.id FOR NO KEY UPDATE OFFSET 0) AS locked
    ORDER BY l.id;
    RETURN QUERY
    SELECT u.id, u.balance, u.held, t.id, t.type, t.amount, t.counterparty_id, t.hold_id, t.created_at,
           t.expires_at
    FROM unnest(locked_user_ids) AS l (id)
    CROSS JOIN LATERAL (SELECT u.id, u.balance, u.held FROM users AS u WHERE u.id = l.id OFFSET 0) AS u
    LEFT JOIN LATERAL (
        SELECT p.id, p.type, p.amount, p.counterparty_id, p.hold_id, p.created_at, p.expires_at FROM tasks AS p
        WHERE p.user_id = u.id AND p.status = 'pending'
        ORDER BY p.id
        LIMIT batch_size
    ) AS t ON true
    ORDER BY u.id, t.id;
END;
$$;

-- Writes one transaction's outcomes and the accounts' new balances. It is sent with the COMMIT (and
-- record_batch_effects, applied_tasks) in one message, so it checks its own work: if fewer rows
-- than it was given were still pending (anything but this worker touched them) or belonged to
-- another user, apply_lost_race (migration 0011) raises, which aborts the transaction before its
-- COMMIT.
--
-- Each table is read through its primary key with the array of ids (id = ANY): every plan reads
-- those rows and no others. The other conditions are kept out of the planner's way: "still
-- pending" is written processed_at IS NULL (the same thing: tasks_outcome_consistent), which no
-- partial index matches, and the user is checked on the rows written, not joined on (a join on
-- user_id would let a plan walk a whole index in user order, which it keeps once the table that
-- was small when it was planned is large). The joins with the arrays are hash joins: a generic plan
-- does not know how long the arrays are, and a nested loop over two of a transfer drain's 1,000
-- accounts each way is a million comparisons.
CREATE FUNCTION finish_batches(
    task_ids bigint[], task_users bigint[], statuses text[], reasons text[], balances_after bigint[],
    availables_after bigint[], account_ids bigint[], balances bigint[], helds bigint[]
) RETURNS void LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_nestloop = off AS $$
DECLARE
    -- One instant for the whole transaction, read now that its locks are granted: the next
    -- transaction on these users reads its own only after this one commits (migration 0008).
    instant timestamptz := clock_timestamp();
    finished bigint;
    written bigint;
BEGIN
    WITH finished AS (
        UPDATE tasks AS t
           SET status = o.status, reason = o.reason, balance_after = o.balance_after,
               available_after = o.available_after, processed_at = instant,
               -- This transaction is the batch; migration 0003 numbers it at COMMIT.
               finish_batch = pg_current_xact_id()::text::bigint
          FROM unnest(task_ids, task_users, statuses, reasons, balances_after, availables_after)
               AS o (id, user_id, status, reason, balance_after, available_after)
         WHERE t.id = ANY(task_ids) AND t.id = o.id AND t.processed_at IS NULL
        RETURNING t.user_id = o.user_id AS own
    )
    SELECT count(*) FILTER (WHERE own) INTO finished FROM finished;
    UPDATE users AS u
       SET balance = a.balance, held = a.held, updated_at = now()
      FROM unnest(account_ids, balances, helds) AS a (id, balance, held)
     WHERE u.id = ANY(account_ids) AND u.id = a.id;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF finished <> cardinality(task_ids) OR written <> cardinality(account_ids) THEN
        PERFORM apply_lost_race(format('finished %s of %s tasks, wrote %s of %s accounts',
                                       finished, cardinality(task_ids), written, cardinality(account_ids)));
    END IF;
END;
$$;
