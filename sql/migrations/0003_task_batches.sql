-- Resume positions for event streams. Tasks finish in another order than their ids (users are
-- applied independently; even one user's task can commit after a later id was applied), so a
-- stream cannot resume "after id N". Instead every transaction that finishes tasks (a batch) gets
-- a position, numbered in COMMIT order across all processes; a task's place in the stream is
-- (its batch's position, its id).
--
-- Commit order is what makes a resume gap-free: a database snapshot that sees position N then
-- sees every position below N. A plain sequence would not do: a transaction can draw a number and
-- commit after one that drew a higher number, and a reader that resumed after the higher one would
-- skip it for good. So the position is drawn inside COMMIT itself (a deferred trigger), under a
-- transaction-scoped advisory lock that is released only once the commit is done. The finishing
-- work (updating the rows, building the notifications) still runs in parallel; only "draw a
-- number, update one row, commit" takes turns -- and PostgreSQL already serialises the commits of
-- transactions that NOTIFY, as every finishing one does. The batch's task_processed
-- notifications are followed, in the same transaction, by one NOTIFY task_batch
-- '<batch id>:<position>'; notifications arrive in commit order, so listeners learn each live
-- task's position too.
ALTER TABLE tasks ADD COLUMN finish_batch bigint;

CREATE TABLE task_batches (
    -- The finishing transaction's id (pg_current_xact_id); tasks finished before this migration
    -- have one pseudo-batch each, numbered -task_id.
    batch_id    bigint PRIMARY KEY,
    -- Set at COMMIT (below): NULL only inside the finishing transaction itself.
    position    bigint UNIQUE,
    finished_at timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE task_batch_positions AS bigint;

-- Tasks finished before this migration, one by one in the order they were processed.
INSERT INTO task_batches (batch_id, position, finished_at)
SELECT -id, row_number() OVER (ORDER BY processed_at, id), processed_at
  FROM tasks WHERE status <> 'pending';
UPDATE tasks SET finish_batch = -id WHERE status <> 'pending';
SELECT setval('task_batch_positions', coalesce((SELECT max(position) FROM task_batches), 0) + 1, false);

-- A batch's tasks (replays join task_batches to tasks through this).
CREATE INDEX tasks_by_finish_batch ON tasks (finish_batch, id) WHERE finish_batch IS NOT NULL;

-- The worker's finish_tasks sets finish_batch itself (no function call per row on the hot path);
-- this marks a task finished any other way, e.g. by hand in psql.
CREATE FUNCTION mark_finished_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.finish_batch := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_mark_finished
    BEFORE UPDATE OF status ON tasks
    FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status <> 'pending' AND NEW.finish_batch IS NULL)
    EXECUTE FUNCTION mark_finished_task();

-- At the end of every statement that may have finished tasks: record this transaction's batch
-- (once). Its position is left for COMMIT (below), so nothing is serialised yet.
CREATE FUNCTION record_finished_batch() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    batch bigint := pg_current_xact_id()::text::bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM tasks WHERE finish_batch = batch) THEN
        INSERT INTO task_batches (batch_id) VALUES (batch) ON CONFLICT (batch_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_record_finished_batch
    AFTER UPDATE OF status ON tasks
    FOR EACH STATEMENT
    EXECUTE FUNCTION record_finished_batch();

-- At COMMIT (a deferred trigger runs inside the COMMIT command, with no round trip to the client
-- left): take the finishing lock, held until the commit is done, draw the batch's position and
-- tell listeners. This NOTIFY is queued after the batch's task_processed ones.
CREATE FUNCTION number_finished_batch() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    batch_position bigint;
BEGIN
    -- This project's own key ("mbfseq").
    PERFORM pg_advisory_xact_lock(120269393061233);
    batch_position := nextval('task_batch_positions');
    UPDATE task_batches SET position = batch_position WHERE batch_id = NEW.batch_id;
    PERFORM pg_notify('task_batch', NEW.batch_id || ':' || batch_position);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER task_batches_number_at_commit
    AFTER INSERT ON task_batches
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    EXECUTE FUNCTION number_finished_batch();

-- The task_processed payload now carries finish_batch, to be matched with its task_batch notice.
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
        'created_at', NEW.created_at,
        'processed_at', NEW.processed_at,
        'finish_batch', NEW.finish_batch
    )::text);
    RETURN NULL;
END
$$;
