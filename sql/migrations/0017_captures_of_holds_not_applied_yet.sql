-- A capture or void stored before its hold's deadline comes before the release, also when the hold
-- itself was not applied yet (migration 0015 covered only a hold already applied).
--
-- 0015 locked the named holds' rows (FOR SHARE) before stamping created_at, and the release skips
-- a locked one. A hold not applied yet has no holds row: nothing was locked, and if the insert's
-- commit came late (a post with an Idempotency-Key on a slow connection; an insert waiting on
-- another's reference), the hold could be applied, fall due and be released first, and the capture
-- stamped in time was cancelled hold_not_active: its charge lost. Found from outside.
--
-- The lock is now one that exists from the hold's post: a transaction-level advisory lock keyed by
-- the hold's id (hold_release_lock), taken shared, in id order, before created_at is stamped.
-- release_expired_holds tries it exclusively (pg_try_advisory_xact_lock, never waiting) and leaves a
-- hold it cannot get alone: a hold one is being stored for waits until that commit, so the release
-- comes after it in the user's queue; the release first, the insert waits for its commit and is
-- stamped after the deadline: late, as it says. No worker takes it, so no apply ever waits for an
-- insert (0015's holds-row lock could deadlock with an apply resolving two holds). Not a row lock:
-- a row lock on the hold's task row, which the hold's apply is often updating at that moment, cost
-- a fifth of the hold-then-capture rate (multixacts); an advisory lock is a lock-table entry only.
CREATE FUNCTION hold_release_lock(hold_id bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- The key space of these locks: "mb" in the top bits, the hold's id below (ids stay below
    -- 2^48); the service's other advisory keys (0003, migrate.py) are below 2^47.
    SELECT 7881862297851789312 + hold_id
$$;

CREATE OR REPLACE FUNCTION insert_tasks(
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
    IF new_types && '{capture,void}'::text[] THEN
        PERFORM pg_advisory_xact_lock_shared(hold_release_lock(named.hold_id))
        FROM (SELECT DISTINCT i.hold_id
              FROM unnest(new_types, new_hold_ids) AS i (type, hold_id)
              WHERE i.type IN ('capture', 'void') AND i.hold_id IS NOT NULL
              ORDER BY i.hold_id OFFSET 0) AS named
        ORDER BY named.hold_id;
    END IF;
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
