-- Idempotency keys: a client may retry a POST with the same Idempotency-Key and get the first
-- answer back instead of a second user or task. The row is written in the same transaction as
-- the user or task it answers for, so the key and its effect commit (or vanish) together, and
-- the primary key makes concurrent retries -- in any process -- wait for the first to commit.
CREATE TABLE idempotency_keys (
    key             text PRIMARY KEY CHECK (char_length(key) BETWEEN 1 AND 255),
    -- sha256 of the method, canonical path and validated body: the same key with another
    -- request is refused instead of answered with an unrelated result.
    fingerprint     text NOT NULL,
    -- The first answer, replayed byte for byte. Filled in before the claiming transaction commits.
    response_status smallint,
    response_body   text,
    location        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);

-- The purge walks expired keys oldest first in small batches.
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);
