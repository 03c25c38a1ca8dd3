-- Statements, balances at a point in time, the client's own references, and the audit (issue 18).

-- ---------------------------------------------------------------------------------------------
-- The opening balance is history too: every user's balance and held are its opening ones (at
-- created_at) plus what its done tasks did, so a balance at any time is answerable, and the
-- audit can prove the stored balances from the history.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE users
    ADD COLUMN opening_balance bigint,
    ADD COLUMN opening_held bigint NOT NULL DEFAULT 0;

-- Existing users: their balance and held minus what their done tasks did. (A capture, void or
-- release frees its whole hold, the hold task's amount; a capture also charges its own amount.)
UPDATE users SET opening_balance = balance, opening_held = held;
UPDATE users AS u
   SET opening_balance = u.balance - e.balance_change, opening_held = u.held - e.held_change
  FROM (SELECT t.user_id,
               sum(CASE WHEN t.type IN ('replenishment', 'transfer-in') THEN t.amount
                        WHEN t.type IN ('write-off', 'transfer', 'capture') THEN -t.amount
                        ELSE 0 END)::bigint AS balance_change,
               sum(CASE WHEN t.type = 'hold' THEN t.amount
                        WHEN t.type IN ('capture', 'void', 'release') THEN -h.amount
                        ELSE 0 END)::bigint AS held_change
          FROM tasks AS t LEFT JOIN tasks AS h ON h.id = t.hold_id
         WHERE t.status = 'done'
         GROUP BY t.user_id) AS e
 WHERE u.id = e.user_id;

ALTER TABLE users ALTER COLUMN opening_balance SET NOT NULL;

-- A new user opens with what it is created with, whoever inserts it (the API or psql).
CREATE FUNCTION set_opening_balance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.opening_balance := NEW.balance;
    NEW.opening_held := NEW.held;
    RETURN NEW;
END
$$;

CREATE TRIGGER users_set_opening_balance
    BEFORE INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION set_opening_balance();

-- ---------------------------------------------------------------------------------------------
-- One order, one clock. The apply transaction now stamps all its tasks (transfer-ins included)
-- with one instant read after its locks are granted: the next transaction on the same user
-- waits for those locks, so its instant comes after this one's commit. A user's finished tasks
-- ordered by (processed_at, id) are thus in the order they were applied, and a point in time
-- cuts a history in one place. Tasks finished before: one instant per batch (its earliest) as
-- well, which keeps that order.
-- ---------------------------------------------------------------------------------------------
UPDATE tasks AS t
   SET processed_at = b.first
  FROM (SELECT finish_batch, min(processed_at) AS first
          FROM tasks
         WHERE finish_batch IS NOT NULL
         GROUP BY finish_batch
        HAVING min(processed_at) <> max(processed_at)) AS b
 WHERE t.finish_batch = b.finish_batch AND t.processed_at <> b.first;

-- A user's history in applied order: balance?at is one backward probe, a statement a range.
CREATE INDEX tasks_history ON tasks (user_id, processed_at, id) WHERE status <> 'pending';

-- ---------------------------------------------------------------------------------------------
-- The client's own reference (unique per user) and metadata on every task.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE tasks
    ADD COLUMN reference text,
    ADD COLUMN metadata jsonb;

CREATE UNIQUE INDEX tasks_reference_per_user ON tasks (user_id, reference) WHERE reference IS NOT NULL;

-- The task_processed payload carries them too (event streams show the whole task). Metadata is
-- at most 4 KiB encoded (the API's limit), so the payload stays well below NOTIFY's 8000 bytes.
CREATE OR REPLACE FUNCTION notify_task_processed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_processed', json_build_object(
        'id', NEW.id::text,
        'user_id', NEW.user_id::text,
        'type', NEW.type,
        'amount', NEW.amount,
        'status', NEW.status,
        'reason', NEW.reason,
        'balance_after', NEW.balance_after,
        'available_after', NEW.available_after,
        'counterparty_id', NEW.counterparty_id::text,
        'transfer_id', NEW.transfer_id::text,
        'hold_id', NEW.hold_id::text,
        'expires_at', NEW.expires_at,
        'created_at', NEW.created_at,
        'processed_at', NEW.processed_at,
        'finish_batch', NEW.finish_batch,
        'reference', NEW.reference,
        'metadata', NEW.metadata
    )::text);
    RETURN NULL;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- A transfer has at most one transfer-in, enforced, and found by the audit
-- (message-broker verify) with one probe per transfer.
-- ---------------------------------------------------------------------------------------------
CREATE UNIQUE INDEX tasks_one_transfer_in ON tasks (transfer_id) WHERE type = 'transfer-in';
