-- A delivery's attempts keep counting across replays and retries; the retry schedule restarts
-- for a replay.
--
-- webhook_deliveries.attempts is the number of the latest attempt (claims made so far), the
-- claim's fencing token, and the attempt's number in webhook_attempts (primary key delivery_id,
-- attempt). A replay used to set it back to 0: the replay's attempts took the numbers 1, 2, ...
-- again, and their results were dropped from the log by ON CONFLICT DO NOTHING (the log kept the
-- old attempt 1, a success, for the replay's failure), while attempt_count said 1 beside two
-- attempts listed. Now attempts only ever grows (a claim given back unmade still takes its one
-- back), and where the retry schedule stands is counted from schedule_from:
--   schedule_from  the attempts made before the delivery's schedule began: 0 from the outbox, the
--                  count at the replay for a replay (its first attempt is the schedule's first);
--                  NULL after a manual retry, which is one attempt: failed again if it fails.
ALTER TABLE webhook_deliveries ADD COLUMN schedule_from integer DEFAULT 0;

-- Deliveries a replay set back before this migration: their next attempt would take a number the
-- log already has. They count on from the highest number logged, at the same place in the
-- schedule. (A result of a claim under way now is then dropped, as one after its lease ends:
-- the attempt is made again, under the same webhook-id.)
UPDATE webhook_deliveries AS d
   SET schedule_from = coalesce(d.schedule_from, 0) + (m.last - d.attempts), attempts = m.last
  FROM (SELECT delivery_id, max(attempt) AS last FROM webhook_attempts GROUP BY delivery_id) AS m
 WHERE m.delivery_id = d.id AND m.last > d.attempts;
