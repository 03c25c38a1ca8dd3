-- The events of a transaction under way when an endpoint was disabled are queued for it too. A
-- client recovers a disabled endpoint's gap with a replay from its updated_at (README), and a
-- replay reaches the batches whose finished_at (the finishing transaction's now(): its start) is
-- at or after that instant. A transaction that started before the disable and committed after it
-- found the endpoint disabled here, at its COMMIT, and its finished_at is before updated_at: its
-- events reached neither the endpoint nor the replay, and were lost to it. Now an endpoint changed
-- after the batch's finished_at gets the batch's events whatever its status (a disabled one's wait,
-- pending, until it is enabled): what the replay cannot reach, this queues.
CREATE OR REPLACE FUNCTION queue_webhook_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM webhook_endpoints WHERE status = 'enabled' OR updated_at > NEW.finished_at) THEN
        INSERT INTO webhook_deliveries (endpoint_id, task_id, event_type)
        SELECT e.id, t.id, 'task.' || t.status
          FROM tasks AS t
          JOIN webhook_endpoints AS e
            ON (e.status = 'enabled' OR e.updated_at > NEW.finished_at) AND ('task.' || t.status) = ANY (e.events)
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
