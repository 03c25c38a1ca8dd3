-- The apply in one round trip (issue 22): a process that remembers some users' accounts as its own
-- last apply left them, and knows their pending tasks because it stored them itself, runs the
-- ledger's rules on what it remembers and sends the writes at once, with BEGIN and COMMIT in the
-- same message. This function locks the users and writes only if the database holds exactly what
-- the rules ran on; otherwise it writes nothing, and the caller applies as usual (lock, read,
-- rules, write) in a transaction of its own.
--
-- "Exactly what the rules ran on": each user's balance and held, and the user's pending tasks with
-- an id up to the greatest remembered one are the remembered ones, with the same type and amount,
-- and plain balance changes (no recipient, no hold). Pending tasks with greater ids stay for a later
-- batch, as a batch of fewer tasks would leave them. The rules of a replenishment or write-off
-- read nothing else, so the outcomes are those the usual apply would compute, whoever changed what
-- in between.
--
-- The users are locked in id order, each by its own lookup, as lock_and_read_pending does (these
-- batches have no transfers: no recipient to lock); the checks run after the locks are granted,
-- each statement with a fresh snapshot (VOLATILE, READ COMMITTED), so they see every batch
-- committed before. The answer goes to a session setting as well as being returned: the COMMIT and
-- the read-back after it travel in the same message, and psycopg2 hands back only the last
-- statement's rows (applied_as_remembered, below, reads it). The setting is written before it is
-- read in every such message, so nothing depends on what a session held before (PgBouncer).
CREATE FUNCTION finish_as_remembered(
    user_ids bigint[], remembered_balances bigint[], remembered_helds bigint[],
    remembered_ids bigint[], remembered_users bigint[], remembered_types text[], remembered_amounts bigint[],
    task_ids bigint[], task_users bigint[], statuses text[], reasons text[], balances_after bigint[],
    availables_after bigint[], account_ids bigint[], balances bigint[], helds bigint[]
) RETURNS boolean LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    unchanged boolean;
BEGIN
    PERFORM 1
    FROM (SELECT DISTINCT l.id FROM unnest(user_ids) AS l (id) ORDER BY l.id OFFSET 0) AS l
    CROSS JOIN LATERAL (SELECT 1 FROM users AS u WHERE u.id = l.id FOR NO KEY UPDATE OFFSET 0) AS locked
    ORDER BY l.id;
    SELECT
        -- Every account as remembered.
        (SELECT count(*)
         FROM unnest(user_ids, remembered_balances, remembered_helds) AS r (id, balance, held)
         CROSS JOIN LATERAL (SELECT 1 FROM users AS u
                             WHERE u.id = r.id AND u.balance = r.balance AND u.held = r.held OFFSET 0) AS same)
            = cardinality(user_ids)
        -- Every remembered task still pending, as remembered.
        AND (SELECT count(*)
             FROM unnest(remembered_ids, remembered_users, remembered_types, remembered_amounts)
                  AS r (id, user_id, type, amount)
             CROSS JOIN LATERAL (SELECT 1 FROM tasks AS t
                                 WHERE t.id = r.id AND t.user_id = r.user_id AND t.status = 'pending'
                                   AND t.type = r.type AND t.amount = r.amount
                                   AND t.counterparty_id IS NULL AND t.hold_id IS NULL OFFSET 0) AS same)
            = cardinality(remembered_ids)
        -- And no other pending task of these users comes before the last remembered one.
        AND (SELECT count(*)
             FROM (SELECT r.user_id, max(r.id) AS last
                   FROM unnest(remembered_users, remembered_ids) AS r (user_id, id)
                   GROUP BY r.user_id) AS r
             CROSS JOIN LATERAL (SELECT 1 FROM tasks AS p
                                 WHERE p.user_id = r.user_id AND p.status = 'pending' AND p.id <= r.last
                                 OFFSET 0) AS earlier)
            = cardinality(remembered_ids)
    INTO unchanged;
    PERFORM set_config('message_broker.applied_as_remembered', unchanged::text, false);
    IF unchanged THEN
        PERFORM finish_batches(task_ids, task_users, statuses, reasons, balances_after, availables_after,
                               account_ids, balances, helds);
    END IF;
    RETURN unchanged;
END;
$$;

-- The read-back after finish_as_remembered's COMMIT, in the same message: whether it wrote, and
-- the users with a task still pending (one the process did not know of: their loops look again,
-- as the usual apply would have read it), on every row (one row with no task if it did not write);
-- if it wrote, the finished tasks to read back (the process's waiting requests, and the first
-- one's processed_at: the transaction's instant). A function, as the statements of 0012, so that
-- it is planned once per connection: as text it cost a quarter of a millisecond more.
CREATE FUNCTION applied_as_remembered(locked_user_ids bigint[], read_ids bigint[])
RETURNS TABLE (
    applied boolean, more_pending bigint[], id bigint, user_id bigint, type text, amount bigint, status text,
    reason text, balance_after bigint, available_after bigint, counterparty_id bigint, transfer_id bigint,
    hold_id bigint, expires_at timestamptz, created_at timestamptz, processed_at timestamptz, created_by text,
    reference text, metadata jsonb
) LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    wrote boolean := coalesce(current_setting('message_broker.applied_as_remembered', true), '') = 'true';
    more bigint[];
BEGIN
    more := ARRAY(SELECT l.id FROM unnest(locked_user_ids) AS l (id)
                  WHERE EXISTS (SELECT 1 FROM tasks AS p WHERE p.user_id = l.id AND p.status = 'pending' OFFSET 0));
    RETURN QUERY
    SELECT wrote, more, t.id, t.user_id, t.type, t.amount, t.status, t.reason, t.balance_after, t.available_after,
           t.counterparty_id, t.transfer_id, t.hold_id, t.expires_at, t.created_at, t.processed_at, t.created_by,
           t.reference, t.metadata
    FROM (SELECT 1) AS one
    LEFT JOIN tasks AS t ON wrote AND t.id = ANY(read_ids);
END;
$$;
