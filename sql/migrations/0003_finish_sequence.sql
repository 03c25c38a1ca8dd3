-- A resume position for event streams: every finished task gets finish_seq, a number that grows
-- in COMMIT order across all users, so "tasks with finish_seq > N" is exactly "what finished
-- after the task whose finish_seq is N" -- for one user or for all.
--
-- Why not task ids: tasks of different users finish in any order, and even one user's tasks can
-- commit out of id order. Why not a plain sequence alone: a transaction can draw a number and
-- commit after another that drew a higher one, and a reader resuming after the higher one would
-- skip it for good. So numbers are drawn only while holding a transaction-scoped advisory lock
-- that is released at COMMIT: finishing statements (and their commits) run one at a time across
-- every process, and a snapshot that sees finish_seq N also sees everything below N.
--
-- The cost is small: commits that NOTIFY (as every finishing commit does) are already
-- serialised by PostgreSQL at commit time, so only the finishing UPDATE itself is added to that
-- queue, not the rest of a batch's transaction. The same lock makes task_processed
-- notifications arrive in finish_seq order.
ALTER TABLE tasks ADD COLUMN finish_seq bigint;

CREATE SEQUENCE tasks_finish_seq AS bigint;

-- Tasks finished before this migration, in the order they were processed.
UPDATE tasks AS t
   SET finish_seq = ordered.seq
  FROM (SELECT id, row_number() OVER (ORDER BY processed_at, id) AS seq
          FROM tasks WHERE status <> 'pending') AS ordered
 WHERE t.id = ordered.id;
SELECT setval('tasks_finish_seq', coalesce((SELECT max(finish_seq) FROM tasks), 0) + 1, false);

-- Replays read forward from a position. One index only: every index here is paid for on the
-- apply path; a per-user replay filters this one (or the planner picks tasks_by_user).
CREATE UNIQUE INDEX tasks_by_finish_seq ON tasks (finish_seq) WHERE finish_seq IS NOT NULL;

-- The lock, once per statement that may finish tasks (before any row is touched, so before any
-- number is drawn). The key is this project's own constant ("mbfseq").
CREATE FUNCTION serialise_task_finishing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(120269393061233);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_serialise_finishing
    BEFORE UPDATE OF status ON tasks
    FOR EACH STATEMENT
    EXECUTE FUNCTION serialise_task_finishing();

-- The worker's finish_tasks sets finish_seq itself (no per-row function call on the hot path);
-- this numbers a task finished any other way, e.g. by hand in psql.
CREATE FUNCTION number_finished_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.finish_seq := nextval('tasks_finish_seq');
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_number_finished
    BEFORE UPDATE OF status ON tasks
    FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status <> 'pending' AND NEW.finish_seq IS NULL)
    EXECUTE FUNCTION number_finished_task();

-- The task_processed payload now carries finish_seq, so listeners can place live events.
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
        'finish_seq', NEW.finish_seq
    )::text);
    RETURN NULL;
END
$$;
