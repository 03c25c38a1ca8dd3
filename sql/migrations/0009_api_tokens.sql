-- Named API tokens with scopes, and who posted each task.

-- A client's credentials. Only the SHA-256 of the secret is kept: the secret is 32 random bytes,
-- so a fast hash is enough (nobody can search 2^256 secrets), and it is shown once, when created.
-- Rows are never deleted: a revoked token keeps its name, so that the tasks it posted still say
-- who posted them and the name is not given to another client later.
CREATE TABLE api_tokens (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (char_length(name) BETWEEN 1 AND 64),
    secret_hash  bytea NOT NULL UNIQUE CHECK (octet_length(secret_hash) = 32),
    scopes       text[] NOT NULL CHECK (cardinality(scopes) >= 1 AND scopes <@ ARRAY['read', 'write', 'admin']),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz
);

-- NOTIFY api_tokens_changed once per statement that changes what a token may do (created,
-- revoked, expiry or scopes changed, by the service or by hand in psql): every process reloads
-- its in-memory table. last_used_at is not in the list: writing it wakes nobody.
CREATE FUNCTION notify_api_tokens_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('api_tokens_changed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER api_tokens_notify_changed
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF name, secret_hash, scopes, expires_at, revoked_at
    ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION notify_api_tokens_changed();

-- The name of the token that posted the task (kept when the token is revoked: names are never
-- reused); NULL without authentication; 'service' for what the service makes itself (hold
-- releases). A transfer-in carries its transfer's: the client that moved the money.
ALTER TABLE tasks ADD COLUMN created_by text CHECK (char_length(created_by) BETWEEN 1 AND 64);

-- No index for GET /api/v1/user/<id>/tasks?created_by=<name>: it walks the user's tasks in id
-- order (tasks_by_user) and filters, where one more index would cost every task insert.

-- The task_processed payload: the whole row, so that columns added to tasks (here created_by)
-- reach the waiters and event streams without another edit of this function. Ids stay text, as
-- before.
CREATE OR REPLACE FUNCTION notify_task_processed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_processed', (
        to_jsonb(NEW) || jsonb_build_object(
            'id', NEW.id::text,
            'user_id', NEW.user_id::text,
            'counterparty_id', NEW.counterparty_id::text,
            'transfer_id', NEW.transfer_id::text,
            'hold_id', NEW.hold_id::text
        )
    )::text);
    RETURN NULL;
END
$$;
