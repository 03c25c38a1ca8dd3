-- Webhooks (Standard Webhooks 1.0): endpoints that want every finished task pushed to them, and
-- an outbox of deliveries written by the very transaction that finishes the tasks.

CREATE TABLE webhook_endpoints (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url                    text NOT NULL CHECK (char_length(url) BETWEEN 1 AND 2048),
    -- The event types it is subscribed to ('task.done', 'task.cancelled').
    events                 text[] NOT NULL
                           CHECK (cardinality(events) >= 1 AND events <@ ARRAY['task.done', 'task.cancelled']),
    description            text NOT NULL DEFAULT '' CHECK (char_length(description) <= 1000),
    status                 text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    -- Why it is disabled: by a client (PATCH), a 410 Gone, or failing for WEBHOOK_DISABLE_AFTER.
    disabled_reason        text CHECK (disabled_reason IN ('manual', 'gone', 'failing')),
    -- The signing key (the bytes behind "whsec_<base64>"). HMAC needs the key itself: it cannot
    -- be stored as a hash.
    secret                 bytea NOT NULL CHECK (octet_length(secret) BETWEEN 24 AND 64),
    -- After a rotation the old key signs too, until previous_secret_expires_at.
    previous_secret        bytea,
    previous_secret_expires_at timestamptz,
    -- Since when every attempt has failed (NULL: the last one succeeded, or none failed yet).
    failing_since          timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_disabled_reason CHECK ((status = 'disabled') = (disabled_reason IS NOT NULL))
);

-- One delivery per finished task and endpoint (webhook-id "msg_<task>_<endpoint>", the same on
-- every attempt and replay). Pending ones fall due at next_attempt_at; a claimed one's
-- next_attempt_at is its lease: if its process dies, it is due again when the lease ends.
CREATE TABLE webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    -- No foreign key to tasks: tasks are never deleted, and the check would cost a lookup per row
    -- inside the apply transaction.
    task_id         bigint NOT NULL,
    event_type      text NOT NULL CHECK (event_type IN ('task.done', 'task.cancelled')),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    -- Attempts claimed so far (an attempt whose process died counts too); also the fencing token:
    -- only the holder of the latest claim may record its result.
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When it was delivered or failed for good (the retention counts from there).
    finished_at     timestamptz,
    CONSTRAINT webhook_deliveries_once UNIQUE (endpoint_id, task_id),
    CONSTRAINT webhook_deliveries_finished CHECK ((status = 'pending') = (finished_at IS NULL))
);
-- What is due next: one index probe, however many deliveries there are.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_due_by_endpoint ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
-- The delivery log, newest first, optionally by status.
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_log_by_status ON webhook_deliveries (endpoint_id, status, id);
-- The retention purge, oldest first.
CREATE INDEX webhook_deliveries_finished_at ON webhook_deliveries (finished_at) WHERE status <> 'pending';

-- Every attempt: when, how long, what the receiver answered or what went wrong.
CREATE TABLE webhook_attempts (
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    duration_ms  double precision NOT NULL,
    http_status  integer,
    error        text,
    PRIMARY KEY (delivery_id, attempt)
);

-- The outbox, written at COMMIT of every transaction that finished tasks (a deferred trigger on
-- its task_batches row, migration 0003, whoever finished them: the workers, a transfer's credit,
-- a hand in psql): one delivery per finished task and enabled endpoint subscribed to its event.
-- A rolled-back transaction writes none; a committed one cannot lose them. Without any enabled
-- endpoint this is one probe of a tiny table per batch.
CREATE FUNCTION queue_webhook_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM webhook_endpoints WHERE status = 'enabled') THEN
        INSERT INTO webhook_deliveries (endpoint_id, task_id, event_type)
        SELECT e.id, t.id, 'task.' || t.status
          FROM tasks AS t
          JOIN webhook_endpoints AS e ON e.status = 'enabled' AND ('task.' || t.status) = ANY (e.events)
         WHERE t.finish_batch = NEW.batch_id AND t.status <> 'pending'
        ON CONFLICT (endpoint_id, task_id) DO NOTHING;
        IF FOUND THEN
            -- A wake-up for the senders; the rows are the truth.
            PERFORM pg_notify('webhook_delivery', '');
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER task_batches_queue_webhooks
    AFTER INSERT ON task_batches
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    EXECUTE FUNCTION queue_webhook_deliveries();
