-- The apply transaction sends its writes and its COMMIT in one message (db/apply.py): the check
-- that every row it meant to write was written (a task still pending, a hold still active) can no
-- longer be made by the client between the two. The writes' statement makes it itself and calls
-- this, whose error aborts the transaction before the COMMIT that follows in the same message.
-- SQLSTATE MB001 is ours (db/driver.py translates it to WriteCheckFailed).
CREATE FUNCTION apply_lost_race(detail text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the apply transaction wrote fewer rows than it meant to: %', detail
        USING ERRCODE = 'MB001',
              HINT = 'something changed tasks or holds without holding their user''s lock';
END;
$$;
