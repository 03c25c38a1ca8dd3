-- Bounded bookkeeping for event streams (task_batches) and the jobs that keep it bounded.

-- The oldest transaction still running when a batch committed (its snapshot's xmin). Every batch
-- placed after this one has a transaction id at least this high, so a per-user replay from a
-- place reads that user's tasks from here on through tasks_finished_by_user: work in proportion
-- to the events it replays, however many batches other users finished meanwhile. NULL for batches
-- numbered before this migration (no bound: 0).
ALTER TABLE task_batches ADD COLUMN horizon bigint;

CREATE INDEX tasks_finished_by_user ON tasks (user_id, finish_batch) WHERE finish_batch IS NOT NULL;

CREATE OR REPLACE FUNCTION number_finished_batch() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    batch_position bigint;
BEGIN
    -- This project's own key ("mbfseq").
    PERFORM pg_advisory_xact_lock(120269393061233);
    batch_position := nextval('task_batch_positions');
    UPDATE task_batches
       SET position = batch_position, horizon = pg_snapshot_xmin(pg_current_snapshot())::text::bigint
     WHERE batch_id = NEW.batch_id;
    PERFORM pg_notify('task_batch', NEW.batch_id || ':' || batch_position);
    RETURN NULL;
END
$$;

-- The retention purge walks batches oldest first.
CREATE INDEX task_batches_by_finish ON task_batches (finished_at);

-- Periodic maintenance jobs (the purges): when each last started, so that with several processes
-- each job runs once per interval, not once per process.
CREATE TABLE maintenance_runs (
    job             text PRIMARY KEY,
    last_started_at timestamptz NOT NULL
);
