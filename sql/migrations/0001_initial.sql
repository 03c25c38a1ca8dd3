-- Users and their balances. Money is an exact integer and never negative.
CREATE TABLE users (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username    text NOT NULL UNIQUE CHECK (char_length(username) BETWEEN 1 AND 64),
    balance     bigint NOT NULL CHECK (balance >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A task is one requested balance change. It is inserted 'pending' and finished
-- exactly once by a worker, which records the outcome and the balance after it.
CREATE TABLE tasks (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id),
    type          text NOT NULL CHECK (type IN ('replenishment', 'write-off')),
    amount        bigint NOT NULL CHECK (amount > 0),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'cancelled')),
    reason        text CHECK (reason IN ('insufficient_funds', 'balance_overflow')),
    balance_after bigint CHECK (balance_after >= 0),
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    processed_at  timestamptz,
    -- The outcome columns move together: a pending task has none, a finished one has all it needs.
    CONSTRAINT tasks_outcome_consistent CHECK (
        (status = 'pending'   AND reason IS NULL     AND balance_after IS NULL     AND processed_at IS NULL)
     OR (status = 'done'      AND reason IS NULL     AND balance_after IS NOT NULL AND processed_at IS NOT NULL)
     OR (status = 'cancelled' AND reason IS NOT NULL AND balance_after IS NOT NULL AND processed_at IS NOT NULL)
    )
);

-- A user's pending tasks, oldest first: the only access path of the workers and the sweep.
CREATE INDEX tasks_pending_by_user ON tasks (user_id, id) WHERE status = 'pending';
-- A user's task history for GET /api/v1/user/<id>/tasks.
CREATE INDEX tasks_by_user ON tasks (user_id, id);

-- NOTIFY task_created '<user_id>' once per user per statement (not per row): a multi-row
-- INSERT wakes each user once, and NOTIFY's commit-time lock is paid per statement.
CREATE FUNCTION notify_task_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_created', user_id::text)
       FROM (SELECT DISTINCT user_id FROM new_tasks) AS touched;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_created
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION notify_task_created();

-- NOTIFY task_processed '<task json>' for every task that leaves 'pending', whoever finishes it.
CREATE FUNCTION notify_task_processed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_processed', json_build_object(
        'id', NEW.id::text,
        'user_id', NEW.user_id::text,
        'type', NEW.type,
        'amount', NEW.amount,
        'status', NEW.status,
        'reason', NEW.reason,
        'balance_after', NEW.balance_after,
        'created_at', NEW.created_at,
        'processed_at', NEW.processed_at
    )::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_processed
    AFTER UPDATE OF status ON tasks
    FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status <> 'pending')
    EXECUTE FUNCTION notify_task_processed();
