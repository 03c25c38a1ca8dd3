-- The three statements every task goes through (its insert, and the apply transaction's read and
-- writes) as functions, so that each server connection parses and plans them once.
--
-- psycopg2 (under aiopg) speaks the simple query protocol only: a statement sent as text is parsed,
-- analysed and planned again on every call, and for these large statements that cost more than
-- running them (the insert: 1.1 ms a call as text, 0.5 ms as a function, on PostgreSQL 15 here).
-- PL/pgSQL keeps each statement's plan for the life of the server connection, which also holds
-- behind PgBouncer in transaction pooling, where SQL-level PREPARE does not (the next transaction
-- may run on another server connection).
--
-- A generic plan is forced: left to choose, the plan cache kept planning anew for these array
-- parameters. A generic plan knows nothing of an array's length (it assumes ten elements), and on a
-- small users table it would read every user to hash-join them against the array; with sequential
-- scans off it looks each element up in the primary key instead, which is right for any batch and
-- any number of users (an earlier try of PREPARE without this lost a third of the enqueue rate to
-- such plans: README, Performance).
--
-- The statements are those that sql/queries.sql held until now, unchanged in what they do;
-- queries.sql calls them by name. A function is VOLATILE (the default), so each statement in it
-- takes a fresh snapshot in READ COMMITTED, as a statement of its own did.

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
               nextval(pg_get_serial_sequence('tasks', 'id')) AS id, clock_timestamp() AS created_at
        FROM (
            -- The last six arrays are NULL (no values) when no task of the batch has any.
            SELECT i.*
            FROM unnest(new_user_ids, new_types, new_amounts, new_counterparty_ids, new_hold_ids,
                        new_expiry_seconds, new_creators, new_references, new_metadata)
                 WITH ORDINALITY AS i (user_id, type, amount, counterparty_id, hold_id, expires_in, created_by,
                                       reference, metadata, ord)
            -- The recipient as a join, not an EXISTS under the OR: that becomes a hashed subplan,
            -- which reads every user to build its hash.
            LEFT JOIN users AS recipient ON recipient.id = i.counterparty_id
            WHERE EXISTS (SELECT 1 FROM users AS u WHERE u.id = i.user_id)
              AND (i.counterparty_id IS NULL OR recipient.id IS NOT NULL)
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
-- foreign keys.
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
    PERFORM 1 FROM users
    WHERE id = ANY(locked_user_ids
                   || ARRAY(SELECT counterparty_id FROM tasks
                            WHERE user_id = ANY(locked_user_ids) AND status = 'pending' AND type = 'transfer'))
    ORDER BY id
    FOR NO KEY UPDATE;
    RETURN QUERY
    SELECT u.id, u.balance, u.held, t.id, t.type, t.amount, t.counterparty_id, t.hold_id, t.created_at,
           t.expires_at
    FROM users AS u
    LEFT JOIN LATERAL (
        SELECT p.id, p.type, p.amount, p.counterparty_id, p.hold_id, p.created_at, p.expires_at FROM tasks AS p
        WHERE p.user_id = u.id AND p.status = 'pending'
        ORDER BY p.id
        LIMIT batch_size
    ) AS t ON true
    WHERE u.id = ANY(locked_user_ids)
    ORDER BY u.id, t.id;
END;
$$;

-- Writes one transaction's outcomes and the accounts' new balances. It is sent with the COMMIT (and
-- record_batch_effects, applied_tasks) in one message, so it checks its own work: if fewer rows
-- than it was given were still pending (anything but this worker touched them), apply_lost_race
-- (migration 0011) raises, which aborts the transaction before its COMMIT.
CREATE FUNCTION finish_batches(
    task_ids bigint[], task_users bigint[], statuses text[], reasons text[], balances_after bigint[],
    availables_after bigint[], account_ids bigint[], balances bigint[], helds bigint[]
) RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    -- One instant for the whole transaction, read now that its locks are granted: the next
    -- transaction on these users reads its own only after this one commits (migration 0008).
    instant timestamptz := clock_timestamp();
    finished bigint;
    written bigint;
BEGIN
    UPDATE tasks AS t
       SET status = o.status, reason = o.reason, balance_after = o.balance_after,
           available_after = o.available_after, processed_at = instant,
           -- This transaction is the batch; migration 0003 numbers it at COMMIT.
           finish_batch = pg_current_xact_id()::text::bigint
      FROM unnest(task_ids, task_users, statuses, reasons, balances_after, availables_after)
           AS o (id, user_id, status, reason, balance_after, available_after)
     WHERE t.id = o.id AND t.user_id = o.user_id AND t.status = 'pending';
    GET DIAGNOSTICS finished = ROW_COUNT;
    UPDATE users AS u
       SET balance = a.balance, held = a.held, updated_at = now()
      FROM unnest(account_ids, balances, helds) AS a (id, balance, held)
     WHERE u.id = a.id;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF finished <> cardinality(task_ids) OR written <> cardinality(account_ids) THEN
        PERFORM apply_lost_race(format('finished %s of %s tasks, wrote %s of %s accounts',
                                       finished, cardinality(task_ids), written, cardinality(account_ids)));
    END IF;
END;
$$;
