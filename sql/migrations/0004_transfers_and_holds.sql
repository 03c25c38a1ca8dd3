-- Transfers between users and holds (two-phase: reserve now, capture or void later, released at
-- a deadline). Every one of them is a task in its user's queue, applied in order like the others.

-- held: the sum of the user's active holds. available = balance - held is what write-offs,
-- transfers and new holds may take, so it never goes negative either.
ALTER TABLE users ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE users ADD CONSTRAINT users_held_within_balance CHECK (held >= 0 AND held <= balance);

ALTER TABLE tasks DROP CONSTRAINT tasks_type_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_type_check CHECK (
    type IN ('replenishment', 'write-off', 'transfer', 'transfer-in', 'hold', 'capture', 'void', 'release')
);
ALTER TABLE tasks DROP CONSTRAINT tasks_reason_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_reason_check CHECK (
    reason IN ('insufficient_funds', 'balance_overflow', 'hold_not_active', 'amount_exceeds_hold')
);

ALTER TABLE tasks
    -- The available balance right after the task (balance_after - held), for every finished task.
    ADD COLUMN available_after bigint CHECK (available_after >= 0),
    -- A transfer's recipient; a transfer-in's sender.
    ADD COLUMN counterparty_id bigint REFERENCES users (id),
    -- A transfer-in's transfer (the sender's task).
    ADD COLUMN transfer_id bigint REFERENCES tasks (id),
    -- The hold (its hold task) a capture, void or release resolves.
    ADD COLUMN hold_id bigint REFERENCES tasks (id),
    -- A hold's deadline.
    ADD COLUMN expires_at timestamptz;

-- Before holds, available was the balance.
UPDATE tasks SET available_after = balance_after WHERE balance_after IS NOT NULL;

ALTER TABLE tasks DROP CONSTRAINT tasks_outcome_consistent;
ALTER TABLE tasks ADD CONSTRAINT tasks_outcome_consistent CHECK (
    (status = 'pending'   AND reason IS NULL     AND balance_after IS NULL     AND available_after IS NULL
                          AND processed_at IS NULL)
 OR (status = 'done'      AND reason IS NULL     AND balance_after IS NOT NULL AND available_after IS NOT NULL
                          AND processed_at IS NOT NULL)
 OR (status = 'cancelled' AND reason IS NOT NULL AND balance_after IS NOT NULL AND available_after IS NOT NULL
                          AND processed_at IS NOT NULL)
);
ALTER TABLE tasks ADD CONSTRAINT tasks_available_within_balance CHECK (available_after <= balance_after);

-- Which columns each kind of task carries.
ALTER TABLE tasks ADD CONSTRAINT tasks_shape_of_type CHECK (
    CASE type
        WHEN 'transfer' THEN counterparty_id IS NOT NULL AND counterparty_id <> user_id
                             AND transfer_id IS NULL AND hold_id IS NULL AND expires_at IS NULL
        WHEN 'transfer-in' THEN counterparty_id IS NOT NULL AND transfer_id IS NOT NULL
                             AND hold_id IS NULL AND expires_at IS NULL AND status = 'done'
        WHEN 'hold' THEN expires_at IS NOT NULL
                             AND counterparty_id IS NULL AND transfer_id IS NULL AND hold_id IS NULL
        WHEN 'capture' THEN hold_id IS NOT NULL
                             AND counterparty_id IS NULL AND transfer_id IS NULL AND expires_at IS NULL
        WHEN 'void' THEN hold_id IS NOT NULL
                             AND counterparty_id IS NULL AND transfer_id IS NULL AND expires_at IS NULL
        WHEN 'release' THEN hold_id IS NOT NULL
                             AND counterparty_id IS NULL AND transfer_id IS NULL AND expires_at IS NULL
        ELSE counterparty_id IS NULL AND transfer_id IS NULL AND hold_id IS NULL AND expires_at IS NULL
    END
);

-- The recipients of a user's next transfers, locked before the transfers are applied.
CREATE INDEX tasks_pending_transfers ON tasks (user_id, id) WHERE status = 'pending' AND type = 'transfer';
-- A user's holds (GET /api/v1/user/<id>/holds), and a hold's capture, void or release.
CREATE INDEX tasks_holds_by_user ON tasks (user_id, id) WHERE type = 'hold';
CREATE INDEX tasks_by_hold ON tasks (hold_id) WHERE hold_id IS NOT NULL;
-- At most one release per hold, whichever process notices the deadline first.
CREATE UNIQUE INDEX tasks_one_release_per_hold ON tasks (hold_id) WHERE type = 'release';

-- A hold once its hold task is applied (done). Before that, and if it was cancelled, the hold
-- task alone says where it stands.
CREATE TABLE holds (
    id              bigint PRIMARY KEY REFERENCES tasks (id),
    user_id         bigint NOT NULL REFERENCES users (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    expires_at      timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'captured', 'voided', 'expired')),
    captured_amount bigint CHECK (captured_amount > 0 AND captured_amount <= amount),
    resolved_by     bigint REFERENCES tasks (id),
    -- The release task queued for it once its deadline passed (applied in the user's queue later).
    release_id      bigint REFERENCES tasks (id),
    CONSTRAINT holds_resolution_consistent CHECK (
        (status = 'active') = (resolved_by IS NULL) AND (status = 'captured') = (captured_amount IS NOT NULL)
    )
);
-- The holds whose deadline is still to be acted on, by deadline: the next one is one index probe,
-- and the due ones a range, however many holds there are.
CREATE INDEX holds_awaiting_deadline ON holds (expires_at) WHERE status = 'active' AND release_id IS NULL;

-- NOTIFY hold_deadline '<epoch seconds>' for new active holds, once per statement with the
-- earliest: a wake-up for the processes' deadline timers (the database keeps the truth).
CREATE FUNCTION notify_hold_deadline() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    earliest timestamptz;
BEGIN
    SELECT min(expires_at) INTO earliest FROM new_holds WHERE status = 'active';
    IF earliest IS NOT NULL THEN
        PERFORM pg_notify('hold_deadline', extract(epoch FROM earliest)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER holds_notify_deadline
    AFTER INSERT ON holds
    REFERENCING NEW TABLE AS new_holds
    FOR EACH STATEMENT EXECUTE FUNCTION notify_hold_deadline();

-- Tasks are now also inserted already finished: a transfer writes the recipient's entry done, in
-- the same transaction. task_created wakes workers for pending tasks only, and a finished insert
-- joins its transaction's batch (0003) like a finished update.
CREATE OR REPLACE FUNCTION notify_task_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_created', user_id::text)
       FROM (SELECT DISTINCT user_id FROM new_tasks WHERE status = 'pending') AS touched;
    IF EXISTS (SELECT 1 FROM new_tasks WHERE status <> 'pending') THEN
        INSERT INTO task_batches (batch_id) VALUES (pg_current_xact_id()::text::bigint)
        ON CONFLICT (batch_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

-- A task finished some other way than by the workers (by hand in psql) joins its transaction's batch
-- as before, and, if it does not say, gets the available balance its user has (balance - held).
CREATE OR REPLACE FUNCTION mark_finished_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.finish_batch := pg_current_xact_id()::text::bigint;
    IF NEW.available_after IS NULL AND NEW.balance_after IS NOT NULL THEN
        NEW.available_after := NEW.balance_after - (SELECT held FROM users WHERE id = NEW.user_id);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_mark_finished_on_insert
    BEFORE INSERT ON tasks
    FOR EACH ROW
    WHEN (NEW.status <> 'pending' AND NEW.finish_batch IS NULL)
    EXECUTE FUNCTION mark_finished_task();

CREATE TRIGGER tasks_notify_processed_on_insert
    AFTER INSERT ON tasks
    FOR EACH ROW
    WHEN (NEW.status <> 'pending')
    EXECUTE FUNCTION notify_task_processed();

-- The task_processed payload carries the new columns too.
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
        'finish_batch', NEW.finish_batch
    )::text);
    RETURN NULL;
END
$$;
