-- tasks_by_hold (0004) served no query: a hold's resolution is recorded on its holds row
-- (resolved_by, release_id), a release is found through tasks_one_release_per_hold, and tasks are
-- never deleted, so the foreign key needs no index either. Each capture, void and release paid
-- for an entry in it.
DROP INDEX IF EXISTS tasks_by_hold;
